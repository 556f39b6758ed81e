"""What the daemon pays each period for VMs that are parked (paused, paged out): the overcommit
profile is meant to keep hundreds of them, so a parked VM must cost O(1) cheap reads a period —
not a smaps pass (tens of ms for a QEMU whose RAM is in swap) nor libvirt calls beyond the core's
own. Measured in the density run (issue 15): the daemon's CPU grew ~160 ms per parked VM per
5 s period, and the one busy VM lost throughput to it."""

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
N = 8


class CountingHost(FakeHost):
    """Counts the expensive reads: smaps passes and libvirt domain info, per pid / VM."""

    def __init__(self, *domains: FakeDomain) -> None:
        super().__init__(*domains)
        self.smaps: dict[int, int] = {}
        self.infos: dict[str, int] = {}

    def process_smaps(self, pid: int) -> list[Any]:
        self.smaps[pid] = self.smaps.get(pid, 0) + 1
        return super().process_smaps(pid)

    def info(self, vm: str) -> Any:
        self.infos[vm] = self.infos.get(vm, 0) + 1
        return super().info(vm)

    def reset(self) -> None:
        self.smaps.clear()
        self.infos.clear()


def _fleet(tmp_path: Path) -> tuple[Env, PagingPart, CountingHost]:
    cfg = Config(state_dir=str(tmp_path))
    cfg.paging = PagingConfig(enabled=True, zram_size_mib=256, park_observe_s=0.0, auto_pageout=True, margin_mib=64)
    doms = [FakeDomain(f"vm{i}", qemu_pid=1000 + i) for i in range(N)]
    host = CountingHost(*doms)
    for i in range(N):
        base = RAM + (i << 36)
        host.add_process(1000 + i, [Mapping(base, base + 512 * MIB, "rw-p", "")])
    agents = FakeAgents({"core.ping": {"pong": True},
                         "memory.wss-sample": {"referenced_bytes": 20 * MIB, "resident_bytes": 512 * MIB,
                                               "interval_s": 2.0}})
    env = Env(tmp_path, cfg=cfg, host=host, agents=agents)
    env.add(MemoryPart, MemoryConfig(enabled=False, budget_mib=16384))
    part = env.add(PagingPart)
    for d in doms:
        env.register(d.name, {"memory": {"min_mib": 64}})
    return env, part, host  # type: ignore[return-value]


async def _period(env: Env) -> None:
    for vm in env.host.domains:  # the core's collection of this period
        env.core.snapshots[vm] = env.snapshot_of(vm)
    await env.period()


