"""The one door from the daemon's parts to the guest agents: ``await gateway.call(vm, op, args)``.

Everything a call to an untrusted guest needs is done here, once: the op's canonical name
(old names are accepted), the capability check (409 with a hint when the guest image is too
old), the request checked against the op's schema (``symbiont_agent.ops_schema``, the module
the agent validates with), the timeout, the reply checked against the schema (a reply that
does not fit is :class:`~symbiont.errors.AgentBadReply`, 502, and the link stays up), and the
agent's error codes mapped to :mod:`symbiont.errors` classes, so no caller parses a message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from symbiont.agentlink import AgentLink, AgentOpError, AgentRequestTimeout
from symbiont.agentlink import AgentUnavailable as LinkUnavailable
from symbiont.errors import (
    AgentBadReply,
    AgentError,
    AgentInvalid,
    AgentTimeout,
    AgentUnsupported,
    NoAgent,
    agent_error,
)
from symbiont_agent import ops_schema as schema

log = logging.getLogger(__name__)

# Agents up to 0.1.0 answered errors as "TypeName: message": the type names they used, once.
LEGACY_CODES = {
    "NoSuchContainer": schema.NOT_FOUND, "FileNotFoundError": schema.NOT_FOUND,
    "InvalidSpec": schema.INVALID, "ValueError": schema.INVALID, "TypeError": schema.INVALID,
    "StreamError": schema.INVALID,
    "Conflict": schema.CONFLICT, "FileExistsError": schema.CONFLICT,
    "TimeoutError": schema.TIMEOUT, "NotImplementedError": schema.UNSUPPORTED,
}  # fmt: skip
_LEGACY = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,63}): ")


def legacy_code(message: str) -> str:
    """The code of an old agent's ``"TypeName: message"`` error (``internal`` if unknown)."""
    if message.startswith("unknown op "):
        return schema.UNSUPPORTED
    m = _LEGACY.match(message)
    return LEGACY_CODES.get(m.group(1), schema.INTERNAL) if m else schema.INTERNAL


class AgentGateway:
    """Typed, validated calls to the guest agents over the daemon's links."""

    def __init__(self, links: Mapping[str, AgentLink]) -> None:
        self.links = links
        self.before_call: Callable[[str, str], Awaitable[None]] | None = None

    def set_before_call(self, hook: Callable[[str, str], Awaitable[None]] | None) -> None:
        """``await hook(vm, canonical_op)`` before each call, before the link is even looked at
        (a parked VM's agent may be unreachable until it is woken); what it raises is the call's
        error. One hook: the paging part's wake of a parked VM."""
        self.before_call = hook

    def link(self, vm: str) -> AgentLink:
        link = self.links.get(vm)
        if link is None:
            raise NoAgent(f"{vm}: no agent channel (is the VM registered and running?)")
        if not getattr(link, "ready", False):
            raise NoAgent(f"{vm}: agent not connected")
        return link

    def supports(self, vm: str, op: str) -> bool:
        """Whether ``vm``'s agent is connected and serves ``op`` (any of its names)."""
        try:
            self._check_caps(vm, self.link(vm), schema.canonical(op))
        except (AgentError, KeyError):
            return False
        return True

    def stream(self, vm: str, event: str, handler: Callable[[dict[str, Any], bytes], None]) -> Callable[[], None]:
        """Route ``vm``'s binary stream events named ``event`` (e.g. a migration's ``mig-chunk``)
        to ``handler`` (called on the link's reader: it must not block nor raise) until the
        returned function is called. :class:`NoAgent` when the agent is not connected."""
        link = self.link(vm)
        link.stream_handlers[event] = handler

        def unsubscribe() -> None:
            if link.stream_handlers.get(event) is handler:
                del link.stream_handlers[event]

        return unsubscribe

    def _check_caps(self, vm: str, link: AgentLink, canon: str) -> str:
        """The name to send: canonical when the agent lists it, else an alias it lists."""
        caps = set(link.caps)
        sp = schema.OPS[canon]
        for n in (sp.name, *sp.aliases):
            if n in caps:
                return n
        raise AgentUnsupported(f"{vm}: agent does not support {canon} (its guest image predates it: "
                               "rebuild the image or update symbiont-agent in the guest)")

    async def call(
        self, vm: str, op: str, args: dict[str, Any] | None = None, *, payload: bytes = b"",
        timeout: float | None = None,
    ) -> tuple[Any, bytes]:
        """Call ``op`` on ``vm``'s agent: ``(reply, payload)``, the reply validated (a dict)."""
        reply, out = await self._call(vm, op, args, payload, timeout)
        return schema.to_dict(reply), out

    async def call_typed(
        self, vm: str, op: str, args: Any = None, *, payload: bytes = b"", timeout: float | None = None,
    ) -> tuple[Any, bytes]:
        """As :meth:`call`, with the reply as the op's reply dataclass."""
        return await self._call(vm, op, args, payload, timeout)

    async def _call(self, vm: str, op: str, args: Any, payload: bytes, timeout: float | None) -> tuple[Any, bytes]:
        try:
            canon = schema.canonical(op)
        except KeyError:
            raise AgentInvalid(f"unknown agent op {op[:64]!r}") from None
        try:
            wire_args = schema.encode_request(canon, args)
            schema.check_payload(canon, payload, "request")
        except schema.SchemaError as exc:
            raise AgentInvalid(f"{vm}: {canon}: {exc}") from None
        if self.before_call is not None:
            await self.before_call(vm, canon)
        link = self.link(vm)
        name = self._check_caps(vm, link, canon)
        try:
            result, out = await link.request(name, wire_args, payload, timeout=timeout)
        except AgentRequestTimeout as exc:
            raise AgentTimeout(str(exc)) from None
        except LinkUnavailable as exc:
            raise NoAgent(str(exc)) from None
        except AgentOpError as exc:
            code = exc.code if exc.code is not None else legacy_code(str(exc))
            raise agent_error(code, f"{vm}: {canon}: {exc}") from None
        try:
            reply = schema.decode_reply(canon, result)
            schema.check_payload(canon, out, "reply")
        except schema.SchemaError as exc:
            log.warning("%s: %s: reply refused: %s", vm, canon, str(exc)[:300])
            raise AgentBadReply(f"{vm}: {canon}: the agent's reply does not fit the schema: {exc}"[:2000]) from None
        return reply, out
