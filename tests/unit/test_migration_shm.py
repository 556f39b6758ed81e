"""The relay's ``shm`` channel against the fakes: a region per VM (the fake host keeps them as
files), the source's chunks read from its region, one host copy into the destination's, the
regions unplugged and removed at the end (done or aborted), a guest's out-of-bounds span failing
only its migration, the serial frames when an agent has no region support, and the journal's
region rows letting a restarted daemon remove what a killed one left."""

from __future__ import annotations

import asyncio
import os
import zlib
from typing import Any

from symbiont.errors import AgentInternal
from symbiont.migration import journal as jn
from symbiont_agent import migration_rate as rate
from tests.unit.test_migration_controller import DATA, agents, env_with

HDR = rate.SHM_HEADER


def shm_agents(tmp_path: Any, bad_at: int | None = None):
    """FakeAgents whose source reads the file into its region (as the agent's ring does) and
    whose destination takes each chunk from its own region at ``at``, CRC checked."""
    a = agents([900 << 10])
    shm_dir = str(tmp_path / "shm")
    os.makedirs(shm_dir, exist_ok=True)
    written: list[bytes] = []

    def region(mid: str, role: str) -> str:
        return os.path.join(shm_dir, f"symbiont-mig-{mid}-{role}")

    def send(vm: str, args: dict[str, Any]) -> dict[str, Any]:
        assert set(args["shm"]) == {"dev", "size", "token"}
        handler = a.streams[(vm, "mig-chunk")]
        ring = rate.Ring(args["shm"]["size"] - HDR)
        fd = os.open(region(args["mid"], "src"), os.O_RDWR)
        try:
            assert os.pread(fd, 16, 0) == bytes.fromhex(args["shm"]["token"])
            for off in range(0, len(DATA), 4096):
                part = DATA[off : off + 4096]
                at = ring.alloc(len(part))
                assert at is not None
                os.pwrite(fd, part, HDR + at)
                handler({"mid": args["mid"], "path": "img/x", "off": off, "len": len(part), "crc": zlib.crc32(part),
                         "at": at if bad_at is None else bad_at}, b"")  # fmt: skip
        finally:
            os.close(fd)
        return {"sent": len(DATA)}

    def recv(vm: str, args: dict[str, Any]) -> Any:
        with open(region(args["mid"], "dst"), "rb") as fh:
            fh.seek(HDR + args["at"])
            data = fh.read(args["len"])
        if zlib.crc32(data) != args["crc"]:
            return AgentInternal("checksum mismatch, chunk refused")
        written.append(data)
        return {"written": len(data)}

    a.replies.update({"migration.send": send, "migration.recv": recv, "migration.shm": {}})
    return a, shm_dir, written


def migrate(tmp_path: Any, a: Any, shm_dir: str, **kw: Any) -> tuple[dict[str, Any], Any, Any]:
    async def main() -> tuple[dict[str, Any], Any, Any]:
        env, part = env_with(tmp_path, a)
        env.host.shm_dir = shm_dir
        await env.start()
        m = await part.ctl.start("vm1", "web", "vm2", predumps=1, chunk=4096, window=16384, channel="shm", **kw)
        await part.ctl.tasks[m["id"]]
        await part.stop()
        return part.ctl.show(m["id"]), env, part.ctl

    return asyncio.run(main())


def test_shm_channel_moves_the_bytes_through_one_host_copy_and_removes_the_regions(tmp_path) -> None:
    a, shm_dir, written = shm_agents(tmp_path)
    m, env, ctl = migrate(tmp_path, a, shm_dir)
    assert m["phase"] == "done", m
    assert m["result"]["channel"] == "shm" and all(r["channel"] == "shm" for r in m["result"]["relay"])
    assert b"".join(written) == DATA * 2  # the pre-copy and the final transfer, intact
    assert a.received and not any(a.received)  # no frame carried a payload
    names = [f"symbiont-mig-{m['id']}-src", f"symbiont-mig-{m['id']}-dst"]
    attached = [c for c in env.host.calls if c[0] == "attach_shmem"]
    assert [(c[1], c[2]) for c in attached] == [("vm1", names[0]), ("vm2", names[1])]  # one per VM
    assert ("detach_shmem", "vm1", names[0]) in env.host.calls and ("detach_shmem", "vm2", names[1]) in env.host.calls
    assert os.listdir(shm_dir) == [] and ctl.journal.regions() == []
    # the source may reuse what the relay took: the credits say how many chunks it copied out
    assert max(x.get("taken", 0) for _, op, x in a.calls if op == "migration.credit") == 3
    for r in m["result"]["relay"]:  # at most one credit per ack: some folded into a newer one
        assert 1 <= r["credits"] and r["credits"] + r["credits_coalesced"] <= r["relay_chunks"], r
    releases = [(vm, x) for vm, op, x in a.calls if op == "migration.shm" and x.get("release")]
    assert {vm for vm, _ in releases} == {"vm1", "vm2"}