def test_parked_vms_cost_no_smaps_pass_and_no_libvirt_call_in_a_period(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, host = _fleet(tmp_path)
        await env.start()
        for vm in list(host.domains)[1:]:  # all but vm0 parked
            await part.park(vm)
        assert part.parked_vms() == {f"vm{i}" for i in range(1, N)}
        await _period(env)  # the first period after the parks
        host.reset()
        for _ in range(3):
            await _period(env)
        parked_pids = [1000 + i for i in range(1, N)]
        assert sum(host.smaps.get(p, 0) for p in parked_pids) == 0, host.smaps
        assert sum(host.infos.get(f"vm{i}", 0) for i in range(1, N)) == 0, host.infos
        assert host.smaps.get(1000) == 3  # the running VM is measured every period, as before
        # the shortfall policy still counts every parked VM, at what its park left resident
        plan = part.last_plan
        assert plan is not None and plan.footprint_mib == 512.0  # vm0 resident; the parked ones at 0

        # woken: measured again every period (its guest runs and faults pages back in)
        await part.wake("vm3", prefetch=True)
        host.process_touch(1003, [(RAM + (3 << 36), 100 * MIB)])  # the guest runs again
        host.reset()
        await _period(env)
        await _period(env)
        assert host.smaps.get(1003) == 2
        assert part.last_plan is not None and part.last_plan.footprint_mib == 612.0
        env.close()
    asyncio.run(go())


def test_a_parked_vm_found_by_a_new_daemon_is_measured_once_then_not_again(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, host = _fleet(tmp_path)
        await env.start()
        await part.park("vm1")
        again = PagingPart(env.ctx("paging", PagingPart.requires), env.cfg.paging)  # a restarted daemon
        env.parts["paging"] = again
        await again.start()
        host.reset()
        await _period(env)
        await _period(env)
        await _period(env)
        assert host.smaps.get(1001) == 1  # measured the first period, then known
        # its QEMU replaced (a restart behind our back): measured again
        host.domains["vm1"].qemu_pid = 2001
        host.add_process(2001, [Mapping(RAM + (9 << 36), RAM + (9 << 36) + 512 * MIB, "rw-p", "")])
        await _period(env)
        assert host.smaps.get(2001) == 1
        env.close()
    asyncio.run(go())


# -- the dedup part (hint policy of the overcommit profile): the top costs of the profile ---------
def test_the_scan_reports_subset_figures_are_computed_once_per_report(monkeypatch) -> None:
    """hint_inputs asks saveable_for / remaining_for every period of a report that changes only
    at the next scan: np.unique over every duplicate page once per report and subset, not per
    period (~40 % of the daemon's CPU with 23 parked VMs)."""
    import numpy as np

    from symbiont.dedup import engine
    from symbiont.dedup.engine import BufferSource, Engine
    from symbiont.host.ksm import PAGE_SIZE

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, size=(64, PAGE_SIZE), dtype=np.uint8)
    pf = [np.arange(1, 65, dtype=np.uint64) + k * 1000 for k in range(3)]
    rep = Engine().scan([BufferSource(n, a.copy(), pfns=pf[i]) for i, n in enumerate(("v1", "v2", "v3"))])
    want = (rep.saveable_for(["v1", "v2"]), rep.remaining_for(["v1", "v2"]), rep.remaining_for(["v1", "v2", "v3"]))
    assert want == (64, 64, 128)
    calls = {"n": 0}
    real = np.unique

    def counting(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(engine.np, "unique", counting)
    for _ in range(5):  # five periods
        got = (rep.saveable_for(["v2", "v1"]), rep.remaining_for(("v1", "v2")), rep.remaining_for(["v1", "v2", "v3"]))
        assert got == want
    assert calls["n"] == 0
    rep.dup_pfn = rep.dup_pfn.copy() * 0  # other frames (all on one): computed again, not served stale
    assert rep.remaining_for(["v1", "v2"]) == 0 and calls["n"] == 1


def test_a_parked_vm_is_not_scanned_again_and_its_park_starts_no_rescan(tmp_path: Path) -> None:
    import time
    import types

    from symbiont.dedup.part import DedupPart
    from symbiont.dedup.service import Mode

    env = Env(tmp_path, host=FakeHost(ksm={"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20,
                                           "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0,
                                           "pages_volatile": 0, "full_scans": 0}))
    part: DedupPart = env.add(DedupPart)  # type: ignore[assignment]
    for i, name in enumerate(("busy", "idle")):
        dom = FakeDomain(name, qemu_pid=1000 + i, resident_bytes=256 * MIB,
                         guest_ram={"start": RAM, "end": RAM + 512 * MIB, "mergeable": True})
        env.register(name, {}, domain=dom)
    mode = Mode(policy="hint")
    part.read_world()
    assert part._scan_wanted() == ["busy", "idle"]
    part.report = types.SimpleNamespace(names=[])  # type: ignore[assignment]  # a scan of both, just now
    part.report_meta = {"vms": ["busy", "idle"], "at": time.time()}
    assert not part._scan_due(mode)
    env.host.suspend("idle")  # parked
    env.core.snapshots["idle"] = env.snapshot_of("idle")
    part.read_world()
    assert part._scan_wanted() == ["busy"] and not part._scan_due(mode)  # nothing new to hash
    part.report_meta["at"] -= 3600  # the interval's rescan: the running VM only
    assert part._scan_due(mode) and part._scan_wanted() == ["busy"]
    part.report_meta = {"vms": ["busy"], "at": time.time()}
    env.host.resume("idle")  # woken: its pages change again, it is scanned
    env.core.snapshots["idle"] = env.snapshot_of("idle")
    part.read_world()
    assert part._scan_due(mode) and part._scan_wanted() == ["busy", "idle"]
    env.close()


def test_host_mergeable_pages_reads_smaps_again_only_for_a_process_whose_memory_moved(tmp_path: Path) -> None:
    from symbiont.host import procmem

    proc = tmp_path / "proc"
    smaps = ("7f0000000000-7f0020000000 rw-p 00000000 00:00 0\nSize: 524288 kB\nRss: {rss} kB\n"
             "VmFlags: rd wr mr mw me ac mg\n")

    def process(pid: int, rss_kib: int) -> None:
        d = proc / str(pid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "ksm_stat").write_text("ksm_rmap_items 10\nksm_merging_pages 0\nksm_mergeable yes\n")
        (d / "smaps").write_text(smaps.format(rss=rss_kib))
        (d / "statm").write_text(f"300000 {rss_kib // 4 + 100} 50 1 0 1000 0\n")

    process(11, 40960)
    process(12, 409600)
    cache: dict[int, tuple[int, int, float]] = {}
    assert procmem.host_mergeable_pages(proc, cache, now=0.0) == (40960 + 409600) // 4
    (proc / "11" / "smaps").unlink()  # a parked VM: not read again while its resident pages stay
    (proc / "12" / "smaps").write_text(smaps.format(rss=204800))
    (proc / "12" / "statm").write_text(f"300000 {204800 // 4 + 100} 50 1 0 1000 0\n")  # moved: read
    assert procmem.host_mergeable_pages(proc, cache, now=10.0) == (40960 + 204800) // 4
    assert procmem.host_mergeable_pages(proc, cache, now=10.0 + procmem.MERGEABLE_CACHE_S) == 204800 // 4
    assert procmem.host_mergeable_pages(proc) == 204800 // 4  # without a cache: every smaps


def test_resident_bytes_zero_page_test_matches_isin() -> None:
    import numpy as np

    from symbiont.host.procmem import in_sorted

    rng = np.random.default_rng(7)
    zp = np.sort(np.concatenate([np.arange(3_000_000, 3_000_512), [77_000]]).astype(np.uint64))
    v = np.concatenate([rng.integers(0, 6_300_000, 50_000), zp[::7], [0, 2**40]]).astype(np.uint64)
    assert (in_sorted(v, zp) == np.isin(v, zp)).all() and in_sorted(v, zp).sum() >= len(zp[::7])
    assert not in_sorted(v, np.empty(0, np.uint64)).any() and in_sorted(np.empty(0, np.uint64), zp).shape == (0,)


def test_a_parked_vms_resident_guest_ram_and_mapping_are_not_read_each_period(tmp_path: Path) -> None:
    from symbiont.dedup.part import DedupPart

    class Host(FakeHost):
        reads = 0
        maps = 0

        def resident_bytes(self, pid: int, start: int, end: int) -> int:
            self.reads += 1
            return super().resident_bytes(pid, start, end)

        def guest_ram(self, pid: int, ram_bytes: int | None) -> dict[str, Any] | None:
            self.maps += 1
            return super().guest_ram(pid, ram_bytes)

    host = Host(ksm={"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "pages_shared": 0, "pages_sharing": 0,
                     "pages_unshared": 0, "pages_volatile": 0, "full_scans": 0})
    env = Env(tmp_path, host=host)
    part: DedupPart = env.add(DedupPart)  # type: ignore[assignment]
    dom = FakeDomain("idle", qemu_pid=1001, resident_bytes=256 * MIB,
                     guest_ram={"start": RAM, "end": RAM + 512 * MIB, "mergeable": True})
    env.register("idle", {}, domain=dom)
    part.read_world()
    part.read_world()
    assert host.reads == 2 and part.vms["idle"]["guest_rss_bytes"] == 256 * MIB  # running: every period
    host.suspend("idle")
    env.core.snapshots["idle"] = env.snapshot_of("idle")
    dom.resident_bytes = 16 * MIB  # what its park left
    part.read_world()  # the first period paused: read once
    host.reads = host.maps = 0
    for _ in range(5):
        part.read_world()
    assert host.reads == 0 and host.maps == 0 and part.vms["idle"]["guest_rss_bytes"] == 16 * MIB
    part.vms["idle"]["guest_rss_at"] -= part.RESIDENT_PAUSED_S  # a minute later: read again
    part.read_world()
    assert host.reads == 1
    host.resume("idle")  # woken: every period again
    env.core.snapshots["idle"] = env.snapshot_of("idle")
    dom.resident_bytes = 300 * MIB
    part.read_world()
    assert host.reads == 2 and part.vms["idle"]["guest_rss_bytes"] == 300 * MIB
    env.close()
