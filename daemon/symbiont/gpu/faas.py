"""Deadline-aware FaaS on a sliced vGPU (after Prakash et al., IC2E 2021).

Setting: a VM runs real-time functions (tasks with a deadline and one GPU kernel each) on its
vGPU, which the hypervisor time-slices with other VMs. A kernel cannot be preempted once
launched, and the vGPU's capacity moves with the other VMs' load. Goal: maximise the number of
tasks that finish before their deadline, and waste little GPU work on tasks that miss.

Mechanisms, as in the paper's three components:

1. **Kernel slicing**: a task's kernel is launched as several sub-kernels over consecutive
   block ranges (:meth:`KernelSpec.slice`), each a scheduling point. Slices are whole waves
   (multiples of the SMs the vGPU can use) to avoid tail waste.
2. **Capacity estimator** (:class:`CapacityEstimator`): the FLOP/s our vGPU really gets,
   an EWMA of each slice's work over its submit-to-end time (so the wait for other VMs' time
   slices is included), clamped to the device peak.
3. **Slice size + order** by *modified EDF*: Moore-Hodgson admission on the estimated
   capacity (reject the largest remaining task while the EDF schedule of the admitted set
   misses a deadline; rejected tasks only run when nothing admitted is pending), then EDF
   among the admitted, with adaptive slice sizes:

   - *online* (``edf-slice``): the future is unknown, so the slice length is
     ``beta x`` the smallest slack (relative deadline minus standalone time) seen in recent
     arrivals, but at least what keeps the measured gap between slices under 20 % of a slice,
     and the next slice is queued behind the running one (see :class:`EDFSlice`; the first
     version, ``edf-slice-v1``, clamped to ``[min_slice_s, max_slice_s]`` and ran one slice
     at a time);
   - *offline* (``edf-slice-offline``): the trace is known, so the plan is a preemptive EDF
     simulation of all known tasks (with the same rejection rule), and the current slice ends
     exactly when the next admitted task with an earlier deadline arrives (no slicing at all
     when none will).

Baselines: ``fcfs`` and ``edf`` run whole kernels (no slicing; ``edf`` orders by deadline),
``rr`` round-robins fixed slices of ``quantum_s``. Every scheduler can ``drop`` tasks whose
deadline is known infeasible: ``certain`` (even the whole device at peak cannot make it) or
``estimated`` (not at the estimated capacity). Metrics: tasks done before the deadline, and
*wasted work*: FLOP executed for tasks that missed.

This is our reading of the slides' description; the paper's exact heuristics may differ.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import io
import math
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symbiont.gpu.backend import GpuBackend, GpuType, KernelSpec

EPS = 1e-9
DROP_MODES = ("off", "certain", "estimated")


class TraceError(ValueError):
    """A workload trace that cannot be used, with the line at fault."""


@dataclass(frozen=True)
class Task:
    """One function invocation: a kernel of ``blocks`` x ``flops_per_block`` and a deadline."""

    id: str
    fn: str
    arrival: float  # seconds from the start of the workload
    deadline: float  # absolute, seconds
    blocks: int
    flops_per_block: float

    @property
    def flops(self) -> float:
        return self.blocks * self.flops_per_block


# -- traces ---------------------------------------------------------------------------------------
TRACE_COLUMNS = ("task", "function", "arrival_ms", "deadline_ms", "gflop", "blocks")


def parse_trace(text: str, default_blocks: int = 4096, max_tasks: int = 100_000) -> list[Task]:
    """Tasks from CSV text with columns ``arrival_ms, deadline_ms, gflop`` (required; the
    deadline is relative to the arrival) and ``task, function, blocks`` (optional)."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise TraceError("trace is empty")
    cols = {c.strip() for c in reader.fieldnames if c}
    missing = {"arrival_ms", "deadline_ms", "gflop"} - cols
    if missing:
        raise TraceError(f"trace lacks column(s) {', '.join(sorted(missing))}; has {', '.join(sorted(cols))}")
    tasks: list[Task] = []
    seen: set[str] = set()
    for n, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        try:
            arrival = float(row["arrival_ms"]) / 1e3
            rel = float(row["deadline_ms"]) / 1e3
            gflop = float(row["gflop"])
            blocks = int(row.get("blocks") or default_blocks)
        except ValueError as exc:
            raise TraceError(f"line {n}: {exc}") from None
        if not all(math.isfinite(x) for x in (arrival, rel, gflop)):
            raise TraceError(f"line {n}: values must be finite")
        if arrival < 0 or rel <= 0 or gflop <= 0 or blocks < 1:
            raise TraceError(f"line {n}: need arrival_ms >= 0, deadline_ms > 0, gflop > 0, blocks >= 1")
        tid = row.get("task") or f"t{n - 1}"
        if tid in seen:
            raise TraceError(f"line {n}: duplicate task id {tid!r}")
        seen.add(tid)
        tasks.append(Task(tid, row.get("function") or "fn", arrival, arrival + rel, blocks, gflop * 1e9 / blocks))
        if len(tasks) > max_tasks:
            raise TraceError(f"trace has more than {max_tasks} tasks")
    if not tasks:
        raise TraceError("trace has no tasks")
    return sorted(tasks, key=lambda t: (t.arrival, t.id))