def test_a_span_outside_the_region_fails_that_migration_only(tmp_path) -> None:
    a, shm_dir, written = shm_agents(tmp_path, bad_at=(1 << 20) - HDR - 100)
    m, env, ctl = migrate(tmp_path, a, shm_dir)
    assert m["phase"] == "aborted" and "outside the region" in m["error"], m
    assert written == []
    assert ("vm1", "migration.resume", {"name": "web", "mid": m["id"]}) in a.calls
    assert ("vm2", "migration.abort", {"mid": m["id"], "name": "web"}) in a.calls
    assert os.listdir(shm_dir) == [] and ctl.journal.regions() == []


def test_corruption_after_the_relay_check_is_caught_by_the_destination(tmp_path) -> None:
    a, shm_dir, written = shm_agents(tmp_path)
    m, _env, ctl = migrate(tmp_path, a, shm_dir, fault="corrupt")
    assert m["phase"] == "aborted" and "checksum" in m["error"], m
    assert os.listdir(shm_dir) == [] and ctl.journal.regions() == []


def test_an_agent_without_regions_gets_the_serial_frames(tmp_path) -> None:
    a = agents([900 << 10])  # no migration.shm: an older agent
    shm_dir = str(tmp_path / "shm")
    m, env, ctl = migrate(tmp_path, a, shm_dir)
    assert m["phase"] == "done", m
    assert m["result"]["channel"] == "serial" and "migration.shm" in m["result"]["shm_fallback"]
    assert b"".join(a.received) == DATA * 2
    assert not [c for c in env.host.calls if c[0] == "attach_shmem"] and ctl.journal.regions() == []


def test_a_restarted_daemon_removes_the_regions_a_killed_one_left(tmp_path) -> None:
    a = agents([])
    a.replies["migration.shm"] = {}

    async def main() -> tuple[Any, Any]:
        env, part = env_with(tmp_path, a)
        env.host.shm_dir = str(tmp_path)
        j = jn.Journal(env.store)
        j.create("m1", "vm1", "web", "vm2", "relay", "adaptive", {"channel": "shm"})
        j.move("m1", "check")
        for vm, role in (("vm1", "src"), ("vm2", "dst")):  # killed right after plugging both in
            j.add_region(f"symbiont-mig-m1-{role}", "m1", vm, 1 << 20)
            env.host.attach_shmem(vm, f"symbiont-mig-m1-{role}", 1 << 20)
        await env.start()
        await part.recovery  # type: ignore[misc]
        await part.stop()
        return env, j

    env, j = asyncio.run(main())
    assert ("detach_shmem", "vm1", "symbiont-mig-m1-src") in env.host.calls
    assert ("detach_shmem", "vm2", "symbiont-mig-m1-dst") in env.host.calls
    assert not [n for n in os.listdir(tmp_path) if n.startswith("symbiont-mig-")]
    assert j.regions() == [] and (j.get("m1") or {})["phase"] == "aborted"


def test_a_region_name_is_never_given_twice(tmp_path) -> None:
    import pytest

    env, part = env_with(tmp_path, agents([]))
    part.ctl.journal.add_region("symbiont-mig-m1-src", "m1", "vm1", 1 << 20)
    with pytest.raises(jn.JournalError):
        part.ctl.journal.add_region("symbiont-mig-m1-src", "m2", "vm2", 1 << 20)


def test_ring_always_has_room_for_a_chunk_the_window_admits() -> None:
    """rate.Ring with size window + chunk: random chunk sizes, freed oldest first, at most
    ``window`` bytes held: every allocation fits and no two live ones overlap."""
    import random

    rnd = random.Random(7)
    window, chunk = 64 << 10, 16 << 10
    ring = rate.Ring(window + chunk)
    live: list[tuple[int, int]] = []
    for _ in range(5000):
        n = rnd.choice([0, 1, 100, 4096, chunk, rnd.randint(1, chunk)])
        while sum(max(1, b - a) for a, b in live) + max(1, n) > window:
            ring.release(1)
            live.pop(0)
        at = ring.alloc(n)
        assert at is not None, (n, live)
        assert 0 <= at and at + max(1, n) <= window + chunk
        assert all(at + max(1, n) <= a or b <= at for a, b in live)
        live.append((at, at + max(1, n)))


def test_a_region_that_would_not_unplug_stays_on_the_books_and_is_retried(tmp_path) -> None:
    from symbiont.host.port import HostError

    a, shm_dir, _written = shm_agents(tmp_path)

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], Any]:
        env, part = env_with(tmp_path, a)
        env.host.shm_dir = shm_dir
        env.host.fail["detach_shmem"] = HostError("the guest does not let go")
        await env.start()
        m = await part.ctl.start("vm1", "web", "vm2", predumps=1, chunk=4096, window=16384, channel="shm")
        await part.ctl.tasks[m["id"]]
        kept = part.ctl.journal.regions()
        assert part.ctl.orphan_regions() == []  # not before its retry time
        del env.host.fail["detach_shmem"]
        part.ctl.retry_at.clear()
        await part.ctl.sweep_regions()
        await part.stop()
        return part.ctl.show(m["id"]), kept, part.ctl.journal.regions(), env

    m, kept, after, env = asyncio.run(main())
    assert m["phase"] == "done", m
    assert len(kept) == 2 and os.listdir(shm_dir) == []  # the files go at once, the rows stay
    assert after == [] and ("detach_shmem", "vm2", f"symbiont-mig-{m['id']}-dst") in env.host.calls
