"""Every API route refuses a request body over the limit (1 MiB) with a 413 and a reason, before
any handler runs; bodies within the limit reach the routes unchanged. The real app over a real
Daemon (libvirt faked, as in test_api_validation)."""

from __future__ import annotations

import asyncio

import pytest

from symbiont.bodylimit import DEFAULT_MAX_BYTES, BodyLimit

from .test_api_validation import env  # noqa: F401 -- the fixture: a real Daemon behind the real app


def test_a_body_over_the_limit_is_413_with_a_reason_and_changes_nothing(env) -> None:  # noqa: F811
    client, d = env
    big = '{"name": "vm1", "extra": {"x": "' + "a" * DEFAULT_MAX_BYTES + '"}}'
    r = client.post("/v1/vms", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "exceeds the limit of 1048576 bytes" in r.json()["detail"]
    assert d.store.get_vm("vm1") is None
    # Any route, even one that takes no body, and one that does not exist.
    for path in ("/v1/health", "/v1/vms/vm1/memory", "/v1/nowhere"):
        assert client.post(path, content=b"x" * (DEFAULT_MAX_BYTES + 1)).status_code == 413


def test_a_body_within_the_limit_reaches_the_route_as_sent(env) -> None:  # noqa: F811
    client, d = env
    r = client.post("/v1/vms", json={"name": "vm2", "extra": {"part": {"s": "é" * 100}}})
    assert r.status_code == 201, r.text
    assert client.get("/v1/vms/vm2").json()["policy"]["extra"] == {"part": {"s": "é" * 100}}
    assert client.post("/v1/vms", content=b"{", headers={"content-type": "application/json"}).status_code == 422


def run_asgi(mw: BodyLimit, messages: list[dict], headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], list]:
    """Drive the middleware with the given request messages; returns (what was sent, what the app saw)."""
    seen: list = []
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw.app = app
    it = iter(messages)

    async def receive() -> dict:
        return next(it, {"type": "http.disconnect"})

    async def send(msg: dict) -> None:
        sent.append(msg)

    asyncio.run(mw({"type": "http", "headers": headers}, receive, send))
    return sent, seen


def test_a_chunked_body_over_the_limit_is_refused_without_calling_the_route() -> None:
    """No Content-Length (or a false one): counted while reading."""
    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True},
              {"type": "http.request", "body": b"x" * 600, "more_body": False}]
    sent, seen = run_asgi(BodyLimit(None, max_bytes=1000), chunks, [])  # type: ignore[arg-type]
    assert sent[0]["status"] == 413 and not seen
    sent, seen = run_asgi(BodyLimit(None, max_bytes=1000), chunks, [(b"content-length", b"10")])  # type: ignore[arg-type]
    assert sent[0]["status"] == 413 and not seen
    sent, seen = run_asgi(BodyLimit(None, max_bytes=1200), chunks, [])  # type: ignore[arg-type]
    assert sent[0]["status"] == 200 and seen == [{"type": "http.request", "body": b"x" * 1200, "more_body": False}]
    sent, seen = run_asgi(BodyLimit(None), [], [(b"content-length", b"-5")])  # type: ignore[arg-type]
    assert sent[0]["status"] == 400 and not seen


def test_a_negative_limit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        BodyLimit(None, max_bytes=-1)  # type: ignore[arg-type]
