"""The cpu part's controller against the shared fakes: the period (shares, protect, rebalance),
the hot-plug wait loop, scaling without a cooperative agent, and what the ledger restores."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from symbiont.cpu.part import HOLD, SHARES, VCPUS, CpuPart, qemu_shares
from symbiont.errors import Conflict
from symbiont.host.fake import FakeDomain
from symbiont.memory.config import MemoryConfig
from symbiont.memory.part import MemoryPart
from tests.fakes import Env, FakeAgents

MIB = 1 << 20


class Guest:
    """A guest whose hot-plugged CPUs appear a few polls after libvirt's call (ACPI under TCG)."""

    def __init__(self, dom: FakeDomain, lag: int = 2) -> None:
        self.dom, self.lag, self.online, self.present = dom, lag, [0], 1
        self.polls = 0

    def stats(self, _vm: str, _args: dict[str, Any]) -> dict[str, Any]:
        if self.present < self.dom.vcpus:
            self.polls += 1
            if self.polls >= self.lag:
                self.present = self.dom.vcpus
        return {"cpus": {"online": list(self.online), "present": list(range(self.present)),
                         "count_online": len(self.online)},
                "meminfo": {"MemTotal": 480 * MIB, "MemAvailable": 400 * MIB}}

    def online_cpus(self, _vm: str, args: dict[str, Any]) -> dict[str, Any]:
        target = args.get("target") or self.present
        self.online = list(range(min(target, self.present)))
        return {"online": list(self.online), "present": list(range(self.present))}


@pytest.fixture
def env(tmp_path):
    dom = FakeDomain("vm1", vcpus=1, max_vcpus=4)
    guest = Guest(dom)
    agents = FakeAgents({"core.stats": guest.stats, "cpu.online": guest.online_cpus,
                         "cpu.container-protect": {"protected": []},
                         "cpu.container-rebalance": {"applied": True, "seconds": 0.01},
                         "cpu.container-reclaim": {"freed": 64 * MIB},
                         "cpu.container-release": {"restored_memory_high": {}}})
    e = Env(tmp_path, dom, agents=agents)
    e.register("vm1", {"cpu": {"weight": 50}, "memory": {}})
    e.add(MemoryPart, MemoryConfig())
    e.add(CpuPart)
    e.guest = guest  # type: ignore[attr-defined]
    yield e
    e.close()


def test_scale_up_waits_for_the_hot_plugged_cpus_then_onlines_them(env) -> None:
    cpu: CpuPart = env.parts["cpu"]  # type: ignore[assignment]
    out = asyncio.run(cpu.scale("vm1", 3))
    assert out["mechanism"] == "hotplug" and out["after"]["online"] == [0, 1, 2]
    assert env.host.calls == [("set_vcpus", "vm1", 3)]
    assert env.guest.polls >= 2  # it waited for the ACPI hot-plug to reach the guest
    row = env.knobs.get("vm1", VCPUS)
    assert (row["original"], row["current"]) == (1, 3)
    # The ledger restores it by offlining in the guest (no libvirt unplug under TCG).
    asyncio.run(env.knobs.restore(vm="vm1"))
    assert env.guest.online == [0] and env.host.calls == [("set_vcpus", "vm1", 3)]


def test_without_a_cooperative_agent_only_a_hot_plug(env) -> None:
    cpu: CpuPart = env.parts["cpu"]  # type: ignore[assignment]
    env.agents.down.add("vm1")
    assert asyncio.run(cpu.scale("vm1", 2))["mechanism"] == "hotplug"
    with pytest.raises(Conflict, match="no cooperative agent"):
        asyncio.run(cpu.scale("vm1", 1))
    assert env.host.calls == [("set_vcpus", "vm1", 2)]


def test_the_period_sets_qemu_shares_protects_and_rebalances_on_a_change(env) -> None:
    snap = env.snapshot_of("vm1", agent={"cpus": {"online": [0]}})
    env.core.snapshots["vm1"] = snap
    asyncio.run(env.period())
    assert env.host.domains["vm1"].schedinfo["cpu_shares"] == qemu_shares(50) == 512
    assert env.knobs.get("vm1", SHARES)["original"] == 1024
    assert env.agents.ops().count("cpu.container-protect") == 1 and "cpu.container-rebalance" not in env.agents.ops()
    snap["agent"]["cpus"]["online"] = [0, 1]  # onlined by other means (udev, symbiont vm vcpus)
    asyncio.run(env.period())
    assert env.agents.ops().count("cpu.container-rebalance") == 1
    assert ("set_schedinfo", "vm1", {"cpu_shares": 512}) == env.host.calls[0] and len(env.host.calls) == 1
    asyncio.run(env.knobs.restore(vm="vm1"))
    assert env.host.domains["vm1"].schedinfo["cpu_shares"] == 1024


def test_a_reclaim_hold_is_a_ledger_knob_lifted_on_restore(env) -> None:
    cpu: CpuPart = env.parts["cpu"]  # type: ignore[assignment]
    env.core.snapshots["vm1"] = env.snapshot_of("vm1", agent={"meminfo": {"MemTotal": 480 * MIB,
                                                                          "MemAvailable": 400 * MIB}})
    out = asyncio.run(cpu.balloon("vm1", 400))
    assert out["reclaim"]["freed"] == 64 * MIB and env.host.domains["vm1"].memory_kib == 400 << 10
    assert env.knobs.get("vm1", HOLD)["current"] == "held"
    asyncio.run(env.knobs.restore(vm="vm1", reason="unregistered"))
    assert env.agents.ops()[-1] == "cpu.container-release" and env.knobs.rows() == []
    assert env.host.domains["vm1"].memory_kib == 512 << 10  # the balloon too, by the memory part's kind
