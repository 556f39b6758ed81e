"""The migration part against the shared fakes (tests/fakes.py): a migration's phases driven
through FakeAgents (canonical ``migration.*`` ops; the relay's chunks arrive through the
gateway's ``stream``), pre-copy convergence, the address moving fenced, an abort giving the
address back before the source thaws, and the journal's recovery at start."""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from typing import Any

from symbiont.errors import AgentInternal
from symbiont.host.fake import FakeDomain
from symbiont.migration import journal as jn
from symbiont.migration.part import MigrationPart
from tests.fakes import Env, FakeAgents

MiB = 1 << 20
DATA = bytes(range(256)) * 40  # one image file, relayed in chunks


class StreamingAgents(FakeAgents):
    """FakeAgents plus the gateway's binary streams; payloads written at the destination kept."""

    def __init__(self, replies: dict[Any, Any]) -> None:
        super().__init__(replies)
        self.streams: dict[tuple[str, str], Any] = {}
        self.received: list[bytes] = []

    def stream(self, vm: str, event: str, handler: Any) -> Any:
        self.streams[(vm, event)] = handler
        return lambda: self.streams.pop((vm, event), None)

    async def call(self, vm: str, op: str, args: dict[str, Any] | None = None, *, payload: bytes = b"",
                   timeout: float | None = None) -> tuple[Any, bytes]:
        if op == "migration.recv":
            self.received.append(payload)
        return await super().call(vm, op, args, payload=payload, timeout=timeout)


def agents(predump_sizes: list[int], fail: str | None = None) -> StreamingAgents:
    sizes = iter(predump_sizes)
    a: StreamingAgents

    def send(vm: str, args: dict[str, Any]) -> dict[str, Any]:
        """The source streams the file as the agent does: framed chunks with their CRC-32."""
        handler = a.streams[(vm, "mig-chunk")]
        for off in range(0, len(DATA), 4096):
            part = DATA[off : off + 4096]
            handler({"mid": args["mid"], "path": "img/x", "off": off, "len": len(part), "crc": zlib.crc32(part)},
                    part)  # fmt: skip
        return {"sent": len(DATA)}

    replies: dict[Any, Any] = {
        "migration.check": {"init_pid": 5, "files": [], "memory_current": 1, "record": {"name": "web"}},
        "migration.predump": lambda vm, args: {"bytes": next(sizes)},
        "migration.dump": {"bytes": 300 << 10, "files": []},
        "migration.manifest": {"files": [{"path": "img/x", "size": len(DATA),
                                          "sha256": hashlib.sha256(DATA).hexdigest()}]},
        "migration.send": lambda vm, args: send(vm, args),
        "migration.credit": {}, "migration.recv": {}, "migration.verify": {},
        "migration.status": {"restored": True, "container": {"populated": True, "frozen": False}},
        "migration.restore": {"pid": 7}, "migration.addr": {}, "migration.finish": {},
        "migration.cleanup": {}, "migration.abort": {}, "migration.resume": {},
    }  # fmt: skip
    if fail:
        replies[fail] = AgentInternal(f"{fail} failed")
    a = StreamingAgents(replies)
    return a


def env_with(tmp_path: Any, a: StreamingAgents) -> tuple[Env, MigrationPart]:
    env = Env(tmp_path, FakeDomain("vm1", qemu_pid=11, cpu_seconds=2.0),
              FakeDomain("vm2", qemu_pid=12, cpu_seconds=3.0), agents=a)  # fmt: skip
    env.register("vm1")
    env.register("vm2")
    part = env.add(MigrationPart)
    assert isinstance(part, MigrationPart)
    return env, part


def run(tmp_path: Any, predump_sizes: list[int], fail: str | None = None, ip: str | None = "10.211.200.1"):
    a = agents(predump_sizes, fail)

    async def main() -> dict[str, Any]:
        env, part = env_with(tmp_path, a)
        await env.start()
        m = await part.ctl.start("vm1", "web", "vm2", predumps=8, converge=MiB, ip=ip, chunk=4096, window=16384)
        await part.ctl.tasks[m["id"]]
        await part.stop()
        return part.ctl.show(m["id"])

    return asyncio.run(main()), a


def ops(a: FakeAgents) -> list[tuple[str, str, Any, Any]]:
    return [(vm, op, x.get("up"), x.get("fenced")) for vm, op, x in a.calls
            if op not in ("migration.status", "migration.credit", "migration.recv")]  # fmt: skip