def load_trace(path: str | Path, **kw: Any) -> list[Task]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read trace {p}: {exc.strerror or exc}") from None
    return parse_trace(text, **kw)


def dump_trace(tasks: Iterable[Task]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(TRACE_COLUMNS)
    for t in tasks:
        w.writerow([t.id, t.fn, f"{t.arrival * 1e3:.6f}", f"{(t.deadline - t.arrival) * 1e3:.6f}",
                    f"{t.flops / 1e9:.9g}", t.blocks])  # fmt: skip
    return out.getvalue()


@dataclass(frozen=True)
class FunctionClass:
    """A kind of function for synthetic workloads: its size and how loose its deadline is."""

    name: str
    seconds: float  # standalone time on the whole reference GPU
    slack_lo: float  # relative deadline = U(slack_lo, slack_hi) x seconds / expected share
    slack_hi: float
    weight: float


DEFAULT_MIX = (
    FunctionClass("resize", 0.5e-3, 3.0, 8.0, 0.5),
    FunctionClass("classify", 2e-3, 2.0, 5.0, 0.35),
    FunctionClass("transcode", 8e-3, 1.5, 4.0, 0.15),
)


def synthetic_workload(
    gpu: GpuType,
    load: float,
    duration_s: float,
    seed: int = 0,
    capacity_fraction: float = 1.0,
    mix: Sequence[FunctionClass] = DEFAULT_MIX,
    wave_time_s: float = 100e-6,
) -> list[Task]:
    """Poisson arrivals offering ``load`` x the capacity the VM expects (``capacity_fraction``
    of ``gpu``), with deadlines relative to each function's time at that capacity."""
    rng = random.Random(seed)
    weights = [f.weight for f in mix]
    mean_s = sum(f.seconds * f.weight for f in mix) / sum(weights)
    rate = load * capacity_fraction / mean_s
    tasks: list[Task] = []
    t = 0.0
    i = 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        f = rng.choices(mix, weights)[0]
        waves = max(1, round(f.seconds / wave_time_s))
        k = KernelSpec.from_time(f.seconds, gpu, blocks=waves * gpu.sm_count)
        rel = rng.uniform(f.slack_lo, f.slack_hi) * f.seconds / capacity_fraction
        i += 1
        tasks.append(Task(f"t{i}", f.name, t, t + rel, k.blocks, k.flops_per_block))
    return tasks


# -- capacity estimation ---------------------------------------------------------------------------
class CapacityEstimator:
    """The vGPU's capacity (FLOP/s) as observed from slice completions, EWMA-smoothed."""

    def __init__(self, peak: float, alpha: float = 0.3, prior: float | None = None) -> None:
        self.peak = peak
        self.alpha = alpha
        self._est = prior if prior is not None else peak
        self.samples = 0

    def observe(self, flops: float, seconds: float) -> None:
        if seconds <= 0 or flops <= 0:
            return
        rate = min(self.peak, flops / seconds)
        self._est = rate if self.samples == 0 else (1 - self.alpha) * self._est + self.alpha * rate
        self.samples += 1

    @property
    def capacity(self) -> float:
        return max(self.peak * 1e-3, min(self.peak, self._est))


# -- schedulers --------------------------------------------------------------------------------------
@dataclass
class TaskState:
    task: Task
    remaining: int  # blocks not completed yet
    executed_flops: float = 0.0
    inflight: int = 0  # of those, blocks in launched slices that have not completed
    slices: int = 0
    first_start: float | None = None
    finished: float | None = None
    dropped: float | None = None
    drop_reason: str = ""

    @property
    def remaining_flops(self) -> float:
        return self.remaining * self.task.flops_per_block


@dataclass(frozen=True)
class SliceDecision:
    task: str
    blocks: int
    offset: int


@dataclass(frozen=True)
class DecisionRecord:
    """What a scheduler decided and what it saw, for explanation and property tests."""

    time: float
    task: str
    blocks: int
    remaining_flops: float
    deadline: float
    capacity: float
    pending: tuple[str, ...]
    eligible: tuple[str, ...]


class Scheduler(ABC):
    """A pure policy: tasks in, slice decisions out. No I/O, no clock of its own."""

    name = "abstract"
    slices = True
    #: slices :func:`run_faas` keeps launched at once: with 2 the next slice is queued behind
    #: the running one, so the host's decision, launch and poll overlap GPU work
    lookahead = 1
    #: the capacity estimator's window: submit-to-end (default: waiting and launch count as lost
    #: capacity) or start-to-end (for schedulers that model the per-slice gap themselves)
    rate_from_start = False

    def __init__(self, wave_blocks: int, peak: float, drop: str = "off") -> None:
        if drop not in DROP_MODES:
            raise ValueError(f"drop must be one of {', '.join(DROP_MODES)}, got {drop!r}")
        self.wave = max(1, int(wave_blocks))
        self.peak = peak
        self.drop = drop
        self.states: dict[str, TaskState] = {}
        self.pending: dict[str, TaskState] = {}  # arrived, not finished, not dropped
        self.decisions: list[DecisionRecord] = []

    def add(self, task: Task, now: float) -> None:
        if task.id in self.states:
            raise ValueError(f"task {task.id!r} added twice")
        st = TaskState(task, task.blocks)
        self.states[task.id] = st
        self.pending[task.id] = st
        self.on_arrival(st, now)

    def on_arrival(self, st: TaskState, now: float) -> None:  # noqa: B027 - optional hook
        """Hook for schedulers that learn from arrivals."""

    def observe_gap(self, seconds: float) -> None:  # noqa: B027 - optional hook
        """Hook: the idle time between the end of one slice and the start of the next when
        work was waiting (launch, polling, waiting for SMs): what one more slice costs."""

    def has_pending(self) -> bool:
        return bool(self.pending)

    def _drop_infeasible(self, now: float, capacity: float) -> None:
        if self.drop == "off":
            return
        rate = self.peak if self.drop == "certain" else min(self.peak, capacity)
        for tid, st in list(self.pending.items()):
            if now + st.remaining_flops / rate > st.task.deadline + EPS:
                st.dropped = now
                st.drop_reason = f"{self.drop}: needs {st.remaining_flops / rate * 1e3:.3f} ms, has " \
                                 f"{(st.task.deadline - now) * 1e3:.3f} ms"  # fmt: skip
                del self.pending[tid]

    def next_slice(self, now: float, capacity: float) -> SliceDecision | None:
        """Drop what is known infeasible, then pick the next slice (None: nothing to run)."""
        self._drop_infeasible(now, capacity)
        if not self.pending or all(s.inflight >= s.remaining for s in self.pending.values()):
            return None
        st, blocks, eligible = self.choose(now, capacity)
        blocks = max(1, min(blocks, st.remaining - st.inflight))
        self.decisions.append(
            DecisionRecord(now, st.task.id, blocks, st.remaining_flops, st.task.deadline, capacity,
                           tuple(self.pending), tuple(eligible))  # fmt: skip
        )
        if st.first_start is None:
            st.first_start = now
        return SliceDecision(st.task.id, blocks, st.task.blocks - st.remaining + st.inflight)

    @abstractmethod
    def choose(self, now: float, capacity: float) -> tuple[TaskState, int, Sequence[str]]:
        """(task, blocks, ids it chose among) for the next slice; pending is non-empty."""

    def slice_launched(self, task_id: str, blocks: int) -> None:
        """The slice :meth:`next_slice` chose is on the GPU (matters with ``lookahead`` > 1)."""
        self.states[task_id].inflight += blocks

    def launchable(self) -> list[TaskState]:
        """Pending tasks with blocks not yet launched."""
        return [s for s in self.pending.values() if s.remaining > s.inflight]

    def slice_done(self, task_id: str, blocks: int, now: float) -> None:
        st = self.states[task_id]
        st.inflight = max(0, st.inflight - blocks)
        st.remaining -= blocks
        st.executed_flops += blocks * st.task.flops_per_block
        st.slices += 1
        if st.remaining <= 0:
            st.remaining = 0
            st.finished = now
            self.pending.pop(task_id, None)

    def blocks_for(self, seconds: float, capacity: float, st: TaskState) -> int:
        """Whole waves of ``st``'s kernel that take about ``seconds`` at ``capacity``."""
        target = seconds * capacity / st.task.flops_per_block
        waves = max(1, math.ceil(target / self.wave - 1e-9))
        return waves * self.wave


class FCFS(Scheduler):
    """First come, first served, whole kernels (the vGPU scheduler's default in a VM)."""

    name = "fcfs"
    slices = False

    def choose(self, now: float, capacity: float) -> tuple[TaskState, int, Sequence[str]]:
        st = min(self.pending.values(), key=lambda s: (s.task.arrival, s.task.id))
        return st, st.remaining, tuple(self.pending)


class RoundRobin(Scheduler):
    """Round-robin over pending tasks with a fixed slice of ``quantum_s``."""

    name = "rr"

    def __init__(self, wave_blocks: int, peak: float, drop: str = "off", quantum_s: float = 1e-3) -> None:
        super().__init__(wave_blocks, peak, drop)
        self.quantum_s = quantum_s
        self._ring: deque[str] = deque()

    def on_arrival(self, st: TaskState, now: float) -> None:
        self._ring.append(st.task.id)

    def choose(self, now: float, capacity: float) -> tuple[TaskState, int, Sequence[str]]:
        while self._ring[0] not in self.pending:
            self._ring.popleft()
        tid = self._ring[0]
        self._ring.rotate(-1)
        st = self.pending[tid]
        return st, self.blocks_for(self.quantum_s, capacity, st), tuple(self.pending)


class EDF(Scheduler):
    """Earliest deadline first, whole kernels (no slicing: a started kernel runs to the end)."""

    name = "edf"
    slices = False

    def choose(self, now: float, capacity: float) -> tuple[TaskState, int, Sequence[str]]:
        st = min(self.pending.values(), key=lambda s: (s.task.deadline, s.task.arrival, s.task.id))
        return st, st.remaining, tuple(self.pending)


def moore_hodgson(
    states: Sequence[TaskState], now: float, capacity: float, overhead: Any = None
) -> tuple[list[TaskState], list[TaskState]]:
    """Admit a maximum-cardinality on-time subset of released tasks (EDF + largest-reject);
    ``overhead(state)``, if given, adds the fixed costs of running that task (its slices)."""
    admitted: list[TaskState] = []
    heap: list[tuple[float, int, TaskState]] = []
    rejected: list[TaskState] = []
    t = now
    for i, st in enumerate(sorted(states, key=lambda s: (s.task.deadline, s.task.arrival, s.task.id))):
        dur = st.remaining_flops / capacity + (overhead(st) if overhead else 0.0)
        admitted.append(st)
        heapq.heappush(heap, (-dur, i, st))
        t += dur
        if t > st.task.deadline + EPS:
            negdur, _, worst = heapq.heappop(heap)
            t += negdur
            admitted.remove(worst)
            rejected.append(worst)
    return admitted, rejected


class EDFSlice(Scheduler):
    """Modified EDF with adaptive slice sizes, online variant (see the module docstring).

    Why it is built this way: on a real GPU every slice costs a launch and a poll during which
    the GPU does nothing for this VM (0.4 ms per slice on the H100 with CuPy, see
    :mod:`.calibration`); the first version cut slices as short as 0.2 ms and met 0.09-0.21 of
    the deadlines there. Two remedies. The next slice is queued behind the running one
    (``lookahead`` 2: the decision, launch and poll overlap GPU work, as a CUDA stream allows;
    an urgent arrival then waits for at most two slices). And the slice length has an overhead
    floor: the gap ``o`` that remains between slices is measured online (:meth:`observe_gap`,
    an EWMA) and a slice lasts at least ``o x (1 - f) / f`` so that it stays below the
    fraction ``f`` (``overhead_fraction``) whenever the queue cannot hide it.
    Slices are shortened below the whole task only when a deadline may need the GPU sooner:
    ``beta x`` the smallest slack among recent arrivals (the latest a newly arrived task can
    afford to wait). Admission (Moore-Hodgson) and dropping count one gap per slice a task
    still needs, so a task that can no longer make its deadline is dropped before it wastes
    the GPU (IC2E'21: modified EDF, adaptive slice size, capacity estimator).
    """

    name = "edf-slice"

    def __init__(
        self,
        wave_blocks: int,
        peak: float,
        drop: str = "estimated",
        beta: float = 0.5,
        min_slice_s: float = 0.2e-3,
        max_slice_s: float = 20e-3,
        window: int = 32,
        overhead_fraction: float = 0.2,
        overhead_prior_s: float = 0.0,
        overhead_alpha: float = 0.2,
        overhead_aware: bool = True,
    ) -> None:
        super().__init__(wave_blocks, peak, drop)
        #: False: the first version (run on the H100 on 2026-11-22, kept as ``edf-slice-v1`` to
        #: compare): slices of ``beta x`` slack down to ``min_slice_s``, gaps ignored
        self.overhead_aware = overhead_aware
        # the gap is modelled by observe_gap; counting it in the rate too would count it twice
        # (and shorter slices would then see less capacity, cut slices shorter, and so on)
        self.rate_from_start = overhead_aware
        self.lookahead = 2 if overhead_aware else 1
        if not overhead_aware:
            self.name = "edf-slice-v1"
        if not (0 < overhead_fraction < 1):
            raise ValueError("overhead_fraction must be in (0, 1)")
        self.beta = beta
        self.min_slice_s = min_slice_s
        self.max_slice_s = max_slice_s
        self.overhead_fraction = overhead_fraction
        self.overhead_alpha = overhead_alpha
        #: EWMA of the idle gap one slice costs (seconds), learnt from :meth:`observe_gap`
        self.overhead_s = overhead_prior_s
        self.gaps = 0
        self._slacks: deque[float] = deque(maxlen=window)
        self._capacity_seen = peak

    def observe_gap(self, seconds: float) -> None:
        if not self.overhead_aware or not (seconds >= 0 and math.isfinite(seconds)):
            return
        a = self.overhead_alpha
        self.overhead_s = seconds if self.gaps == 0 else (1 - a) * self.overhead_s + a * seconds
        self.gaps += 1

    def on_arrival(self, st: TaskState, now: float) -> None:
        cap = self._capacity_seen
        self._slacks.append(st.task.deadline - now - st.remaining_flops / cap - self.overhead_s)

    def overhead_floor_s(self) -> float:
        """The shortest slice whose gap stays within ``overhead_fraction`` of its time."""
        f = self.overhead_fraction
        return self.overhead_s * (1 - f) / f

    def slice_seconds(self) -> float:
        """How long the next slice may run before the GPU must be given a scheduling point."""
        if not self.overhead_aware:
            slack = min(self._slacks) if self._slacks else self.min_slice_s
            return min(self.max_slice_s, max(self.min_slice_s, self.beta * slack))
        slack = min(self._slacks) if self._slacks else self.max_slice_s
        floor = max(self.min_slice_s, self.overhead_floor_s())
        return min(max(self.max_slice_s, floor), max(floor, self.beta * slack))

    @staticmethod
    def _slices_needed(st: TaskState, capacity: float, slice_s: float) -> int:
        return max(1, math.ceil(st.remaining_flops / capacity / slice_s - 1e-9))

    def _drop_infeasible(self, now: float, capacity: float) -> None:
        if self.drop != "estimated" or not self.overhead_aware:
            super()._drop_infeasible(now, capacity)
            return
        rate = min(self.peak, capacity)
        slice_s = self.slice_seconds()
        for tid, st in list(self.pending.items()):
            need = st.remaining_flops / rate + self._slices_needed(st, rate, slice_s) * self.overhead_s
            if now + need > st.task.deadline + EPS:
                st.dropped = now
                st.drop_reason = f"estimated: needs {need * 1e3:.3f} ms with slice gaps, has " \
                                 f"{(st.task.deadline - now) * 1e3:.3f} ms"  # fmt: skip
                del self.pending[tid]

    def choose(self, now: float, capacity: float) -> tuple[TaskState, int, Sequence[str]]:
        self._capacity_seen = capacity
        slice_s = self.slice_seconds()
        gap = self.overhead_s
        overhead = (lambda st: self._slices_needed(st, capacity, slice_s) * gap) if self.overhead_aware else None
        admitted, _ = moore_hodgson(list(self.pending.values()), now, capacity, overhead=overhead)
        pool = [s for s in admitted if s.remaining > s.inflight] or self.launchable()
        st = min(pool, key=lambda s: (s.task.deadline, s.task.arrival, s.task.id))
        blocks = self.blocks_for(slice_s, capacity, st)
        left = st.remaining - st.inflight
        if self.overhead_aware and left - blocks < self.blocks_for(self.overhead_floor_s(), capacity, st) // 2:
            blocks = left  # no tail slice that would cost more in gaps than it saves
        return st, blocks, tuple(s.task.id for s in pool)


class EDFSliceOffline(Scheduler):
    """Modified EDF with adaptive slice sizes, offline variant: the whole trace is known."""

    name = "edf-slice-offline"

    def __init__(
        self,
        wave_blocks: int,
        peak: float,
        tasks: Sequence[Task],
        drop: str = "estimated",
        min_slice_s: float = 0.2e-3,
        replan_drift: float = 0.1,
    ) -> None:
        super().__init__(wave_blocks, peak, drop)
        self.known = sorted(tasks, key=lambda t: (t.arrival, t.id))
        self._arrivals = [t.arrival for t in self.known]
        self.min_slice_s = min_slice_s
        self.replan_drift = replan_drift
        self._admitted: set[str] = set()
        self._plan_capacity = 0.0
        self._plan_arrivals = -1
        self._plan_pending: frozenset[str] = frozenset()
        self._horizon = 2.0 * max((t.deadline - t.arrival for t in tasks), default=0.0)

    def _future(self, now: float) -> list[TaskState]:
        out = []
        for t in self.known[bisect.bisect_left(self._arrivals, now - EPS):]:
            if t.arrival > now + self._horizon:
                break
            if t.id not in self.states:
                out.append(TaskState(t, t.blocks))
        return out

    def plan(self, now: float, capacity: float) -> set[str]:
        """Preemptive EDF over known tasks at ``capacity``, rejecting the largest remaining
        task each time the simulated schedule misses a deadline; returns the admitted ids."""
        cands = list(self.pending.values()) + self._future(now)
        rejected: set[str] = set()
        while True:
            miss = _simulate_edf(cands, rejected, now, capacity)
            if miss is None:
                return {s.task.id for s in cands if s.task.id not in rejected}
            # among tasks competing with the missed one (arrived by its deadline, earlier or
            # equal deadline), drop the one needing the most work
            competing = [s for s in cands if s.task.id not in rejected and s.task.deadline <= miss.task.deadline + EPS
                         and s.task.arrival <= miss.task.deadline]  # fmt: skip
            worst = max(competing, key=lambda s: (s.remaining_flops, s.task.id))
            rejected.add(worst.task.id)

    def choose(self, now: float, capacity: float) -> tuple[TaskState, int, Sequence[str]]:
        arrived = len(self.states)
        drift = abs(capacity - self._plan_capacity) / max(self._plan_capacity, 1.0)
        pend = frozenset(self.pending)
        exhausted = not (self._admitted & pend) and pend != self._plan_pending
        if arrived != self._plan_arrivals or drift > self.replan_drift or exhausted:
            self._admitted = self.plan(now, capacity)
            self._plan_capacity = capacity
            self._plan_arrivals = arrived
            self._plan_pending = pend
        pool = [s for s in self.pending.values() if s.task.id in self._admitted] or list(self.pending.values())
        st = min(pool, key=lambda s: (s.task.deadline, s.task.arrival, s.task.id))
        # slice until the next admitted task with an earlier deadline arrives
        preempt = math.inf
        for t in self.known[bisect.bisect_right(self._arrivals, now + EPS):]:
            if t.arrival > st.task.deadline:
                break  # arriving after our deadline: cannot need the GPU before we finish
            if t.id not in self.states and t.deadline < st.task.deadline and t.id in self._admitted:
                preempt = t.arrival - now
                break
        if math.isinf(preempt):
            blocks = st.remaining
        else:
            blocks = self.blocks_for(max(self.min_slice_s, preempt), capacity, st)
        return st, blocks, tuple(s.task.id for s in pool)


def _simulate_edf(cands: Sequence[TaskState], rejected: set[str], now: float, capacity: float) -> TaskState | None:
    """Fluid preemptive EDF from ``now``; the first task to miss its deadline, or None."""
    events = sorted((s for s in cands if s.task.id not in rejected), key=lambda s: (max(s.task.arrival, now), s.task.id))
    ready: list[tuple[float, str, float, TaskState]] = []
    t = now
    i = 0
    while i < len(events) or ready:
        if not ready:
            t = max(t, max(events[i].task.arrival, now))
        while i < len(events) and max(events[i].task.arrival, now) <= t + EPS:
            s = events[i]
            heapq.heappush(ready, (s.task.deadline, s.task.id, s.remaining_flops / capacity, s))
            i += 1
        d, tid, left, s = heapq.heappop(ready)
        nxt = max(events[i].task.arrival, now) if i < len(events) else math.inf
        run = min(left, nxt - t)
        t += run
        left -= run
        if left > EPS:
            heapq.heappush(ready, (d, tid, left, s))
        elif t > d + EPS:
            return s
    return None


SCHEDULERS = ("fcfs", "rr", "edf", "edf-slice", "edf-slice-offline", "edf-slice-v1")


def make_scheduler(
    name: str, wave_blocks: int, peak: float, tasks: Sequence[Task] = (), drop: str | None = None, **kw: Any
) -> Scheduler:
    """A scheduler by name; ``drop`` defaults to off for the baselines, estimated for ours."""
    key = name.strip().lower()
    if key == "fcfs":
        return FCFS(wave_blocks, peak, drop or "off")
    if key == "rr":
        return RoundRobin(wave_blocks, peak, drop or "off", **kw)
    if key == "edf":
        return EDF(wave_blocks, peak, drop or "off")
    if key == "edf-slice":
        return EDFSlice(wave_blocks, peak, drop or "estimated", **kw)
    if key == "edf-slice-v1":
        return EDFSlice(wave_blocks, peak, drop or "estimated", overhead_aware=False, **kw)
    if key == "edf-slice-offline":
        return EDFSliceOffline(wave_blocks, peak, tasks, drop or "estimated", **kw)
    raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")


# -- running a workload on a backend -----------------------------------------------------------------
@dataclass(frozen=True)
class BackgroundLoad:
    """Other VMs on the same GPU: each alternates busy/idle periods (exponential, seeded) and
    keeps kernels of ``kernel_s`` queued while busy."""

    vms: int = 1
    duty: float = 0.5
    period_s: float = 20e-3
    kernel_s: float = 1e-3
    seed: int = 1


class _BgVM:
    def __init__(self, backend: GpuBackend, device: int, load: BackgroundLoad, idx: int, t0: float) -> None:
        self.b = backend
        self.ctx = backend.create_context(device, 1.0, label=f"bg{idx}")
        gpu = backend.devices()[device].gpu_type
        self.kernel = KernelSpec.from_time(load.kernel_s, gpu, name=f"bg{idx}")
        self.rng = random.Random(load.seed * 1000 + idx)
        self.load = load
        self.t0 = t0
        self.on = self.rng.random() < load.duty
        self.switch_at = self._period()
        self.ops: list[int] = []
        self.kernels = 0

    def _period(self) -> float:
        mean = self.load.period_s * (self.load.duty if self.on else 1 - self.load.duty)
        return self.rng.expovariate(1.0 / max(mean, 1e-9))

    def pump(self, now: float) -> None:
        while now >= self.switch_at:
            self.on = not self.on
            self.switch_at += self._period()
        self.ops = [o for o in self.ops if not self.b.done(o)]
        if self.on:
            while len(self.ops) < 2:
                self.ops.append(self.b.launch(self.ctx, self.kernel))
                self.kernels += 1


@dataclass
class FaasResult:
    scheduler: str
    drop: str
    tasks: int
    met: int
    missed: int
    dropped: int
    executed_gflop: float
    wasted_gflop: float
    slices: int
    makespan_s: float
    capacity_final: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)

    @property
    def goodput(self) -> float:
        return self.met / self.tasks if self.tasks else 0.0

    @property
    def wasted_fraction(self) -> float:
        return self.wasted_gflop / self.executed_gflop if self.executed_gflop else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "drop": self.drop,
            "tasks": self.tasks,
            "met": self.met,
            "missed": self.missed,
            "dropped": self.dropped,
            "goodput": round(self.goodput, 4),
            "executed_gflop": round(self.executed_gflop, 3),
            "wasted_gflop": round(self.wasted_gflop, 3),
            "wasted_fraction": round(self.wasted_fraction, 4),
            "slices": self.slices,
            "makespan_s": round(self.makespan_s, 6),
            "capacity_tflops": round(self.capacity_final / 1e12, 3),
        }


