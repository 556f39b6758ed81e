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
