"""The relay's ``shm`` channel against the fakes: one region per VM (the fake host keeps them as
files, removed once mapped), the source's chunks read from its region, one host copy into the
destination's, the regions kept for the next migration and unplugged when their VM goes or the
daemon stops, a guest's out-of-bounds span failing only its migration, the serial frames when an
agent has no region support, and the journal's region rows letting a restarted daemon unplug
what a killed one left."""

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


def shm_agents(tmp_path: Any, bad_at: int | None = None, stale: bool = False):
    """FakeAgents whose source reads the file into its region (as the agent's ring does) and
    whose destination takes each chunk from its own region at ``at``, CRC checked. The regions'
    files are gone once mapped: the fake guests reach them through the daemon's own mappings
    (``held["ctl"].vm_regions``), as the real ones through their BAR2."""
    a = agents([900 << 10] * 4)  # one pre-dump per migration
    shm_dir = str(tmp_path / "shm")
    os.makedirs(shm_dir, exist_ok=True)
    written: list[bytes] = []
    held: dict[str, Any] = {}

    def mm(vm: str) -> Any:
        return held["ctl"].vm_regions[vm].mm

    def send(vm: str, args: dict[str, Any]) -> dict[str, Any]:
        assert set(args["shm"]) == {"dev", "size", "token"}
        handler = a.streams[(vm, "mig-chunk")]
        ring = rate.Ring(args["shm"]["size"] - HDR)
        region = mm(vm)
        assert region[:16] == bytes.fromhex(args["shm"]["token"])
        if stale:  # a sender of an earlier, aborted migration still running in the guest
            handler({"mid": "20261205-000000-aaaaaa", "path": "img/zz", "off": 0, "len": 5, "crc": 0, "at": 1 << 40},
                    b"junk!")  # fmt: skip
        for off in range(0, len(DATA), 4096):
            part = DATA[off : off + 4096]
            at = ring.alloc(len(part))
            assert at is not None
            region[HDR + at : HDR + at + len(part)] = part
            handler({"mid": args["mid"], "path": "img/x", "off": off, "len": len(part), "crc": zlib.crc32(part),
                     "at": at if bad_at is None else bad_at}, b"")  # fmt: skip
        return {"sent": len(DATA)}

    def recv(vm: str, args: dict[str, Any]) -> Any:
        data = mm(vm)[HDR + args["at"] : HDR + args["at"] + args["len"]]
        if zlib.crc32(data) != args["crc"]:
            return AgentInternal("checksum mismatch, chunk refused")
        written.append(data)
        return {"written": len(data)}

    a.replies.update({"migration.send": send, "migration.recv": recv, "migration.shm": {}})
    return a, shm_dir, written, held


async def _setup(tmp_path: Any, a: Any, shm_dir: str, held: dict[str, Any]) -> tuple[Any, Any]:
    env, part = env_with(tmp_path, a)
    env.host.shm_dir = shm_dir
    held["ctl"] = part.ctl
    await env.start()
    return env, part


async def _migrate(part: Any, src: str = "vm1", dst: str = "vm2", **kw: Any) -> dict[str, Any]:
    m = await part.ctl.start(src, "web", dst, predumps=1, chunk=4096, window=16384, channel="shm", **kw)
    await part.ctl.tasks[m["id"]]
    return part.ctl.show(m["id"])  # type: ignore[no-any-return]


def migrate(tmp_path: Any, a: Any, shm_dir: str, held: dict[str, Any], **kw: Any) -> tuple[dict[str, Any], Any, Any]:
    async def main() -> tuple[dict[str, Any], Any, Any]:
        env, part = await _setup(tmp_path, a, shm_dir, held)
        m = await _migrate(part, **kw)
        await part.stop()
        return m, env, part.ctl

    return asyncio.run(main())