def run_faas(
    backend: GpuBackend,
    tasks: Sequence[Task],
    scheduler: Scheduler,
    device: int = 0,
    share: float = 1.0,
    background: BackgroundLoad | None = None,
    estimator: CapacityEstimator | None = None,
) -> FaasResult:
    """Replay ``tasks`` (arrival times relative to now) on ``device`` with ``scheduler``.

    Up to ``scheduler.lookahead`` slices are in flight on the FaaS context (one for most
    schedulers, so every slice end is a scheduling point); background VMs (if any) load the
    same device through their own contexts.
    """
    info = backend.devices()[device]
    gpu = info.gpu_type
    ctx = backend.create_context(device, share, label=f"faas-{scheduler.name}")
    est = estimator or CapacityEstimator(peak=scheduler.peak)
    t0 = backend.now()
    bgs = [_BgVM(backend, device, background, i, t0) for i in range(background.vms)] if background else []
    arrivals = sorted(tasks, key=lambda t: (t.arrival, t.id))
    by_id = {t.id: t for t in arrivals}
    i = 0
    # launched slices in stream order: (op, decision, launched at the first opportunity?)
    inflight: deque[tuple[int, SliceDecision, bool]] = deque()
    slices = 0
    last_end: float | None = None  # end of our latest slice, if work was waiting then
    completed = False  # a slice of ours completed in the previous round
    try:
        while True:
            now = backend.now() - t0
            while i < len(arrivals) and arrivals[i].arrival <= now + EPS:
                scheduler.add(arrivals[i], now)
                i += 1
            while len(inflight) < scheduler.lookahead:
                d = scheduler.next_slice(now, est.capacity)
                if d is None:
                    break
                t = by_id[d.task]
                spec = KernelSpec(blocks=d.blocks, flops_per_block=t.flops_per_block, name=t.fn,
                                  block_offset=d.offset)  # fmt: skip
                # eager: queued behind our running slice, or launched as soon as one ended;
                # only then is the idle time before it the cost of a slice
                inflight.append((backend.launch(ctx, spec), d, bool(inflight) or completed))
                scheduler.slice_launched(d.task, d.blocks)
                slices += 1
            completed = False
            if not inflight and i >= len(arrivals) and not scheduler.has_pending():
                break
            for bg in bgs:
                bg.pump(now)
            nxt = arrivals[i].arrival if i < len(arrivals) else math.inf
            for bg in bgs:
                nxt = min(nxt, bg.switch_at)
            until = None if math.isinf(nxt) else t0 + nxt
            waiting = [op for op, _, _ in inflight] + [o for bg in bgs for o in bg.ops]
            if waiting:
                done = backend.wait(waiting, until=until)
            elif until is not None:
                backend.advance_to(until)
                done = []
            else:  # nothing running, nothing queued, nothing to come
                break
            while inflight and inflight[0][0] in done:  # one stream: slices end in order
                op, d, eager = inflight.popleft()
                tm = backend.timing(op)
                est.observe(tm.flops, tm.end - (tm.start if scheduler.rate_from_start else tm.submit))
                if eager and last_end is not None:
                    scheduler.observe_gap(max(0.0, tm.start - last_end))
                scheduler.slice_done(d.task, d.blocks, tm.end - t0)
                last_end = tm.end if scheduler.has_pending() else None
                completed = True
        end = backend.now() - t0
    finally:
        for bg in bgs:
            backend.synchronize(bg.ctx)
            backend.destroy_context(bg.ctx)
        backend.synchronize(ctx)
        backend.destroy_context(ctx)
    return _result(scheduler, gpu, end, est, slices)


