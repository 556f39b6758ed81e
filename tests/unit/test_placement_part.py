"""The placement part against the shared fakes (tests/fakes.py): its live inventory read through
its context (host port, core snapshots, stored samples, the memory part's floors, the ledger's
balloon originals), plan execution with migrations through a stand-in for host/migrate.py's
RemoteLibvirt, decisions and progress kept per part (no module state), and its periods."""

from __future__ import annotations

import asyncio
from typing import Any

from symbiont.config import load_config
from symbiont.host.fake import FakeDomain
from symbiont.memory.part import MemoryPart
from symbiont.part import order
from symbiont.placement.execute import MoveSpec
from symbiont.placement.part import PlacementPart
from symbiont.plugins import part_classes
from tests.fakes import Env


def env_for(tmp_path, **placement: Any) -> tuple[Env, PlacementPart]:
    cfg = load_config(None, {"state_dir": str(tmp_path), "placement": {"host_id": "me", **placement}})
    env = Env(tmp_path, FakeDomain("vm1", memory_kib=1 << 20, max_memory_kib=1 << 20, vcpus=2), cfg=cfg)
    env.add(MemoryPart)
    part = env.add(PlacementPart)
    return env, part


def test_discovered_after_the_memory_part_it_requires() -> None:
    classes = part_classes()
    assert classes["placement"] is PlacementPart and PlacementPart.requires == ("memory",)
    names = order(classes)
    assert names.index("memory") < names.index("placement")


def test_inventory_through_the_context(tmp_path) -> None:
    env, part = env_for(tmp_path, overcommit={"cpu": 2.0})

    async def run() -> None:
        await env.start()
        env.register("vm1", {"memory": {"min_mib": 128}})
        t0 = env.store.get_vm("vm1").registered_at  # the inventory counts samples since registration
        env.store.add_samples([(t0 + t, "vm1", "libvirt", {"state": "running", "vcpus": 2, "memory_mib": 1024,
                                                             "qemu_cpu_percent": 50.0, "memstats_kib": {"rss": 1 << 19}})
                               for t in range(4)])
        # The memory part shrinks the balloon through the ledger: the original is the full size.
        await env.knobs.turn("memory", "vm1", "balloon_mib", "", 512)
        await env.period()

    asyncio.run(run())
    assert env.host.domains["vm1"].memory_kib == 512 << 10  # the ledger's write went through the fake host
    inv = part.inventory(3)
    host = inv["host"]
    # Capacity is the host port's (FakeHost: 2 CPUs, 24 GiB), with the configured overcommit.
    assert host["id"] == "me" and host["capacity"] == {"cpu": 2.0, "mem": 24.0} and host["overcommit"] == {"cpu": 2.0}
    assert host["vms"] == [{"id": "vm1", "demand": {"cpu": 2.0, "mem": 1.0}}]
    assert inv["usage"]["black-box"]["vm1"] == [[0.5, 0.5]] * 3  # the last 3 stored samples
    act = inv["activity"]["vm1"]
    assert act["full_mem_mib"] == 1024.0 and act["min_mib"] == 128.0  # the ledger's saved original
    assert act["floor_mib"] == env.parts["memory"].floor("vm1").floor_mib  # the memory part's floor
    # Placement turns no knob of its own: the only ledger row is the memory part's.
    assert [(r["kind"], r["part"]) for r in env.knobs.rows()] == [("balloon_mib", "memory")]
    assert part.status() == {"hosts": 0, "migrations_running": 0}


class FakeRemote:
    """Stands in for symbiont.host.migrate.RemoteLibvirt: where domains are, and the migration."""

    def __init__(self, part: PlacementPart, world: dict[str, dict[str, str]]) -> None:
        self.part, self.world = part, world
        self.seen_progress: dict[str, Any] = {}
        self.closed = False

    def state(self, uri: str, vm: str) -> str | None:
        return self.world.get(uri, {}).get(vm)

    def migratable_xml(self, uri: str, vm: str) -> str:
        return f"<domain><name>{vm}</name><devices/></domain>"

    def migrate(self, src: str, dst: str, vm: str, dxml: str, migrate_uri: str, unsafe: bool, progress) -> dict:
        progress(60.0, 100.0)
        self.seen_progress = self.part.migrations()  # what GET /migrations shows meanwhile
        self.world[dst][vm] = self.world[src].pop(vm)
        return {"memory_total_bytes": 100, "memory_processed_bytes": 100, "iterations": 1}

    def close(self) -> None:
        self.closed = True


def test_execute_logs_decisions_and_keeps_progress_in_the_part(tmp_path) -> None:
    hosts = [{"id": "A", "libvirt_uri": "test:///a"}, {"id": "B", "libvirt_uri": "test:///b"}]
    env, part = env_for(tmp_path, hosts=hosts, migrate_unsafe=True)
    env2, other = env_for(tmp_path / "second", hosts=hosts)  # a second daemon in this process
    world = {"test:///a": {"vm1": "running"}, "test:///b": {}}
    remote = FakeRemote(part, world)
    part.remote = lambda: remote
    steps = [MoveSpec("vm1", "A", "B", "idle")]
    with part.executor() as ex:
        assert ex.check(steps)[0]["vm"] == "vm1"
        (res,) = ex.execute(steps)
    assert remote.closed and res["ok"] and world == {"test:///a": {}, "test:///b": {"vm1": "running"}}
    assert remote.seen_progress["vm1"]["processed_bytes"] == 60.0
    assert other.migrations() == {}  # progress is the part's, not the module's
    part.finished(["vm1"])
    assert part.migrations() == {}
    (d,) = env.store.decisions()
    assert (d["part"], d["action"], d["vm"], d["inputs"]["unsafe"]) == ("placement", "migrate", "vm1", True)
    assert d["outcome"]["ok"] and env2.store.decisions() == []