def test_shm_channel_moves_the_bytes_through_one_host_copy_and_keeps_one_region_per_vm(tmp_path) -> None:
    a, shm_dir, written, held = shm_agents(tmp_path)

    async def main() -> tuple[list[dict[str, Any]], Any, Any, list[Any]]:
        env, part = await _setup(tmp_path, a, shm_dir, held)
        m1 = await _migrate(part)
        after1 = (part.ctl.journal.regions(), os.listdir(shm_dir), dict(env.host.shmem))
        m2 = await _migrate(part, "vm2", "vm1")  # back again: the same two regions
        await part.stop()
        return [m1, m2], env, part.ctl, [after1]

    (m1, m2), env, ctl, (after1,) = asyncio.run(main())
    for m in (m1, m2):
        assert m["phase"] == "done", m
        assert m["result"]["channel"] == "shm" and all(r["channel"] == "shm" for r in m["result"]["relay"])
    assert b"".join(written) == DATA * 4  # two migrations, each the pre-copy and the final transfer, intact
    assert a.received and not any(a.received)  # no frame carried a payload
    rows, files, plugged = after1
    # one region per VM (never one in two guests), plugged in at the first migration, its
    # file gone as soon as it was mapped; the second migration plugged nothing in
    assert sorted(r["vm"] for r in rows) == ["vm1", "vm2"] and len({r["name"] for r in rows}) == 2
    assert files == [] and sorted(vm for vm, _ in plugged) == ["vm1", "vm2"]
    assert m1["result"]["shm"]["plugged"] == ["vm1", "vm2"] and m2["result"]["shm"]["plugged"] == []
    assert [c[1] for c in env.host.calls if c[0] == "attach_shmem"] == ["vm1", "vm2"]
    # the daemon's stop took them out: unplugged, journal rows dropped
    assert sorted(c[1] for c in env.host.calls if c[0] == "detach_shmem") == ["vm1", "vm2"]
    assert env.host.shmem == {} and ctl.journal.regions() == [] and os.listdir(shm_dir) == []
    # the source may reuse what the relay took: the credits say how many chunks it copied out
    assert max(x.get("taken", 0) for _, op, x in a.calls if op == "migration.credit") == 3
    for r in m1["result"]["relay"]:  # at most one credit per ack: some folded into a newer one
        assert 1 <= r["credits"] and r["credits"] + r["credits_coalesced"] <= r["relay_chunks"], r


def test_a_span_outside_the_region_fails_that_migration_only(tmp_path) -> None:
    a, shm_dir, written, held = shm_agents(tmp_path, bad_at=(1 << 20) - HDR - 100)
    m, env, ctl = migrate(tmp_path, a, shm_dir, held)
    assert m["phase"] == "aborted" and "outside the region" in m["error"], m
    assert written == []
    assert ("vm1", "migration.resume", {"name": "web", "mid": m["id"]}) in a.calls
    assert ("vm2", "migration.abort", {"mid": m["id"], "name": "web"}) in a.calls
    assert env.host.shmem == {} and ctl.journal.regions() == []


def test_corruption_after_the_relay_check_is_caught_by_the_destination(tmp_path) -> None:
    a, shm_dir, written, held = shm_agents(tmp_path)
    m, _env, ctl = migrate(tmp_path, a, shm_dir, held, fault="corrupt")
    assert m["phase"] == "aborted" and "checksum" in m["error"], m


def test_an_agent_without_regions_gets_the_serial_frames(tmp_path) -> None:
    a = agents([900 << 10])  # no migration.shm: an older agent
    shm_dir = str(tmp_path / "shm")
    m, env, ctl = migrate(tmp_path, a, shm_dir, {})
    assert m["phase"] == "done", m
    assert m["result"]["channel"] == "serial" and "migration.shm" in m["result"]["shm_fallback"]
    assert b"".join(a.received) == DATA * 2
    assert not [c for c in env.host.calls if c[0] == "attach_shmem"] and ctl.journal.regions() == []


