"""The memory part and host paging in one period, as ``profile: overcommit`` runs them (issue 15):
the balloon first, then host paging of what it left above the budget — never from the VM the
balloon is giving memory to or whose guest is under pressure, lowest ρ/u first, and the plan
in the decision log with every VM's inputs and reason."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from symbiont.config import Config
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.host.procmem import Mapping
from symbiont.memory.config import MemoryConfig
from symbiont.memory.part import MemoryPart
from symbiont.paging.config import PagingConfig
from symbiont.paging.part import PagingPart
from tests.fakes import Env, FakeAgents

MIB = 1 << 20
RAM = 0x7F0000000000
PIDS = {"hungry": 11, "idle": 22}


def agent(total_mib: int, avail_mib: int) -> dict[str, Any]:
    return {"meminfo": {"MemTotal": total_mib * MIB, "MemAvailable": avail_mib * MIB},
            "psi": {"memory": {"some_avg10": 0.0}}}


def _env(tmp_path: Path) -> Env:
    """Two 512 MiB guests fully resident under an 800 MiB budget: 'hungry' allocating (its guest
    short of memory, its working-set sample still small: what it allocated is not re-touched
    yet, so it looks the coldest) and 'idle' (20 MiB working set)."""
    cfg = Config(state_dir=str(tmp_path))
    cfg.paging = PagingConfig(enabled=True, zram_size_mib=256, auto_pageout=True, margin_mib=64)
    host = FakeHost(*(FakeDomain(vm, qemu_pid=pid, memstats_kib={"actual": 512 << 10}) for vm, pid in PIDS.items()))
    for i, pid in enumerate(PIDS.values()):
        host.add_process(pid, [Mapping(RAM + (i << 36), RAM + (i << 36) + 512 * MIB, "rw-p", "")])
    wss = {"hungry": 40, "idle": 20}
    agents = FakeAgents({"memory.wss-sample": lambda vm, _a: {"referenced_bytes": wss[vm] * MIB,
                                                              "resident_bytes": 512 * MIB, "interval_s": 2.0},
                         "memory.balloon-prepare": lambda vm, a: {"freed_mib": a["release_mib"]}})
    env = Env(tmp_path, cfg=cfg, host=host, agents=agents)
    env.add(MemoryPart, MemoryConfig(enabled=True, budget_mib=800, free_target_mib=0, max_step_mib=64,
                                     pressure_grant_mib=64))
    env.add(PagingPart)
    env.register("hungry", {"memory": {"min_mib": 128}}, snapshot=env.snapshot_of("hungry", agent(470, 20)))
    env.register("idle", {"memory": {"min_mib": 128}}, snapshot=env.snapshot_of("idle", agent(470, 400)))
    return env


def test_host_paging_spares_the_vm_under_pressure_and_logs_its_plan(tmp_path: Path) -> None:
    async def go() -> None:
        env = _env(tmp_path)
        await env.start()
        await env.period()
        # the balloon: the idle VM pays (one 64 MiB step), the hungry one is not shrunk
        assert ("set_balloon", "idle", 448 << 10) in env.host.calls
        assert not [c for c in env.host.calls if c[:2] == ("set_balloon", "hungry") and c[2] < 512 << 10]
        # host paging: 1024 − 64 resident over 800 MiB; only from 'idle', though 'hungry' looks colder
        pageouts = [c for c in env.host.calls if c[0] == "pageout"]
        assert pageouts and {c[1] for c in pageouts} == {PIDS["idle"]}, pageouts
        plan = [d for d in env.store.decisions() if d["part"] == "paging" and d["action"] == "pageout-plan"]
        assert len(plan) == 1
        reasons, vms = plan[0]["outcome"]["reasons"], plan[0]["inputs"]["vms"]
        assert "under memory pressure" in reasons["hungry"] and reasons["idle"].startswith("page out")
        assert vms["hungry"]["pressure"] is True and vms["hungry"]["cold_mib"] > vms["idle"]["cold_mib"]
        assert plan[0]["outcome"]["pageouts"] == [["idle", 160]] and plan[0]["inputs"]["shortfall_mib"] == 160
        po = [d for d in env.store.decisions() if d["action"] == "pageout"]
        assert [d["vm"] for d in po] == ["idle"] and "lowest ρ/u first" in po[0]["inputs"]["reason"]
        assert all(d["inputs"] for d in env.store.decisions()), "a decision without its inputs"
        env.close()
    asyncio.run(go())


def test_host_paging_spares_a_guest_that_is_allocating_before_it_shows_pressure(tmp_path: Path) -> None:
    async def go() -> None:
        env = _env(tmp_path)
        env.core.snapshots["hungry"] = env.snapshot_of("hungry", agent(470, 300))  # no pressure yet
        await env.start()
        await env.period()
        first = {c[1] for c in env.host.calls if c[0] == "pageout"}
        assert PIDS["idle"] in first  # the idle VM, lowest ρ, pays first
        env.host.calls.clear()
        # a budget cut the balloon cannot follow in one step, more than the idle VM has cold; the
        # hungry guest allocates (+100 MiB used), still without pressure: the rest is left over
        env.parts["memory"].set_policy({"budget_mib": 400})  # type: ignore[attr-defined]
        env.core.snapshots["hungry"] = env.snapshot_of("hungry", agent(470, 200))
        await env.period()
        assert {c[1] for c in env.host.calls if c[0] == "pageout"} == {PIDS["idle"]}, env.host.calls
        plan = [d for d in env.store.decisions() if d["action"] == "pageout-plan"][-1]
        assert plan["outcome"]["left_mib"] > 0 and plan["outcome"]["pageouts"] == [["idle", 256]]
        assert "allocating (used memory +100 MiB" in plan["outcome"]["reasons"]["hungry"]
        assert plan["inputs"]["vms"]["hungry"]["used_rise_mib"] == 100
        env.close()
    asyncio.run(go())