def _result(s: Scheduler, gpu: GpuType, end: float, est: CapacityEstimator, slices: int) -> FaasResult:
    rows = []
    met = missed = dropped = 0
    executed = wasted = 0.0
    for st in s.states.values():
        ok = st.finished is not None and st.finished <= st.task.deadline + EPS
        if ok:
            met += 1
        elif st.dropped is not None:
            dropped += 1
        else:
            missed += 1
        executed += st.executed_flops
        if not ok:
            wasted += st.executed_flops
        rows.append({
            "task": st.task.id,
            "function": st.task.fn,
            "arrival_ms": round(st.task.arrival * 1e3, 6),
            "deadline_ms": round(st.task.deadline * 1e3, 6),
            "finish_ms": None if st.finished is None else round(st.finished * 1e3, 6),
            "outcome": "met" if ok else ("dropped" if st.dropped is not None else "missed"),
            "slices": st.slices,
            "executed_gflop": round(st.executed_flops / 1e9, 6),
            "gflop": round(st.task.flops / 1e9, 6),
        })  # fmt: skip
    return FaasResult(
        scheduler=s.name,
        drop=s.drop,
        tasks=len(s.states),
        met=met,
        missed=missed,
        dropped=dropped,
        executed_gflop=executed / 1e9,
        wasted_gflop=wasted / 1e9,
        slices=slices,
        makespan_s=end,
        capacity_final=est.capacity,
        rows=rows,
        decisions=list(s.decisions),
    )


