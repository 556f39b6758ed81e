"""``symbiont status``'s memory table (issue 15 item 3): each MiB of a VM's configured memory in
one place — ballooned, paged out, KSM-shared, private, untouched — QEMU's overhead apart, the
host footprint as PSS + swapped × the tier's cost, and the last lever that moved for the VM."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.config import Config
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.host.procmem import Mapping
from symbiont.host.zram import ZramStats
from symbiont.paging.config import PagingConfig
from symbiont.paging.part import PagingPart
from symbiont.paging.policy import VmMemoryInputs, account
from tests.fakes import Env

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MIB = 1 << 20
RAM, CODE, HEAP = 0x7F0000000000, 0x7E0000000000, 0x7D0000000000
PARTS = ("ballooned_mib", "paged_out_mib", "shared_mib", "private_mib", "untouched_mib")

mib = st.floats(0.0, 8192.0)


@settings(max_examples=400, deadline=None)
@given(st.floats(64.0, 8192.0), st.none() | mib, mib, mib, st.none() | mib, mib, mib, mib, mib,
       st.none() | mib, st.none() | st.floats(0.05, 1.0))
def test_each_configured_mib_is_in_exactly_one_place(c, balloon, res, swp, ksm, cres, cswp, ores, oswp, pss,
                                                     cost) -> None:
    a = account(VmMemoryInputs(c, balloon, None, res, swp, ksm, cres, cswp, ores, oswp, pss, cost))
    assert all(a[k] >= 0 for k in PARTS)  # type: ignore[operator]
    assert math.isclose(sum(a[k] for k in PARTS), c, abs_tol=1e-6)  # type: ignore[misc]
    assert a["shared_mib"] <= min(res, c) + 1e-9  # type: ignore[operator]
    assert a["ballooned_mib"] <= max(0.0, c - balloon) + 1e-9 if balloon is not None else a["ballooned_mib"] == 0
    assert math.isclose(a["qemu_overhead_mib"], cres + ores)  # type: ignore[arg-type]
    base = pss if pss is not None else a["rss_mib"]
    assert math.isclose(a["host_mib"], base + a["swap_mib"] * (cost or 1.0), rel_tol=1e-9)  # type: ignore[operator]


def test_a_stale_ksm_counter_is_clamped_to_resident_never_counted_twice() -> None:
    a = account(VmMemoryInputs(512, 512, None, ram_resident_mib=112.2, ram_swapped_mib=0, ksm_shared_mib=130.6))
    assert a["shared_mib"] == 112.2 and a["private_mib"] == 0 and a["untouched_mib"] == 512 - 112.2


class SmapsHost(FakeHost):
    """A fake host whose QEMU process's smaps answer given resident/swapped sizes per mapping
    (the shared FakeHost counts every non-present page as swapped: no ballooned pages)."""

    def __init__(self, sizes: dict[int, tuple[int, int]], *domains: FakeDomain) -> None:
        super().__init__(*domains)
        self.sizes = sizes  # mapping start -> (rss MiB, swap MiB)

    def process_smaps(self, pid: int) -> list[Any]:
        return [dataclasses.replace(r, rss_kib=self.sizes[r.start][0] << 10, swap_kib=self.sizes[r.start][1] << 10)
                for r in self.procs[pid]]


def _env(tmp_path: Path) -> tuple[Env, PagingPart]:
    cfg = Config(state_dir=str(tmp_path))
    cfg.paging = PagingConfig(enabled=True, zram_size_mib=256, park_observe_s=0.0)
    dom = FakeDomain("vm1", qemu_pid=11, memory_kib=384 << 10, max_memory_kib=512 << 10, pss_kib=230 << 10,
                     ksm_stat={"ksm_merging_pages": 50 * MIB // 4096})
    host = SmapsHost({RAM: (200, 100), CODE: (30, 0), HEAP: (20, 0)}, dom)
    host.add_process(11, [Mapping(RAM, RAM + 512 * MIB, "rw-p", ""), Mapping(CODE, CODE + 64 * MIB, "rwxp", ""),
                          Mapping(HEAP, HEAP + 32 * MIB, "rw-p", "")])
    env = Env(tmp_path, cfg=cfg, host=host)
    part = env.add(PagingPart)
    env.register("vm1", snapshot=env.snapshot_of("vm1", {"meminfo": {"MemTotal": 360 * MIB,
                                                                     "MemAvailable": 250 * MIB}}))
    asyncio.run(env.start())
    env.host.zram[part.device]["stats"] = ZramStats(100 * MIB, 38 * MIB, 40 * MIB, 0, 0, 0, 0, 0)  # type: ignore[index]
    return env, part


def test_memory_status_places_each_mib_once_and_names_the_last_lever(tmp_path: Path) -> None:
    env, part = _env(tmp_path)
    env.store.log_decision("memory", "balloon", "vm1", {"target_mib": 384, "reason": "policy: lowest rho"},
                           {"ok": True})
    env.store.log_decision("agent", "cooperative", "vm1", {"reason": "hello"}, {})  # not a lever
    row = part.memory_status()["vms"][0]
    assert row["state"] == "running" and row["configured_mib"] == 512
    assert (row["paged_out_mib"], row["shared_mib"], row["private_mib"]) == (100, 50, 150)
    assert row["ballooned_mib"] == 128 and row["untouched_mib"] == 84  # 512 − 100 − 200 − 128
    assert sum(row[k] for k in PARTS) == row["configured_mib"]
    assert row["guest_used_mib"] == 110 and row["qemu_overhead_mib"] == 50
    assert row["host_mib"] == 230 + 100 * 0.4  # PSS + swapped × (RAM the tier uses / what it stores)
    assert row["last"]["part"] == "memory" and row["last"]["action"] == "balloon"
    assert row["last"]["reason"] == "policy: lowest rho" and row["last"]["age_s"] >= 0
    env.close()


def test_a_parked_vm_is_shown_parked_with_park_as_its_last_lever(tmp_path: Path) -> None:
    env, part = _env(tmp_path)
    env.host.sizes[RAM] = (200, 300)  # enough swapped for the real park's bookkeeping to be irrelevant
    asyncio.run(part.park("vm1"))
    row = part.memory_status()["vms"][0]
    assert row["state"] == "parked" and row["last"]["part"] == "paging" and row["last"]["action"] == "park"
    from fastapi import FastAPI

    from symbiont.paging.api import router

    app = FastAPI()
    app.state.parts = env.parts
    app.include_router(router, prefix="/v1/paging")
    got = TestClient(app).get("/v1/paging/memory").json()
    assert got["vms"][0]["state"] == "parked" and got["swap_cost"] == 0.4
    env.close()
