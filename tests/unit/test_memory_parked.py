"""The memory part leaves a paused (parked) VM alone: a suspended guest cannot answer a
working-set sample (asking only times out until it is marked uncooperative) and its balloon
must not move while the paging part holds it paused."""

from __future__ import annotations

import asyncio

from symbiont.host.fake import FakeDomain
from symbiont.memory.config import MemoryConfig
from symbiont.memory.part import MemoryPart
from tests.fakes import Env, FakeAgents

MIB = 1 << 20


def test_a_paused_vm_is_neither_sampled_nor_ballooned(tmp_path) -> None:
    agents = FakeAgents({"memory.wss-sample": {"referenced_bytes": 20 * MIB, "resident_bytes": 100 * MIB,
                                               "interval_s": 2.0},
                         "memory.balloon-prepare": lambda vm, a: {"freed_mib": a["release_mib"]}})
    env = Env(tmp_path, FakeDomain("busy", memory_kib=512 << 10, max_memory_kib=1024 << 10),
              FakeDomain("parked", state="paused", memory_kib=1024 << 10, max_memory_kib=1024 << 10), agents=agents)
    meminfo = {"meminfo": {"MemTotal": 470 * MIB, "MemAvailable": 20 * MIB}, "psi": {"memory": {"some_avg10": 30.0}},
               "cpus": {"count_online": 1}}
    env.register("busy", {"memory": {}}, snapshot=env.snapshot_of("busy", meminfo))
    env.register("parked", {"memory": {}}, snapshot=env.snapshot_of("parked"))
    env.add(MemoryPart, MemoryConfig(enabled=True, budget_mib=1536))
    asyncio.run(env.period())
    assert env.agents.ops("parked") == []  # not asked
    assert env.agents.ops("busy") == ["memory.wss-sample"]
    assert all(c[1] != "parked" for c in env.host.calls) and env.knobs.rows("parked") == []
    env.close()
