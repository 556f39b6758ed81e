"""Deadline-aware FaaS scheduling with kernel slicing: properties and hand-made cases."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# isort: split
from symbiont.gpu.backend import KernelSpec
from symbiont.gpu.faas import (
    EDF,
    FCFS,
    BackgroundLoad,
    CapacityEstimator,
    Task,
    TaskState,
    TraceError,
    dump_trace,
    make_scheduler,
    moore_hodgson,
    parse_trace,
    peak_for,
    run_faas,
    run_trace,
    synthetic_workload,
    wave_blocks_for,
)
from symbiont.gpu.simulated import GPU_TYPES, DeviceConfig, SimulatedBackend

IDEAL = "spec-assumed"  # the model's mechanics with the original, idealised costs (gpu/calibration.py)

A100 = GPU_TYPES["A100"]


def task(tid: str, arrival_ms: float, work_ms: float, deadline_ms: float, waves_per_ms: int = 10) -> Task:
    """A task whose kernel takes ``work_ms`` on the whole A100 (in waves of 100 us)."""
    k = KernelSpec.from_time(work_ms / 1e3, A100, blocks=max(1, round(work_ms * waves_per_ms)) * A100.sm_count)
    return Task(tid, "fn", arrival_ms / 1e3, (arrival_ms + deadline_ms) / 1e3, k.blocks, k.flops_per_block)


def backend(sched: str = "spatial") -> SimulatedBackend:
    return SimulatedBackend([DeviceConfig("A100", sched=sched)], jitter=0.0, seed=0, calibration=IDEAL)


def run(tasks, name, drop=None, **kw):
    b = backend(kw.pop("sched", "spatial"))
    s = make_scheduler(name, wave_blocks_for(b, 0, 1.0), peak_for(b, 0, 1.0), tasks, drop, **kw)
    return run_faas(b, tasks, s), s


# -- traces --------------------------------------------------------------------------------------
def test_trace_roundtrip_and_errors():
    tasks = [task("a", 0, 1, 5), task("b", 0.5, 2, 10)]
    again = parse_trace(dump_trace(tasks))
    assert [(t.id, t.blocks) for t in again] == [("a", tasks[0].blocks), ("b", tasks[1].blocks)]
    assert again[1].flops == pytest.approx(tasks[1].flops, rel=1e-6)
    assert again[1].deadline == pytest.approx(tasks[1].deadline)
    with pytest.raises(TraceError, match="lacks column"):
        parse_trace("arrival_ms,gflop\n1,2\n")
    with pytest.raises(TraceError, match="line 3"):
        parse_trace("arrival_ms,deadline_ms,gflop\n1,2,3\nx,2,3\n")
    with pytest.raises(TraceError, match="line 2"):
        parse_trace("arrival_ms,deadline_ms,gflop\n1,-2,3\n")
    with pytest.raises(TraceError, match="duplicate"):
        parse_trace("task,arrival_ms,deadline_ms,gflop\na,1,2,3\na,1,2,3\n")
    with pytest.raises(TraceError, match="no tasks"):
        parse_trace("arrival_ms,deadline_ms,gflop\n")
    assert parse_trace("arrival_ms,deadline_ms,gflop\n5,10,1\n")[0].blocks == 4096


def test_moore_hodgson_rejects_the_largest_to_save_the_rest():
    sts = [TaskState(task("big", 0, 8, 9), 0), TaskState(task("s1", 0, 2, 4), 0), TaskState(task("s2", 0, 2, 6), 0)]
    for s in sts:
        s.remaining = s.task.blocks
    admitted, rejected = moore_hodgson(sts, 0.0, A100.peak_flops)
    assert {s.task.id for s in admitted} == {"s1", "s2"}
    assert [s.task.id for s in rejected] == ["big"]


# -- hand-made cases ------------------------------------------------------------------------------
def test_slicing_beats_fcfs_and_plain_edf_where_it_must():
    # a tight short task teaches the online scheduler that deadlines are tight; a long loose
    # task follows; another tight one arrives while the long one runs
    tasks = [task("s1", 0.0, 0.5, 1.5), task("long", 0.1, 10, 40), task("s2", 2.0, 0.5, 1.5)]
    fcfs, _ = run(tasks, "fcfs")
    edf, _ = run(tasks, "edf")
    ours, s = run(tasks, "edf-slice")
    off, _ = run(tasks, "edf-slice-offline")
    outcome = {r["task"]: r["outcome"] for r in ours.rows}
    assert outcome == {"s1": "met", "long": "met", "s2": "met"}
    assert ours.met == 3 and off.met == 3
    assert fcfs.met == 2 and edf.met == 2  # s2 waits behind the whole long kernel
    assert ours.met >= fcfs.met
    long_slices = next(r["slices"] for r in ours.rows if r["task"] == "long")
    assert long_slices > 1


def test_offline_variant_slices_exactly_at_the_next_urgent_arrival():
    tasks = [task("long", 0.0, 10, 40), task("short", 3.0, 0.5, 1.5)]
    off, _ = run(tasks, "edf-slice-offline")
    fcfs, _ = run(tasks, "fcfs")
    assert off.met == 2 and fcfs.met == 1
    rows = {r["task"]: r for r in off.rows}
    assert rows["long"]["slices"] == 2 and rows["short"]["slices"] == 1
    assert rows["short"]["finish_ms"] <= 3.0 + 0.5 + 0.2 + 0.1  # one wave of wait at most


def test_dropping_saves_work_when_overloaded():
    # ten tasks that cannot all make it: without dropping the late ones waste the GPU
    tasks = [task(f"t{i}", 0.0, 2, 5 + i) for i in range(10)]
    keep, _ = run(tasks, "edf", drop="off")
    drop, _ = run(tasks, "edf", drop="estimated")
    assert drop.met >= keep.met
    assert drop.wasted_gflop < keep.wasted_gflop
    for r in (keep, drop):
        assert r.met + r.missed + r.dropped == r.tasks == 10
        wasted = sum(x["executed_gflop"] for x in r.rows if x["outcome"] != "met")
        assert r.wasted_gflop == pytest.approx(wasted, rel=1e-6)
        for x in r.rows:
            if x["outcome"] == "met":
                assert x["executed_gflop"] == pytest.approx(x["gflop"], rel=1e-6)


def test_baselines_slice_as_documented():
    tasks = [task("a", 0, 3, 50), task("b", 0.1, 3, 50)]
    fcfs, _ = run(tasks, "fcfs")
    rr, _ = run(tasks, "rr", quantum_s=0.5e-3)
    assert fcfs.slices == 2
    assert rr.slices >= 10  # 6 ms of work in 0.5 ms slices
    assert rr.met == fcfs.met == 2


# -- properties ------------------------------------------------------------------------------------
task_sets = st.lists(
    st.tuples(st.floats(0, 5), st.floats(0.2, 3), st.floats(0.3, 8)), min_size=1, max_size=7
).map(lambda xs: [task(f"t{i}", a, w, d) for i, (a, w, d) in enumerate(xs)])


def pending_at(s, t: float) -> set[str]:
    """Tasks pending at a decision at time t, rebuilt from the scheduler's task states."""
    out = set()
    for st_ in s.states.values():
        if st_.task.arrival > t + 1e-9:
            continue
        if st_.finished is not None and st_.finished <= t + 1e-12:
            continue
        if st_.dropped is not None and st_.dropped <= t + 1e-12:
            continue
        out.add(st_.task.id)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks=task_sets, name=st.sampled_from(["fcfs", "rr", "edf", "edf-slice", "edf-slice-offline"]))
