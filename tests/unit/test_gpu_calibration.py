"""The simulator's calibration against the H100 figures in BENCHMARKS.md, and the online
EDF-with-slicing scheduler that has to win under those costs (issue 18, item 3)."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

# isort: split
from symbiont.gpu.backend import GpuError, KernelSpec
from symbiont.gpu.calibration import (
    CALIBRATIONS,
    H100_2026_11,
    SPEC_ASSUMED,
    Calibration,
    get_calibration,
    measure_slice_costs,
)
from symbiont.gpu.endpoint import GpuEndpointService
from symbiont.gpu.faas import BackgroundLoad, Task, make_scheduler, run_faas, run_trace, synthetic_workload
from symbiont.gpu.simulated import DeviceConfig, SimulatedBackend

LOADS = (0.5, 0.8, 1.1, 1.4)


def goodput(cal: Calibration, scheduler: str, seeds: tuple[int, ...] = (0,), loads=LOADS) -> float:
    """``gpu-faas-goodput``'s workload (H100, one 50 %-busy background VM), met / all."""
    met = total = 0
    for seed in seeds:
        for load in loads:
            b = SimulatedBackend([DeviceConfig("H100", sched=cal.sharing)], seed=seed, calibration=cal)
            tasks = synthetic_workload(b.devices()[0].gpu_type, load, 0.25, seed=seed, capacity_fraction=1 / 1.5)
            r = run_trace(b, tasks, scheduler.removesuffix("+drop"), background=BackgroundLoad(seed=seed + 1),
                          drop="estimated" if scheduler.endswith("+drop") else None)  # fmt: skip
            met += r.met
            total += r.tasks
    return met / total


# -- the recorded H100 ordering -------------------------------------------------------------------
@pytest.mark.parametrize("cal", [H100_2026_11, SPEC_ASSUMED], ids=lambda c: c.name)
def test_the_h100_ordering_of_online_slicing_vs_edf_drop(cal):
    """On the H100 the online scheduler as it ran then (``edf-slice-v1``) met 0.09-0.21 of the
    deadlines, EDF+drop 0.56-0.88 (seed 0, loads 0.5-1.4). The fit reproduces that ordering;
    the original assumptions predicted the opposite, which is what this test tells apart."""
    per_load = {s: [goodput(cal, s, loads=(ld,)) for ld in LOADS] for s in ("edf-slice-v1", "edf+drop")}
    v1, drop = per_load["edf-slice-v1"], per_load["edf+drop"]
    if cal is H100_2026_11:
        assert all(a < 0.5 * b for a, b in zip(v1, drop, strict=True)), per_load
        assert all(0.05 <= a <= 0.3 for a in v1), v1  # H100: 0.09-0.21
        assert all(0.45 <= b <= 0.9 for b in drop), drop  # H100: 0.56-0.88
    else:
        assert all(a > b for a, b in zip(v1, drop, strict=True)), per_load


def test_fixed_edf_slice_beats_edf_drop_under_the_h100_costs():
    """Fixed seeds 0-2, all loads: the overhead-aware online scheduler meets more deadlines."""
    seeds = (0, 1, 2)
    ours = goodput(H100_2026_11, "edf-slice", seeds)
    base = goodput(H100_2026_11, "edf+drop", seeds)
    assert ours > 1.03 * base, (ours, base)
    # and under the H100 costs on a time-sliced vGPU (the other cause, kept apart)
    ts = dataclasses.replace(H100_2026_11, sharing="timeslice-best-effort")
    assert goodput(ts, "edf-slice", seeds) > goodput(ts, "edf+drop", seeds)


def test_fixed_edf_slice_keeps_its_lead_under_the_original_costs():
    assert goodput(SPEC_ASSUMED, "edf-slice") > 1.1 * goodput(SPEC_ASSUMED, "edf+drop")