def wave_blocks_for(backend: GpuBackend, device: int, share: float) -> int:
    """SMs a FaaS context can use at once: its share in spatial modes, all in time slicing."""
    info = backend.devices()[device]
    sms = info.gpu_type.sm_count
    if info.sched.startswith("timeslice"):
        return sms
    return max(1, int(share * sms + 1e-9))


def run_trace(
    backend: GpuBackend,
    tasks: Sequence[Task],
    scheduler: str = "edf-slice",
    device: int = 0,
    share: float = 1.0,
    drop: str | None = None,
    background: BackgroundLoad | None = None,
    **kw: Any,
) -> FaasResult:
    """Convenience: build the named scheduler for ``device`` and run ``tasks``."""
    sched = make_scheduler(
        scheduler, wave_blocks_for(backend, device, share), peak_for(backend, device, share), tasks, drop, **kw
    )
    return run_faas(backend, tasks, sched, device=device, share=share, background=background)


def peak_for(backend: GpuBackend, device: int, share: float) -> float:
    """The most FLOP/s a FaaS context can ever get: the bound behind ``drop="certain"``.

    Strict partitions cap it at the share; other modes may lend it the whole device. The
    simulator's jitter can make a wave faster than nominal, so its bound is widened by it.
    """
    info = backend.devices()[device]
    t = info.gpu_type
    sms = max(1, int(share * t.sm_count + 1e-9)) if info.sched == "spatial-strict" else t.sm_count
    return sms * t.sm_flops * (1.0 + float(getattr(backend, "jitter", 0.0)))