def test_precopy_converges_the_relay_delivers_and_the_address_moves_fenced(tmp_path) -> None:
    m, a = run(tmp_path, [40 * MiB, 6 * MiB, 700 << 10])
    assert m["phase"] == "done", m
    assert m["progress"]["predump_bytes"] == [40 * MiB, 6 * MiB, 700 << 10]
    assert m["progress"]["precopy_stop"] == "below-threshold" and m["progress"]["predumps"] == 3
    seq = ops(a)
    i_fence, i_dump = seq.index(("vm1", "migration.addr", False, True)), seq.index(("vm1", "migration.dump", None, None))
    i_up = seq.index(("vm2", "migration.addr", True, True))
    i_restore = seq.index(("vm2", "migration.restore", None, None))
    i_open = seq.index(("vm2", "migration.addr", True, False))
    i_finish = seq.index(("vm1", "migration.finish", None, None))
    assert i_fence < i_dump < i_up < i_restore < i_open < i_finish, seq
    assert [op for _, op, *_ in seq].count("migration.predump") == 3
    # 3 pre-copy transfers + the final one, each relayed chunk by chunk to the destination, intact
    assert b"".join(a.received) == DATA * 4
    assert [r["relay_bytes"] for r in m["result"]["relay"]] == [len(DATA)] * 4
    assert not a.streams  # the relay unsubscribed after each transfer
    cpu = m["result"]["host_cpu"]  # through the host port: the fake's recorded CPU time, none used
    assert cpu["source_qemu_cpu_s"] == 0.0 and cpu["dest_qemu_cpu_s"] == 0.0


def test_precopy_stops_when_the_dirty_set_no_longer_shrinks(tmp_path) -> None:
    m, _ = run(tmp_path, [40 * MiB, 8 * MiB, 7 * MiB, 7 * MiB], ip=None)
    assert m["phase"] == "done" and m["progress"]["precopy_stop"] == "not-shrinking", m["progress"]
    assert m["progress"]["predumps"] == 3


def test_failed_restore_gives_the_address_back_before_the_source_thaws(tmp_path) -> None:
    m, a = run(tmp_path, [40 * MiB, 500 << 10], fail="migration.restore")
    assert m["phase"] == "aborted", m
    seq = ops(a)
    after = seq[seq.index(("vm2", "migration.restore", None, None)) + 1 :]
    assert after[:4] == [
        ("vm2", "migration.abort", None, None),
        ("vm2", "migration.addr", False, True),
        ("vm1", "migration.addr", True, False),
        ("vm1", "migration.resume", None, None),
    ], after


def test_recovery_at_start_finishes_a_migration_killed_after_confirm(tmp_path) -> None:
    """A daemon killed after ``confirm`` (in ``cleanup``): the next start keeps the destination's copy and
    removes the source's (exactly one copy), and the journal says ``done``."""
    a = agents([])

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        env, part = env_with(tmp_path, a)
        env.register("vm3")
        env.register("vm4")
        j = jn.Journal(env.store)
        j.create("m1", "vm1", "web", "vm2", "relay", "adaptive", {})
        for ph in ("check", "predump", "transfer", "dump", "transfer", "restore", "confirm"):
            j.move("m1", ph)
        j.move("m1", "cleanup")
        j.create("m2", "vm3", "db", "vm4", "relay", "adaptive", {})
        j.move("m2", "check")  # killed before any restore: aborted, the source thawed
        await env.start()
        assert part.recovery is not None
        await part.recovery
        await part.stop()
        return j.get("m1") or {}, j.get("m2") or {}

    m1, m2 = asyncio.run(main())
    assert m1["phase"] == "done" and m2["phase"] == "aborted", (m1["phase"], m2["phase"])
    assert ("vm1", "migration.finish", {"mid": "m1", "name": "web"}) in a.calls
    assert ("vm3", "migration.resume", {"name": "db", "mid": "m2"}) in a.calls
    assert not any(op == "migration.finish" and x.get("mid") == "m2" for _, op, x in a.calls)


