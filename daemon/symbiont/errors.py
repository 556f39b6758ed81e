"""Errors with an HTTP status: the daemon and every part raise these, the API answers with
``status`` and the message as the reason. Kept free of imports so any part can use them."""


class DaemonError(Exception):
    """Base of the errors the API maps to 4xx/5xx responses."""

    status = 400


class NotFound(DaemonError):
    status = 404


class Conflict(DaemonError):
    status = 409


class Invalid(DaemonError):
    status = 422


class Unavailable(DaemonError):
    status = 503


class BadGateway(DaemonError):
    """An upstream (a guest agent) answered something we cannot use."""

    status = 502


# -- the agent's error codes (``symbiont_agent.ops_schema.ERROR_CODES``) as API errors ----------


class AgentError(DaemonError):
    """Mixin of errors that came from (or through) a guest agent: ``code`` is the agent's."""

    code = "internal"


class AgentInvalid(AgentError, Invalid):
    code = "invalid"


class AgentNotFound(AgentError, NotFound):
    code = "not_found"


class AgentConflict(AgentError, Conflict):
    code = "conflict"


class AgentUnsupported(AgentError, Conflict):
    """The agent does not serve the op (an older guest image): 409 with a hint to rebuild."""

    code = "unsupported"


class AgentBusy(AgentError, Unavailable):
    code = "busy"


class NoAgent(AgentError, Unavailable):
    """No agent session on the VM's channel (none registered, not connected, link dropped)."""

    code = "unavailable"


class AgentTimeout(AgentError, Unavailable):
    """The agent did not answer in time: a type, so callers never parse the message."""

    code = "timeout"


class AgentInternal(AgentError, Unavailable):
    """The op failed inside the guest."""

    code = "internal"


class AgentBadReply(AgentError, BadGateway):
    """The guest's answer does not fit the op's schema (the link stays up)."""

    code = "bad_reply"


AGENT_ERRORS: dict[str, type[AgentError]] = {
    c.code: c
    for c in (AgentInvalid, AgentNotFound, AgentConflict, AgentUnsupported, AgentBusy, AgentTimeout,
              AgentInternal, AgentBadReply)
}


def agent_error(code: str | None, message: str) -> AgentError:
    """The API error for an agent's error code (an unknown code is ``internal``)."""
    return AGENT_ERRORS.get(code or "internal", AgentInternal)(message)
