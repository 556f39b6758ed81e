"""Idle detection counts only the samples a host took since the VM (re)arrived there.

The lab's ``cluster-consolidation`` run: a parked VM woke, was moved home, and 4 s later was
planned straight back to the idle host (only the controller's cooldown stopped it), because the
home daemon still stored the VM's idle samples from before it was parked and fed them to the idle
detector. Here the home host is the real placement part over the shared fakes (real sqlite
store, real registration) and the plan is the real ``plan_live`` the cluster controller runs."""

from __future__ import annotations

import time
from typing import Any

from symbiont.config import load_config
from symbiont.host.fake import FakeDomain
from symbiont.memory.part import MemoryPart
from symbiont.placement.live import plan_live
from symbiont.placement.part import PlacementPart
from tests.fakes import Env

MIB = 1 << 20


def agent_sample(busy: int, idle: int) -> dict[str, Any]:
    """A sanitised agent sample: cumulative CPU ticks, 30 MiB in use of 1 GiB, one vCPU."""
    return {"meminfo": {"MemTotal": 1024 * MIB, "MemAvailable": 994 * MIB},
            "cpu_times": {"user": busy, "idle": idle}, "cpus": {"count_online": 1}}  # fmt: skip


def quiet(env: Env, t0: float, k: int, ticks: list[int]) -> None:
    """``k`` agent samples 1 s apart from ``t0``, each period 1 busy tick of 100 (1 % CPU)."""
    rows = []
    for i in range(k):
        ticks[0] += 1
        ticks[1] += 99
        rows.append((t0 + i, "vm1", "agent", agent_sample(ticks[0], ticks[1])))
    env.store.add_samples(rows)


def idle_host() -> dict[str, Any]:
    return {"host": {"id": "h3", "capacity": {"cpu": 8.0, "mem": 24.0}, "overcommit": {}, "vms": []},
            "usage": {"black-box": {}, "gray-box": {}}, "activity": {}}  # fmt: skip


def test_vm_moved_home_is_not_parked_again_on_its_stale_idle_samples(tmp_path) -> None:
    cfg = load_config(None, {"state_dir": str(tmp_path), "placement": {"host_id": "h1"}})
    env = Env(tmp_path, FakeDomain("vm1", memory_kib=1 << 20, max_memory_kib=1 << 20, vcpus=1), cfg=cfg)
    env.add(MemoryPart)
    part = env.add(PlacementPart)
    ticks = [0, 0]
    idle = {"idle_host": "h3", "window": 12}
    # vm1 sat idle at home (h1) for 20 samples: parked on h3 (its home registration removed).
    env.register("vm1")
    with env.store.transaction() as db:  # registered 10 minutes ago
        db.execute("UPDATE vms SET registered_at = ? WHERE name = 'vm1'", (time.time() - 600,))
    quiet(env, time.time() - 590, 20, ticks)
    first = plan_live([part.inventory(), idle_host()], idle=idle)
    assert first["moves"] == [{"vm": "vm1", "from": "h1", "to": "h3", "reason": first["moves"][0]["reason"]}]
    env.store.remove_vm("vm1")
    # It woke on h3 and was moved home: registered again on h1; 4 samples since, quiet again.
    time.sleep(0.01)
    env.register("vm1")
    arrived = env.store.get_vm("vm1").registered_at
    quiet(env, arrived + 0.5, 4, ticks)
    inv = part.inventory()
    again = plan_live([inv, idle_host()], idle=idle)
    assert again["moves"] == [] and again["idle"]["actions"] == [], again["idle"]
    # Only the samples since it arrived count: 4 agent samples give 3 CPU figures, not 23.
    assert len(inv["activity"]["vm1"]["cpu"]) == 3
    # Idle for a whole window since it came home: parked again (detection still works).
    quiet(env, arrived + 4.5, 10, ticks)
    later = plan_live([part.inventory(), idle_host()], idle=idle)
    assert [(m["vm"], m["to"]) for m in later["moves"]] == [("vm1", "h3")]