def test_a_restarted_daemon_unplugs_the_regions_a_killed_one_left(tmp_path) -> None:
    a = agents([])
    a.replies["migration.shm"] = {}

    async def main() -> tuple[Any, Any, list[dict[str, Any]]]:
        env, part = env_with(tmp_path, a)
        env.host.shm_dir = str(tmp_path)
        j = jn.Journal(env.store)
        j.create("m1", "vm1", "web", "vm2", "relay", "adaptive", {"channel": "shm"})
        j.move("m1", "check")
        for vm, name in (("vm1", "symbiont-mig-aa"), ("vm2", "symbiont-mig-bb")):  # killed after plugging
            j.add_region(name, "m1", vm, 1 << 20)
            env.host.attach_shmem(vm, name, 1 << 20)
        await env.start()
        await part.recovery  # type: ignore[misc]
        rows = j.regions()
        await part.stop()
        return env, j, rows

    env, j, rows = asyncio.run(main())
    assert ("detach_shmem", "vm1", "symbiont-mig-aa") in env.host.calls
    assert ("detach_shmem", "vm2", "symbiont-mig-bb") in env.host.calls
    assert rows == [] and env.host.shmem == {}
    assert not [n for n in os.listdir(tmp_path) if n.startswith("symbiont-mig-")]
    assert (j.get("m1") or {})["phase"] == "aborted"


def test_a_region_goes_with_its_vm_and_one_that_would_not_unplug_is_retried(tmp_path) -> None:
    from symbiont.host.port import HostError

    a, shm_dir, _written, held = shm_agents(tmp_path)

    async def main() -> dict[str, Any]:
        env, part = await _setup(tmp_path, a, shm_dir, held)
        m = await _migrate(part)
        assert m["phase"] == "done", m
        env.store.remove_vm("vm2")  # unregistered: its region goes at the next sweep
        env.host.fail["detach_shmem"] = HostError("the guest does not let go")
        await part.ctl.sweep_regions()
        out = {"after_fail": [r["vm"] for r in part.ctl.journal.regions()],
               "held_after_fail": sorted(part.ctl.vm_regions)}  # fmt: skip
        assert part.ctl.orphan_regions() == []  # not before its retry time
        del env.host.fail["detach_shmem"]
        part.ctl.retry_at.clear()
        await part.ctl.sweep_regions()
        out["after_retry"] = [r["vm"] for r in part.ctl.journal.regions()]
        out["plugged"] = sorted(vm for vm, _ in env.host.shmem)
        await part.stop()
        return out

    out = asyncio.run(main())
    assert sorted(out["after_fail"]) == ["vm1", "vm2"] and out["held_after_fail"] == ["vm1"]
    assert out["after_retry"] == ["vm1"] and out["plugged"] == ["vm1"]  # vm1's own stays for its next one


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


def test_shm_is_the_relay_default_and_only_the_relay_has_channels(tmp_path) -> None:
    import pytest

    from symbiont.errors import Invalid

    a, shm_dir, _written, held = shm_agents(tmp_path)

    async def main() -> dict[str, Any]:
        env, part = await _setup(tmp_path, a, shm_dir, held)
        for kw in ({"path": "network", "channel": "shm"}, {"path": "network", "channel": "serial"},
                   {"channel": "pigeon"}):  # fmt: skip
            with pytest.raises(Invalid, match="channel"):
                await part.ctl.start("vm1", "web", "vm2", **kw)
        m = await part.ctl.start("vm1", "web", "vm2", predumps=1, chunk=4096, window=16384)
        await part.ctl.tasks[m["id"]]
        await part.stop()
        return part.ctl.show(m["id"])

    m = asyncio.run(main())
    assert m["params"]["channel"] == "shm" and m["result"]["channel"] == "shm" and m["phase"] == "done", m


def test_a_stale_sender_of_an_earlier_migration_is_ignored(tmp_path) -> None:
    a, shm_dir, written, held = shm_agents(tmp_path, stale=True)
    m, _env, _ctl = migrate(tmp_path, a, shm_dir, held)
    assert m["phase"] == "done", m
    assert [r["foreign_chunks"] for r in m["result"]["relay"]] == [1, 1]
    assert b"".join(written) == DATA * 2