def _idle_fraction(scheduler: str, load: float = 1.1) -> tuple[float, object]:
    """GPU idle time between this VM's back-to-back slices (work waiting) over its slice time."""
    cal = H100_2026_11
    b = SimulatedBackend([DeviceConfig("H100", sched=cal.sharing)], seed=0, calibration=cal)
    gpu = b.devices()[0].gpu_type
    tasks = synthetic_workload(gpu, load, 0.25, seed=0, capacity_fraction=1 / 1.5)
    s = make_scheduler(scheduler, gpu.sm_count, gpu.peak_flops * (1 + b.jitter), drop="estimated")
    gaps: list[float] = []
    observe, launch = s.observe_gap, b.launch
    ops: list[int] = []

    def spy_gap(seconds: float) -> None:
        gaps.append(seconds)
        observe(seconds)

    def spy_launch(ctx, kernel, share=None):
        op = launch(ctx, kernel, share)
        if not kernel.name.startswith("bg"):
            ops.append(op)
        return op

    s.observe_gap, b.launch = spy_gap, spy_launch
    run_faas(b, tasks, s, background=BackgroundLoad(seed=1))
    assert len(gaps) > 10
    return sum(gaps) / sum(b.timing(o).duration for o in ops), s


def test_the_gpu_does_not_idle_between_slices():
    """The v1 scheduler's 0.2-0.5 ms slices left this VM's GPU idle longer than it ran (launch +
    poll per slice); the fixed one queues the next slice behind the running one and keeps
    slices long enough that the gaps stay small."""
    ours, s = _idle_fraction("edf-slice")
    v1, _ = _idle_fraction("edf-slice-v1")
    assert ours < 0.2 and v1 > 1.0, (ours, v1)
    assert s.lookahead == 2 and s.overhead_s < H100_2026_11.slice_overhead_s  # hidden by the queue


def test_slices_have_an_overhead_floor_and_shrink_only_for_tight_deadlines():
    s = make_scheduler("edf-slice", 132, 1e12, overhead_prior_s=1e-3)  # 1 ms per slice
    v1 = make_scheduler("edf-slice-v1", 132, 1e12)
    work = 1e9 / 132  # FLOP per block: 132 blocks = 1 ms at 1 TFLOP/s
    for sch in (s, v1):
        sch.add(Task("loose", "f", 0.0, 1.0, 132, work), 0.0)
    assert s.slice_seconds() == pytest.approx(s.max_slice_s)  # nobody needs preempting: long slices
    for sch in (s, v1):
        sch.add(Task("tight", "f", 0.0, 3e-3, 132, work), 0.0)
    # a tight newcomer shortens slices, but never below 4 x the gap (gap <= 20 % of a slice)
    assert s.slice_seconds() == pytest.approx(4e-3)
    assert v1.slice_seconds() == pytest.approx(1e-3)  # v1: half the slack, gaps ignored


def test_dropping_counts_the_gaps_a_task_still_needs():
    s = make_scheduler("edf-slice", 132, 1e12, overhead_prior_s=1e-3)
    # 1 ms of work, 1.5 ms to go: feasible at the rate alone, not with a 1 ms gap before it
    s.add(Task("a", "f", 0.0, 1.5e-3, 132, 1e9 / 132), 0.0)
    assert s.next_slice(0.0, 1e12) is None
    st = s.states["a"]
    assert st.dropped == 0.0 and "slice gaps" in st.drop_reason
    v1 = make_scheduler("edf-slice-v1", 132, 1e12)
    v1.add(Task("a", "f", 0.0, 1.5e-3, 132, 1e9 / 132), 0.0)
    assert v1.next_slice(0.0, 1e12) is not None


# -- the constants and their sources ---------------------------------------------------------------
def test_constants_are_checked_and_named():
    assert set(CALIBRATIONS) == {"spec-assumed", "h100-2026-11"}
    assert get_calibration(None) is H100_2026_11 and get_calibration("SPEC-assumed") is SPEC_ASSUMED
    assert "BENCHMARKS.md" in H100_2026_11.source
    with pytest.raises(GpuError, match="unknown calibration"):
        get_calibration("a100-guess")
    with pytest.raises(GpuError, match="poll_s"):
        dataclasses.replace(H100_2026_11, poll_s=-1.0)
    with pytest.raises(GpuError, match="share_change"):
        dataclasses.replace(H100_2026_11, share_change="sometimes")
    assert SimulatedBackend(["H100"]).calibration is H100_2026_11


