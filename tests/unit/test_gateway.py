"""AgentGateway: the one door from the daemon's parts to the untrusted guest agents (issue 14
item 4). Names are canonicalised, caps checked once, args and replies validated by the shared
schema, and every failure is a DaemonError with a 4xx/5xx status (never an exception that
would reach the API as a 500); a hostile reply leaves the link up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from symbiont import errors
from symbiont.agentlink import AgentLink, AgentOpError, AgentRequestTimeout, AgentUnavailable, _op_error
from symbiont.gateway import AgentGateway, legacy_code
from symbiont_agent import ops_schema as schema
from symbiont_agent import protocol as proto

OLD_CAPS = ["ping", "stats", "online-cpus", "ct-show", "ssdcache-release", "balloon-prepare"]
NEW_CAPS = ["core.ping", "core.stats", "cpu.online", "cpu.container-show", "ssdcache.release",
            "memory.balloon-prepare", *OLD_CAPS]


class FakeLink:
    """Stands in for AgentLink: answers from a script, records what was sent."""

    def __init__(self, caps: list[str], answer: Any = None, ready: bool = True) -> None:
        self.caps = caps
        self.ready = ready
        self.answer = answer
        self.sent: list[tuple[str, dict[str, Any], bytes, float | None]] = []

    async def request(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
                      timeout: float | None = None) -> tuple[Any, bytes]:
        self.sent.append((op, args or {}, payload, timeout))
        if isinstance(self.answer, BaseException):
            raise self.answer
        if isinstance(self.answer, tuple):
            return self.answer
        return self.answer, b""


def call(gw: AgentGateway, *a: Any, **kw: Any) -> tuple[Any, bytes]:
    return asyncio.run(gw.call(*a, **kw))


BALLOON_OK = {"requested_bytes": 1 << 20, "freed_bytes": 0, "mem_available_bytes": 5, "steps": []}


@pytest.mark.parametrize(("caps", "asked", "sent"), [
    (OLD_CAPS, "memory.balloon-prepare", "balloon-prepare"),   # an old guest image: its alias
    (OLD_CAPS, "balloon-prepare", "balloon-prepare"),
    (NEW_CAPS, "balloon-prepare", "memory.balloon-prepare"),   # a new one: the canonical name
    (NEW_CAPS, "memory.balloon-prepare", "memory.balloon-prepare"),
])  # fmt: skip
def test_either_name_is_accepted_and_the_name_the_agent_lists_is_sent(caps: list[str], asked: str, sent: str) -> None:
    link = FakeLink(caps, BALLOON_OK)
    reply, payload = call(AgentGateway({"vm": link}), "vm", asked, {"release_mib": 1}, timeout=3.0)
    assert reply == BALLOON_OK and payload == b""
    assert link.sent == [(sent, {"release_mib": 1}, b"", 3.0)]


def test_typed_call_returns_the_reply_dataclass() -> None:
    link = FakeLink(NEW_CAPS, BALLOON_OK)
    reply, _ = asyncio.run(AgentGateway({"vm": link}).call_typed("vm", "memory.balloon-prepare",
                                                                  schema.BalloonPrepareReq(release_mib=1)))
    assert isinstance(reply, schema.BalloonPrepareReply) and reply.requested_bytes == 1 << 20
    assert link.sent[0][1] == {"release_mib": 1}


def test_missing_capability_is_a_409_with_a_hint_and_nothing_is_sent() -> None:
    link = FakeLink(["ping", "stats"], {})
    with pytest.raises(errors.AgentUnsupported) as ei:
        call(AgentGateway({"vm": link}), "vm", "cpu.container-show", {"name": "web"})
    assert ei.value.status == 409 and "does not support cpu.container-show" in str(ei.value)
    assert "rebuild the image" in str(ei.value) and link.sent == []
    assert not AgentGateway({"vm": link}).supports("vm", "ct-show")
    assert AgentGateway({"vm": link}).supports("vm", "core.stats")


def test_no_agent_is_503_and_bad_args_are_422_naming_the_field_before_anything_is_sent() -> None:
    link = FakeLink(NEW_CAPS, {})
    gw = AgentGateway({"vm": link, "down": FakeLink(NEW_CAPS, ready=False)})
    for vm in ("ghost", "down"):
        with pytest.raises(errors.NoAgent) as ei:
            call(gw, vm, "core.stats")
        assert ei.value.status == 503
    for args, field in (({"release_mib": True}, "release_mib"), ({"release_mib": -1}, "release_mib"),
                        ({"release_mib": 1, "rm": 1}, "rm"), ({}, "release_mib")):
        with pytest.raises(errors.AgentInvalid, match=field) as ei:
            call(gw, "vm", "memory.balloon-prepare", args)
        assert ei.value.status == 422
    with pytest.raises(errors.AgentInvalid, match="payload"):
        call(gw, "vm", "core.stats", payload=b"x")
    with pytest.raises(errors.AgentInvalid, match="unknown agent op"):
        call(gw, "vm", "format-disk")
    assert link.sent == []


HOSTILE = [
    None, [], "ok", 7, True,
    {"requested_bytes": True, "freed_bytes": 0},                     # bool is not an int
    {"requested_bytes": -1, "freed_bytes": 0},                       # out of range
    {"requested_bytes": 2**70, "freed_bytes": 0},
    {"requested_bytes": 1.5, "freed_bytes": 0},
    {"freed_bytes": 0},                                              # a required field missing
    {**BALLOON_OK, "surprise": 1},                                   # unknown key
    {**BALLOON_OK, "steps": [{}] * 17},                              # list too long
    {**BALLOON_OK, "steps": ["x" * (70 << 10)]},                      # item too big
    {**BALLOON_OK, "steps": [json.loads("[" * 40 + "]" * 40)]},       # nesting
    {**BALLOON_OK, "mem_available_bytes": float("nan")},
    (BALLOON_OK, b"unasked payload"),                                # a payload the op never returns
]  # fmt: skip


@pytest.mark.parametrize("answer", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_reply_is_bad_reply_never_an_escaping_exception(answer: Any) -> None:
    link = FakeLink(NEW_CAPS, answer)
    with pytest.raises(errors.DaemonError) as ei:
        call(AgentGateway({"vm": link}), "vm", "memory.balloon-prepare", {"release_mib": 1})
    assert isinstance(ei.value, errors.AgentBadReply) and ei.value.code == "bad_reply"
    assert ei.value.status == 502 and len(str(ei.value)) <= 2000


@pytest.mark.parametrize(("exc", "cls", "status"), [
    (AgentOpError("NoSuchContainer: no container 'web'", "not_found"), errors.AgentNotFound, 404),
    (AgentOpError("x", "invalid"), errors.AgentInvalid, 422),
    (AgentOpError("x", "conflict"), errors.AgentConflict, 409),
    (AgentOpError("x", "unsupported"), errors.AgentUnsupported, 409),
    (AgentOpError("x", "busy"), errors.AgentBusy, 503),
    (AgentOpError("x", "timeout"), errors.AgentTimeout, 503),
    (AgentOpError("x", "internal"), errors.AgentInternal, 503),
    (AgentOpError("x", "bad_reply"), errors.AgentBadReply, 502),
    # agents up to 0.1.0: "TypeName: message", mapped here once
    (AgentOpError("NoSuchContainer: no container 'web'"), errors.AgentNotFound, 404),
    (AgentOpError("InvalidSpec: cpu_weight must be positive"), errors.AgentInvalid, 422),
    (AgentOpError("StreamError: bad chunk"), errors.AgentInvalid, 422),
    (AgentOpError("Conflict: already running"), errors.AgentConflict, 409),
    (AgentOpError("unknown op 'ct-show'"), errors.AgentUnsupported, 409),
    (AgentOpError("CriuError: dump failed"), errors.AgentInternal, 503),
    (AgentOpError("no colon at all"), errors.AgentInternal, 503),
    (AgentRequestTimeout("vm: agent did not answer in time"), errors.AgentTimeout, 503),
    (AgentUnavailable("vm: not connected"), errors.NoAgent, 503),
])  # fmt: skip
def test_agent_errors_map_to_daemon_errors_by_code(exc: Exception, cls: type, status: int) -> None:
    link = FakeLink(NEW_CAPS, exc)
    with pytest.raises(cls) as ei:
        call(AgentGateway({"vm": link}), "vm", "cpu.container-show", {"name": "web"})
    assert ei.value.status == status and isinstance(ei.value, errors.DaemonError)


def test_timeouts_are_a_type_so_callers_never_parse_text() -> None:
    assert issubclass(errors.AgentTimeout, errors.Unavailable)
    assert issubclass(AgentRequestTimeout, AgentUnavailable)
    assert legacy_code("TimeoutError: the guest gave up") == "timeout"


def test_the_links_error_field_is_untrusted() -> None:
    e = _op_error({"code": "not_found", "message": "m"})
    assert (e.code, str(e)) == ("not_found", "m")
    for hostile in ({"code": "pwned", "message": "m"}, {"code": "invalid", "message": 5}, {"code": 1}, []):
        e = _op_error(hostile)
        assert e.code == ("bad_reply" if isinstance(hostile, dict) else None), hostile
    e = _op_error("x" * 10_000)
    assert e.code is None and len(str(e)) == 2000


def test_a_real_link_stays_up_after_a_bad_reply(tmp_path: Path) -> None:
    """Over a real AgentLink and socket: a reply that fails the schema is bad_reply for that
    call only; the session is not dropped and the next call is answered."""

    async def run() -> None:
        path = str(tmp_path / "chan.sock")
        sessions: list[int] = []

        async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sessions.append(1)
            writer.write(proto.encode(proto.hello("agent", "t", ["core.stats", "memory.balloon-prepare"],
                                                  boot_id="b", pid=1)))
            await writer.drain()
            fr = proto.FrameReader()
            while data := await reader.read(65536):
                for msg in fr.feed(data):
                    if msg.type != "req":
                        continue
                    if msg.header["op"] == "memory.balloon-prepare":
                        resp = proto.response_ok(msg.header["id"], {"requested_bytes": "lots", "freed_bytes": 0})
                    else:
                        resp = proto.response_ok(msg.header["id"], {"meminfo": {"MemTotal": 1}})
                    writer.write(proto.encode(resp))
                    await writer.drain()

        server = await asyncio.start_unix_server(guest, path)
        link = AgentLink("vm", lambda: path, reconnect_max=0.2)
        link.start()
        gw = AgentGateway({"vm": link})
        try:
            async with asyncio.timeout(10):
                while not link.ready:
                    await asyncio.sleep(0.05)
                with pytest.raises(errors.AgentBadReply, match="requested_bytes"):
                    await gw.call("vm", "balloon-prepare", {"release_mib": 1})
                reply, _ = await gw.call("vm", "stats")
            assert reply["meminfo"] == {"MemTotal": 1}
            assert link.ready and link.stats.protocol_errors == 0 and len(sessions) == 1
        finally:
            await link.stop()
            server.close()

    asyncio.run(run())


def test_a_silent_agent_is_a_typed_timeout_on_the_link_and_through_the_gateway(tmp_path: Path) -> None:
    """What ssdcache's manager now catches instead of looking for "in time" in the message."""

    async def run() -> None:
        path = str(tmp_path / "chan.sock")

        async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(proto.encode(proto.hello("agent", "t", ["ssdcache-release"], boot_id="b", pid=1)))
            await writer.drain()
            await reader.read()  # never answers

        server = await asyncio.start_unix_server(guest, path)
        link = AgentLink("vm", lambda: path, reconnect_max=0.2)
        link.start()
        try:
            async with asyncio.timeout(10):
                while not link.ready:
                    await asyncio.sleep(0.05)
                with pytest.raises(AgentRequestTimeout):
                    await link.request("ssdcache-release", {"count": 1}, timeout=0.2)
                with pytest.raises(errors.AgentTimeout) as ei:
                    await AgentGateway({"vm": link}).call("vm", "ssdcache.release", {"count": 1}, timeout=0.2)
            assert ei.value.status == 503 and ei.value.code == "timeout"
        finally:
            await link.stop()
            server.close()

    asyncio.run(run())
