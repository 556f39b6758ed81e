"""The memory part's controller, observe → decide → act, against the shared fakes (no VM)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from symbiont.errors import AgentTimeout
from symbiont.host.fake import FakeDomain
from symbiont.host.port import HostError
from symbiont.memory.config import MemoryConfig
from symbiont.memory.part import MemoryPart
from symbiont.part import Part
from tests.fakes import Env, FakeAgents

MIB = 1 << 20


def agent(total_mib: int, avail_mib: int, psi: float = 0.0) -> dict[str, Any]:
    return {"meminfo": {"MemTotal": total_mib * MIB, "MemAvailable": avail_mib * MIB},
            "psi": {"memory": {"some_avg10": psi}}, "cpus": {"count_online": 1}}


def wss(vm: str, _args: dict[str, Any]) -> dict[str, Any]:
    return {"referenced_bytes": (400 if vm == "hungry" else 20) * MIB, "resident_bytes": 100 * MIB, "interval_s": 2.0}


@pytest.fixture
def env(tmp_path):
    agents = FakeAgents({"memory.wss-sample": wss,
                         "memory.balloon-prepare": lambda vm, a: {"freed_mib": a["release_mib"]}})
    e = Env(tmp_path,
            FakeDomain("hungry", memory_kib=512 << 10, max_memory_kib=1024 << 10, memstats_kib={"actual": 512 << 10}),
            FakeDomain("idle", memory_kib=1024 << 10, max_memory_kib=1024 << 10, memstats_kib={"actual": 1024 << 10}),
            agents=agents)
    e.register("hungry", {"memory": {}}, snapshot=e.snapshot_of("hungry", agent(470, 20, psi=30.0)))
    e.register("idle", {"memory": {}}, snapshot=e.snapshot_of("idle", agent(980, 900)))
    yield e
    e.close()


def test_pressure_moves_memory_from_the_idle_vm_shrink_first_guest_prepared(env) -> None:
    part = env.add(MemoryPart, MemoryConfig(enabled=True, budget_mib=1536))
    period = asyncio.run(env.period())
    views = {v.name: v for v in period.observations["memory"].views}
    assert views["hungry"].pressure and not views["idle"].pressure
    # The idle VM gives first (its guest freed the memory its own way), then the hungry one gets it.
    assert env.host.calls == [("set_balloon", "idle", 960 << 10), ("set_balloon", "hungry", 576 << 10)]
    prepare = [c for c in env.agents.calls if c[1] == "memory.balloon-prepare"]
    assert prepare == [("idle", "memory.balloon-prepare", {"release_mib": 64})]
    rows = {r["vm"]: r for r in env.knobs.rows()}
    assert (rows["idle"]["original"], rows["idle"]["current"]) == (1024, 960)
    assert (rows["hungry"]["original"], rows["hungry"]["current"]) == (512, 576)
    # The next period starts from the ledger's targets (the snapshot lags): it goes on, one grant each.
    asyncio.run(env.period())
    assert env.host.calls[-1] == ("set_balloon", "hungry", 640 << 10)
    assert {r["vm"]: r["original"] for r in env.knobs.rows()} == {"hungry": 512, "idle": 1024}  # first kept
    actions = [(d["part"], d["action"], d["vm"]) for d in env.store.decisions()]
    assert ("memory", "policy", "idle") in actions and ("memory", "balloon", "hungry") in actions
    assert part.state.periods == 2 and part.state.vms["idle"].last["target_mib"] == 896


def test_disabled_it_samples_working_sets_and_moves_nothing(env) -> None:
    part = env.add(MemoryPart, MemoryConfig(enabled=False, budget_mib=1536))
    period = asyncio.run(env.period())
    assert period.observations["memory"] is None and env.host.calls == [] and env.knobs.rows() == []
    assert sorted(env.agents.ops()) == ["memory.wss-sample", "memory.wss-sample"]
    assert part.state.vms["hungry"].estimate.known == pytest.approx(400)
    part.set_policy({"enabled": True})
    asyncio.run(env.period())
    assert len(env.host.calls) == 2


def test_a_failed_inflation_holds_the_grants_back(env) -> None:
    env.add(MemoryPart, MemoryConfig(enabled=True, budget_mib=1536))
    env.host.fail["set_balloon"] = HostError("libvirt: balloon driver gone")
    asyncio.run(env.period())
    assert env.host.calls == [] and env.knobs.rows() == []  # no grant without the memory paid for it
    del env.host.fail["set_balloon"]
    asyncio.run(env.period())
    assert [c[1] for c in env.host.calls] == ["idle", "hungry"]


def test_a_slow_guest_prepare_does_not_stop_the_balloon(env) -> None:
    env.agents.replies["memory.balloon-prepare"] = AgentTimeout("idle: did not answer in time")
    env.add(MemoryPart, MemoryConfig(enabled=True, budget_mib=1536))
    asyncio.run(env.period())
    assert env.host.calls[0] == ("set_balloon", "idle", 960 << 10)
    policy = [d for d in env.store.decisions("idle") if d["action"] == "policy"]
    assert "did not answer" in policy[0]["outcome"]["prepared"]["error"]


def test_the_dedup_parts_sharing_gives_u(env) -> None:
    class Dedup(Part):
        name = "dedup"

        def sharing(self, vm: str) -> dict[str, Any] | None:
            return {"unshared_fraction": 0.25} if vm == "idle" else None

    env.add(Dedup)
    part = env.add(MemoryPart, MemoryConfig(enabled=True, budget_mib=1536))
    env.parts = {"dedup": env.parts["dedup"], "memory": part}
    part.ctx._parts = env.parts
    period = asyncio.run(env.period())
    u = {v.name: v.unshared_fraction for v in period.observations["memory"].views}
    assert u == {"hungry": 1.0, "idle": 0.25}


def test_an_unregistered_vm_is_forgotten(env) -> None:
    part = env.add(MemoryPart, MemoryConfig(enabled=False))
    asyncio.run(env.period())
    assert set(part.state.vms) == {"hungry", "idle"}
    asyncio.run(part.vm_removed("idle"))
    assert set(part.state.vms) == {"hungry"}