def test_measuring_slice_costs_gives_back_the_calibration():
    """The probe ``bench_gpu_faas.py --backend cupy`` runs on a GPU, checked on the model."""
    for cal in (H100_2026_11, SPEC_ASSUMED):
        m = measure_slice_costs(SimulatedBackend(["H100"], calibration=cal), n=20)
        assert m.poll_s == pytest.approx(cal.poll_s, abs=1e-9)
        assert m.gap_s == pytest.approx(cal.launch_s + cal.poll_s, rel=1e-6)
        assert m.launch_s == pytest.approx(cal.launch_s, rel=1e-6)


def test_wait_returns_a_poll_after_the_kernel_ends():
    b = SimulatedBackend(["H100"], jitter=0.0, calibration=H100_2026_11)
    ctx = b.create_context(0)
    k = KernelSpec.from_time(1e-3, b.devices()[0].gpu_type)
    op = b.launch(ctx, k)
    assert b.wait([op]) == [op]
    t = b.timing(op)
    assert t.start == pytest.approx(H100_2026_11.launch_s)
    assert t.duration == pytest.approx(1e-3 / H100_2026_11.flops_efficiency)
    assert b.now() == pytest.approx(t.end + H100_2026_11.poll_s)


def _vertical_effect_ms(cal: str) -> float:
    """``bench_gpu.py``'s vertical-scaling scenario, with CuPy's strict SM masking."""
    b = SimulatedBackend([DeviceConfig("H100", sched="spatial-strict")], calibration=cal)
    g = b.devices()[0].gpu_type
    svc = GpuEndpointService(b)
    svc.register_client("noisy", 0, 1.0, mem_bytes=1 << 20)
    svc.register_client("vm", 0, 0.25, mem_bytes=1 << 30, critical=True)
    k = KernelSpec.from_time(2e-3, g, blocks=8 * g.sm_count, name="bench")
    effects = []
    for i in range(10):
        for _ in range(2):
            svc.launch("vm", k)
            svc.launch("noisy", k)
        b.advance_to(b.now() + 0.7e-3)
        svc.set_quota("vm", sm_share=0.75 if i % 2 == 0 else 0.25)
        svc.sync("vm")
        svc.sync("noisy")
        effects.append(svc.scale_status("vm").effect_s)
    return statistics.median(effects) * 1e3


def test_share_change_takes_effect_when_queued_kernels_drain_as_on_the_h100():
    # H100: "device effect 12.3 ms: the 2 ms kernels queued before the change drain at the old share"
    assert 10.0 < _vertical_effect_ms("h100-2026-11") < 15.0
    assert _vertical_effect_ms("spec-assumed") < 0.5  # the old model: at the next wave end


def test_device_copies_follow_the_h100_slope():
    # gpu-scaling-overhead on the H100: 0.58 ms at 16 MiB, 1.23 ms at 1 GiB -> 0.645 us per MiB
    b = SimulatedBackend(["H100"], calibration=H100_2026_11)
    ctx = b.create_context(0)
    times = {}
    for mib in (16, 1024):
        src, dst = b.alloc(ctx, mib << 20), b.alloc(ctx, mib << 20)
        op = b.memcpy_d2d(src, dst)
        b.wait_all([op])
        times[mib] = b.timing(op).duration
        b.free(src)
        b.free(dst)
    assert (times[1024] - times[16]) * 1e3 == pytest.approx(1.23 - 0.58, rel=0.05)
    assert times[16] == pytest.approx(H100_2026_11.d2d_latency_s + 2 * (16 << 20) / (0.97 * 3350e9), rel=1e-6)