def test_recovery_waits_for_an_absent_agent_and_retries_each_period(tmp_path) -> None:
    a = agents([])
    a.down.add("vm1")

    async def main() -> tuple[str, str]:
        env, part = env_with(tmp_path, a)
        j = jn.Journal(env.store)
        j.create("m1", "vm1", "web", "vm2", "relay", "adaptive", {})
        j.move("m1", "check")
        await env.start()
        await part.recovery  # type: ignore[misc]
        before = (j.get("m1") or {})["phase"]
        a.down.discard("vm1")
        await env.period()
        await part.recovery  # type: ignore[misc]
        await part.stop()
        return before, (j.get("m1") or {})["phase"]

    assert asyncio.run(main()) == ("check", "aborted")


def test_start_refuses_bad_requests_before_any_agent_call(tmp_path) -> None:
    from symbiont.errors import Invalid, NotFound

    a = agents([])

    async def main() -> None:
        env, part = env_with(tmp_path, a)
        for kw, exc in (({"dest": "vm9"}, NotFound), ({"dest": "vm1"}, Invalid), ({"path": "pigeon"}, Invalid),
                        ({"fault": "explode"}, Invalid)):  # fmt: skip
            args = {"dest": "vm2", **kw}
            try:
                await part.ctl.start("vm1", "web", args.pop("dest"), **args)
            except exc:
                continue
            raise AssertionError(f"{kw} was accepted")

    asyncio.run(main())
    assert a.calls == []


def test_gateway_stream_routes_events_until_unsubscribed() -> None:
    """The door the relay uses: the link's stream handler is set, and removed only if still its own."""
    import pytest

    from symbiont.errors import NoAgent
    from symbiont.gateway import AgentGateway

    class Link:
        ready = True
        caps: tuple[str, ...] = ()

        def __init__(self) -> None:
            self.stream_handlers: dict[str, Any] = {}

    link = Link()
    gw = AgentGateway({"vm1": link})  # type: ignore[dict-item]
    first, second = (lambda d, p: None), (lambda d, p: None)
    off = gw.stream("vm1", "mig-chunk", first)
    assert link.stream_handlers == {"mig-chunk": first}
    off()
    assert link.stream_handlers == {}
    off1 = gw.stream("vm1", "mig-chunk", first)
    gw.stream("vm1", "mig-chunk", second)  # a newer relay took the event over
    off1()
    assert link.stream_handlers == {"mig-chunk": second}
    with pytest.raises(NoAgent):
        gw.stream("vm2", "mig-chunk", first)


def test_destination_warms_up_before_the_freeze_and_the_dump_brings_its_manifest(tmp_path) -> None:
    """Inside the freeze only the dump, the final transfer and the restore: CRIU is warmed up on
    the destination (``prepare``) during pre-copy, the final files' manifest comes with the dump
    (no extra round trip), and each step of the freeze and the transfers' own host CPU are
    recorded."""
    a = agents([40 * MiB, 500 << 10])
    man = a.replies["migration.manifest"]
    a.replies["migration.dump"] = {"bytes": 300 << 10, "files": [], "manifest": man["files"]}
    a.replies["migration.prepare"] = {"seconds": 0.5}

    async def main() -> dict[str, Any]:
        env, part = env_with(tmp_path, a)
        await env.start()
        m = await part.ctl.start("vm1", "web", "vm2", predumps=8, converge=MiB, chunk=4096, window=16384)
        await part.ctl.tasks[m["id"]]
        await part.stop()
        return part.ctl.show(m["id"])

    m = asyncio.run(main())
    assert m["phase"] == "done", m
    seq = ops(a)
    assert seq.index(("vm2", "migration.prepare", None, None)) < seq.index(("vm1", "migration.dump", None, None))
    assert [op for _, op, *_ in seq].count("migration.manifest") == 2  # the two pre-dumps only
    assert b"".join(a.received) == DATA * 3  # the final files still relayed, from the dump's manifest
    steps = m["result"]["freeze_steps"]
    assert {"dump_s", "manifest_s", "send_s", "verify_s", "restore_s", "status_s"} <= set(steps), steps
    assert m["timings"]["prepare_s"] == 0.5
    xfer = m["result"]["transfer_cpu"]
    assert xfer["bytes"] == 3 * len(DATA) and xfer["cpu_s"] == 0.0, xfer


def test_a_failed_warm_up_does_not_stop_the_migration(tmp_path) -> None:
    m, a = run(tmp_path, [40 * MiB, 500 << 10], fail="migration.prepare")
    assert m["phase"] == "done", m
    assert ("vm2", "migration.prepare", None, None) in ops(a) and "prepare_s" not in m["timings"]