def test_never_runs_a_slice_of_a_known_infeasible_task(tasks, name):
    res, s = run(tasks, name, drop="certain")
    for d in s.decisions:
        assert d.time + d.remaining_flops / s.peak <= d.deadline + 1e-9, d
    # "estimated" is stricter: no slice starts after its task's deadline either
    res, s = run(tasks, name, drop="estimated")
    for d in s.decisions:
        assert d.time + d.remaining_flops / d.capacity <= d.deadline + 1e-9
        assert d.time <= d.deadline


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks=task_sets, name=st.sampled_from(["edf", "edf-slice", "edf-slice-offline"]), drop=st.sampled_from(
    ["off", "certain", "estimated"]))  # fmt: skip
def test_edf_order_is_respected(tasks, name, drop):
    res, s = run(tasks, name, drop=drop)
    deadline = {t.id: t.deadline for t in tasks}
    for d in s.decisions:
        pend = pending_at(s, d.time)
        assert set(d.pending) == pend
        assert set(d.eligible) <= pend and d.task in d.eligible
        # the chosen task has the earliest deadline among those it may choose from
        assert deadline[d.task] == min(deadline[x] for x in d.eligible)
        if name == "edf":
            assert set(d.eligible) == pend
    assert res.met + res.missed + res.dropped == len(tasks)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks=task_sets)
