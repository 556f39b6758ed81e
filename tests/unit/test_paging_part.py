"""The paging part against the shared fakes: the tier's life cycle through the host port,
page-out sized by the host and chosen by the guest, park as a ledger knob that the ledger
resumes on VM removal, wake with its prefetch."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from symbiont.config import Config
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.host.pageout import PAGE_SIZE
from symbiont.host.procmem import Mapping
from symbiont.paging.config import PagingConfig
from symbiont.paging.part import KIND, PagingPart, tier_label
from tests.fakes import Env, FakeAgents

MIB = 1 << 20
RAM = 0x7F0000000000
CODE = 0x7E0000000000
HEAP = 0x7D0000000000
PID = 4242


def _env(tmp_path: Path, agents: dict | None = None, **paging: object) -> tuple[Env, PagingPart]:
    cfg = Config(state_dir=str(tmp_path))
    cfg.paging = PagingConfig(**{"enabled": True, "zram_size_mib": 256, "park_observe_s": 0.0, **paging})  # type: ignore[arg-type]
    host = FakeHost(FakeDomain("vm1", qemu_pid=PID))
    host.add_process(PID, [Mapping(RAM, RAM + 512 * MIB, "rw-p", ""), Mapping(CODE, CODE + 64 * MIB, "rwxp", ""),
                           Mapping(HEAP, HEAP + 16 * MIB, "rw-p", "")])
    env = Env(tmp_path, cfg=cfg, host=host, agents=FakeAgents(agents or {}))
    part = env.add(PagingPart)
    env.register("vm1")
    return env, part  # type: ignore[return-value]


def run(fn: Callable[[Path], Coroutine[Any, Any, None]]) -> Callable[[Path], None]:
    """A plain test that runs the coroutine (no async plugin here)."""
    @functools.wraps(fn)
    def test(tmp_path: Path) -> None:
        asyncio.run(fn(tmp_path))
    return test


def _resident_mib(env: Env, start: int) -> float:
    return float(env.host.present[(PID, start)].sum()) * PAGE_SIZE / MIB


@run
async def test_tier_made_at_start_removed_at_stop_and_adopted_after_a_kill(tmp_path: Path) -> None:
    env, part = _env(tmp_path)
    await env.start()
    assert [c[0] for c in env.host.calls] == ["zram_create"] and part.device == 0
    assert env.store.query("SELECT state FROM paging_tier")[0]["state"] == "on"
    # a daemon killed here: a new part on the same store and host adopts the device, makes none
    again = PagingPart(env.ctx("paging", ("memory",)), env.cfg.paging)
    await again.start()
    assert again.device == 0 and [c[0] for c in env.host.calls] == ["zram_create"]
    assert "tier-recover" in [d["action"] for d in env.store.decisions()]
    await again.stop()
    assert env.host.calls[-1] == ("zram_remove", 0) and env.host.zram == {}
    assert env.store.query("SELECT * FROM paging_tier") == []


@run
async def test_tier_slots_and_ram_limit_are_sized_apart_and_a_new_limit_is_not_adopted(tmp_path: Path) -> None:
    """disksize (slots) and mem_limit (RAM) are separate keys: zero-filled guest pages take a
    slot each but no RAM, so a tier sized by RAM filled up with slots (docs/paging.md)."""
    env, part = _env(tmp_path, zram_size_mib=2048, zram_mem_limit_mib=512)
    await env.start()
    assert env.host.zram[0]["disksize"] == 2048 * MIB and env.host.zram[0]["mem_limit"] == 512 * MIB
    assert env.store.query("SELECT mem_limit_bytes FROM paging_tier")[0]["mem_limit_bytes"] == 512 * MIB
    # killed; restarted with another RAM limit: the device is not what the config asks for
    again = PagingPart(env.ctx("paging", ("memory",)), PagingConfig(enabled=True, zram_size_mib=2048,
                                                                    zram_mem_limit_mib=1024, park_observe_s=0.0))
    await again.start()
    rec = [d for d in env.store.decisions() if d["action"] == "tier-recover"][-1]
    assert rec["outcome"]["action"] == "removed" and "RAM limit" in rec["outcome"]["reason"]
    assert [c[0] for c in env.host.calls] == ["zram_create", "zram_remove", "zram_create"]
    assert env.host.zram[again.device]["mem_limit"] == 1024 * MIB
    await again.stop()


@run
async def test_the_derived_ram_limit_is_the_size_capped_at_half_the_host(tmp_path: Path) -> None:
    env, part = _env(tmp_path, zram_size_mib=2048)
    env.host.meminfo["MemTotal"] = 3 * 1024 * 1024  # KiB: a 3 GiB host; half is 1536 MiB
    await env.start()
    assert env.host.zram[0]["disksize"] == 2048 * MIB and env.host.zram[0]["mem_limit"] == 1536 * MIB
    await part.stop()
    env2, part2 = _env(tmp_path / "b", zram_size_mib=256)
    await env2.start()
    assert env2.host.zram[0]["mem_limit"] == 256 * MIB  # never above the tier's own size
    await part2.stop()


@run
async def test_a_tier_recorded_before_the_limit_had_its_own_column_is_adopted(tmp_path: Path) -> None:
    """An earlier daemon's schema had no mem_limit_bytes and wrote mem_limit = disksize: its
    tier is adopted by a config that asks for the same (no swap-in storm at upgrade)."""
    import sqlite3

    env, part = _env(tmp_path, zram_size_mib=256)
    env.store.ensure_schema("CREATE TABLE paging_tier (id INTEGER PRIMARY KEY CHECK (id = 1), device INTEGER NOT "
                            "NULL, label TEXT NOT NULL, size_bytes INTEGER NOT NULL, compressor TEXT NOT NULL, "
                            "priority INTEGER NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL)")
    num = env.host.zram_create(256 * MIB, "lzo-rle", tier_label(str(tmp_path)), 100)
    with env.store.transaction() as db:
        db.execute("INSERT INTO paging_tier VALUES (1, ?, ?, ?, 'lzo-rle', 100, 'on', 0)",
                   (num, tier_label(str(tmp_path)), 256 * MIB))
    await env.start()
    assert part.device == num and [c[0] for c in env.host.calls] == ["zram_create"]
    with pytest.raises(sqlite3.IntegrityError):  # the column exists now, with its constraint
        with env.store.transaction() as db:
            db.execute("UPDATE paging_tier SET mem_limit_bytes = NULL")
    await part.stop()


@run
async def test_pageout_takes_resident_minus_working_set_guest_free_first(tmp_path: Path) -> None:
    cold = {"page_size": PAGE_SIZE, "free": [[0, 100 * MIB // PAGE_SIZE]], "cold": []}
    env, part = _env(tmp_path, {"paging.cold": cold, "memory.wss-sample": {"referenced_bytes": 128 * MIB,
                                                                      "resident_bytes": 400 * MIB, "interval_s": 5.0}},
                     margin_mib=64)
    await env.start()
    out = await part.pageout_vm("vm1")
    # 512 resident − (128 working set + 64 margin) = 320 MiB, the guest's 100 free MiB first
    assert out["paged_mib"] == 320.0 and out["by_source_mib"]["guest-free"] == 100.0
    assert _resident_mib(env, RAM) == 192.0
    assert env.host.present[(PID, RAM)][:100 * MIB // PAGE_SIZE].sum() == 0  # the free frames went
    assert _resident_mib(env, CODE) == 64.0  # a page-out touches guest RAM only
    d = env.store.decisions()[-1]
    assert d["action"] == "pageout" and d["inputs"]["guest"]["wss_mib"] == 128.0
    assert d["inputs"]["guest"]["source"] == "memory.wss-sample"


@run
async def test_park_is_a_knob_the_ledger_resumes_on_removal(tmp_path: Path) -> None:
    env, part = _env(tmp_path, {"core.ping": {}})
    await env.start()
    out = await part.park("vm1")
    assert env.host.domains["vm1"].state == "paused"
    assert out["after"]["rss_mib"] == 0.0  # guest RAM, code cache and QEMU's heap all paged out
    assert [(r["kind"], r["original"], r["current"]) for r in env.knobs.rows("vm1")] == [(KIND, "running", "paused")]
    assert part.parked_vms() == {"vm1"}
    with pytest.raises(Exception, match="already parked"):
        await part.park("vm1")
    # unregistering: the ledger restores (resumes), then the part forgets the record
    await env.knobs.restore(vm="vm1", reason="unregistered")
    await part.vm_removed("vm1")
    assert env.host.domains["vm1"].state == "running" and ("resume", "vm1") in env.host.calls
    assert part.parked_vms() == set() and env.knobs.rows("vm1") == []


@run
async def test_wake_prefetches_the_recorded_working_set_then_pings(tmp_path: Path) -> None:
    env, part = _env(tmp_path, {"core.ping": {}})
    await env.start()
    await part.park("vm1")
    # what the request brought back while parking: pretend 8 MiB of RAM came back
    with part.ctx.store.transaction() as db:
        db.execute("UPDATE paging_parked SET ranges = ? WHERE vm = 'vm1'", (f"[[{RAM}, {8 * MIB}]]",))
    out = await part.wake("vm1", prefetch=True, mode="touch")
    assert out["answered"] and out["prefetched_mib"] == 8.0
    assert _resident_mib(env, RAM) == 8.0 and env.host.domains["vm1"].state == "running"
    assert env.knobs.rows("vm1") == [] and part.parked_vms() == set()
    assert env.agents.ops("vm1")[-1] == "core.ping"
    with pytest.raises(Exception, match="not parked"):
        await part.wake("vm1")


@run
async def test_park_records_only_pages_that_went_out_and_came_back(tmp_path: Path) -> None:
    """KSM-merged pages are never paged out (MADV_PAGEOUT skips pages mapped more than once):
    resident after the observe window without being touched, they are not the working set
    (the density run recorded ~515 MiB of them per clone, prefetched at every wake)."""
    merged = (RAM, 100 * MIB)  # the guest RAM KSM shares with other VMs
    touched = (RAM + 300 * MIB, 4 * MIB)  # what the request faults back in

    def ping(_vm: str, _args: dict) -> dict:
        env.host.process_touch(PID, [touched])
        return {}

    env, part = _env(tmp_path, {"core.ping": ping})
    pageout = env.host.process_pageout

    def pageout_but_merged(pid: int, ranges: list[tuple[int, int]]) -> int:
        done = pageout(pid, ranges)
        env.host._mark(pid, [merged], True)  # the page-out could not take them: still resident
        return done

    env.host.process_pageout = pageout_but_merged  # type: ignore[method-assign]
    await env.start()
    out = await part.park("vm1")
    assert out["wset_mib"] == 4.0 and out["unpaged_mib"] == 100.0
    assert part.parked("vm1")["ranges"] == [list(touched)]  # type: ignore[index]
    woke = await part.wake("vm1", prefetch=True, mode="touch")
    assert woke["prefetched_mib"] == 4.0


def _two(tmp_path: Path, budget_mib: int, min_mib: int = 64) -> tuple[Env, PagingPart]:
    """Two 512 MiB VMs fully resident: 'idle' (working set 100 MiB), 'busy' (400 MiB)."""
    from symbiont.memory.config import MemoryConfig
    from symbiont.memory.part import MemoryPart

    cfg = Config(state_dir=str(tmp_path))
    cfg.paging = PagingConfig(enabled=True, zram_size_mib=256, auto_pageout=True, margin_mib=64)
    host = FakeHost(FakeDomain("idle", qemu_pid=11), FakeDomain("busy", qemu_pid=22))
    for pid, base in ((11, RAM), (22, RAM + (1 << 36))):
        host.add_process(pid, [Mapping(base, base + 512 * MIB, "rw-p", "")])
    wss = {"idle": 100, "busy": 400}
    agents = FakeAgents({"memory.wss-sample": lambda vm, _a: {"referenced_bytes": wss[vm] * MIB,
                                                              "resident_bytes": 512 * MIB, "interval_s": 2.0}})
    env = Env(tmp_path, cfg=cfg, host=host, agents=agents)
    env.add(MemoryPart, MemoryConfig(enabled=False, budget_mib=budget_mib))  # its budget, its samples
    part = env.add(PagingPart)
    for vm in ("idle", "busy"):
        env.register(vm, {"memory": {"min_mib": min_mib}})
    return env, part  # type: ignore[return-value]


@run
async def test_auto_pageout_takes_the_budgets_shortfall_from_the_coldest_vm(tmp_path: Path) -> None:
    env, part = _two(tmp_path, budget_mib=800)
    await env.start()
    await env.period()
    # footprint 1024 MiB, budget 800: 224 MiB from 'idle' (512 − (100 + 64) = 348 cold), none from 'busy'
    assert [c for c in env.host.calls if c[0] == "pageout"] == [("pageout", 11, 224 * MIB)]
    assert part.last_plan is not None and part.last_plan.pageouts == [("idle", 224)]
    d = [d for d in env.store.decisions() if d["action"] == "pageout"][-1]
    assert d["vm"] == "idle" and d["inputs"]["reason"].startswith("policy: 224 MiB over the budget")
    await env.period()  # within the budget now: nothing more
    assert len([c for c in env.host.calls if c[0] == "pageout"]) == 1


@run
async def test_a_budget_below_the_vms_floors_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    env, part = _two(tmp_path, budget_mib=800, min_mib=512)
    await env.start()
    await env.period()
    await env.period()
    assert [c for c in env.host.calls if c[0] == "pageout"] == []
    refused = [d for d in env.store.decisions() if d["action"] == "refused"]
    assert len(refused) == 1 and "below the registered VMs' minimum floors (1024 MiB)" in refused[0]["outcome"]["reason"]


@run
async def test_the_view_splits_a_vms_host_memory(tmp_path: Path) -> None:
    env, part = _env(tmp_path)
    await env.start()
    v = part.view()["vms"][0]
    assert v["rss_mib"] == 592.0  # 512 guest RAM + 64 code cache + 16 QEMU's own, all resident
    assert v["guest_ram"]["resident_mib"] == 512.0 and v["code_cache"]["resident_mib"] == 64.0
    assert v["qemu_other"] == {"resident_mib": 16.0, "swapped_mib": 0.0}
    env.host.process_pageout(PID, [(HEAP, 8 * MIB), (CODE, 32 * MIB)])
    v = part.view()["vms"][0]
    assert v["qemu_other"] == {"resident_mib": 8.0, "swapped_mib": 8.0}
    assert v["code_cache"]["swapped_mib"] == 32.0 and v["guest_ram"]["swapped_mib"] == 0.0


def _tier_with(env: Env, slots_free_mib: int, ram_free_mib: int = 1024) -> None:
    """The fake tier's swap usage and zram stats: ``slots_free_mib`` slots and ``ram_free_mib``
    of RAM under its limit left."""
    from symbiont.host.zram import ZramStats

    num, dev = next(iter(env.host.zram.items()))
    size_kib = dev["swap"]["size_kib"]
    dev["swap"]["used_kib"] = size_kib - slots_free_mib * 1024
    limit = 4096 * MIB
    dev["stats"] = ZramStats(orig_data_size=0, compr_data_size=0, mem_used_total=limit - ram_free_mib * MIB,
                             mem_limit=limit, mem_used_max=0, same_pages=0, pages_compacted=0, huge_pages=0)


@run
async def test_auto_pageout_puts_in_the_tier_only_what_fits(tmp_path: Path) -> None:
    env, part = _two(tmp_path, budget_mib=800)
    await env.start()
    _tier_with(env, slots_free_mib=100)
    await env.period()  # the plan wants 224 MiB of 'idle'; 100 MiB of slots are left
    assert part.tier_room_mib() == 100.0
    assert [c for c in env.host.calls if c[0] == "pageout"] == [("pageout", 11, 100 * MIB)]


@run
async def test_a_full_tier_skips_the_page_outs_and_says_so_once(tmp_path: Path) -> None:
    env, part = _two(tmp_path, budget_mib=800)
    await env.start()
    _tier_with(env, slots_free_mib=200, ram_free_mib=4)  # slots, but the RAM limit is reached
    assert part.tier_room_mib() == 0.0
    await env.period()
    await env.period()
    assert [c for c in env.host.calls if c[0] == "pageout"] == []
    full = [d for d in env.store.decisions() if d["action"] == "tier-full"]
    assert len(full) == 1 and full[0]["outcome"]["skipped"] == [["idle", 224]]
    assert "zram_size_mib" in full[0]["outcome"]["reason"] and full[0]["inputs"]["tier"]["ram_free_mib"] == 4.0