def test_plain_edf_never_splits_and_fcfs_goes_by_arrival(tasks):
    res, s = run(tasks, "edf")
    assert all(r["slices"] <= 1 for r in res.rows)
    res, s = run(tasks, "fcfs")
    arrival = {t.id: (t.arrival, t.id) for t in tasks}
    starts = [d.task for d in s.decisions]
    assert starts == sorted(starts, key=lambda x: arrival[x])


# -- capacity estimation ---------------------------------------------------------------------------
def test_capacity_estimator_tracks_other_vms_load():
    est = CapacityEstimator(peak=100.0, alpha=0.5)
    assert est.capacity == 100.0
    for _ in range(10):
        est.observe(50.0, 1.0)
    assert est.capacity == pytest.approx(50.0, rel=0.01)
    est.observe(1e9, 1.0)  # never above the peak
    assert est.capacity <= 100.0

    # on a time-sliced vGPU shared with an always-busy VM the estimate lands near half the GPU
    tasks = [task(f"t{i}", i * 2.0, 1.0, 100) for i in range(30)]
    b = SimulatedBackend([DeviceConfig("A100", sched="timeslice-best-effort")], jitter=0.0, calibration=IDEAL)
    s = make_scheduler("edf", wave_blocks_for(b, 0, 1.0), peak_for(b, 0, 1.0), tasks)
    est = CapacityEstimator(peak=s.peak)
    run_faas(b, tasks, s, background=BackgroundLoad(vms=1, duty=1.0, period_s=10.0), estimator=est)
    assert 0.3 * A100.peak_flops < est.capacity < 0.7 * A100.peak_flops


def test_edf_slice_wins_on_a_loaded_time_sliced_gpu():
    tasks = synthetic_workload(A100, load=1.0, duration_s=0.1, seed=5, capacity_fraction=0.67)
    bg = BackgroundLoad(vms=1, duty=0.5, seed=2)
    got = {}
    for name in ("fcfs", "edf", "edf-slice"):
        b = SimulatedBackend([DeviceConfig("A100", sched="timeslice-best-effort")], seed=0, calibration=IDEAL)
        got[name] = run_trace(b, tasks, name, background=bg)
    assert got["edf-slice"].goodput > got["fcfs"].goodput
    assert got["edf-slice"].goodput > got["edf"].goodput
    assert got["edf-slice"].wasted_fraction < got["fcfs"].wasted_fraction


def test_make_scheduler_rejects_unknown_names_and_modes():
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("lottery", 108, 1.0)
    with pytest.raises(ValueError, match="drop"):
        FCFS(108, 1.0, drop="sometimes")
    with pytest.raises(ValueError, match="twice"):
        s = EDF(108, 1.0)
        t = task("a", 0, 1, 2)
        s.add(t, 0.0)
        s.add(t, 0.0)
