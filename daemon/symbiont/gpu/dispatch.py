"""FaaSter-style dispatch of function invocations over heterogeneous GPUs (HiPC 2021 slides).

A library of functions is served from several GPU types. The slides' three ingredients:

1. **Profiles** (:func:`profile_functions`): each function is run on each GPU type at several
   input sizes (the items of one launch, i.e. the slice sizes a split invocation would use),
   timing the whole invocation (copy in, kernel, copy out). A least-squares line
   ``t(n) = a + b n`` per (function, type) gives the fixed cost ``a`` (latencies, launch,
   tail) and the per-item cost ``b``.
2. **Load**: each device has one in-order stream, so its backlog is the predicted time of
   the work queued on it, re-anchored on every completion.
3. **Dispatch** (:class:`Dispatcher`, policy ``faaster``): send the invocation where its
   expected completion ``now + backlog_d + a_d + b_d n`` is smallest. If the function is
   *amenable to slicing* (``sliceable`` and cheap fixed cost), the invocation may be split
   over several devices, sized by water-filling so all parts are expected to end together;
   this is used only when it beats the best single device by more than ``split_gain`` of
   the wait and by more than the extra GPU time the parts' fixed costs add.

Baselines: ``round-robin``, ``random``, ``least-loaded`` (fewest outstanding parts) and
``fastest`` (always the type with the highest peak FLOP/s, least backlog among them).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from symbiont.gpu.backend import GpuBackend, KernelSpec

POLICIES = ("faaster", "faaster-nosplit", "round-robin", "random", "least-loaded", "fastest")


@dataclass(frozen=True)
class FunctionModel:
    """A library function: work and data per input item (e.g. per image)."""

    name: str
    flops_per_item: float
    bytes_in_per_item: int
    bytes_out_per_item: int
    dram_bytes_per_item: float = 0.0
    blocks_per_item: int = 1
    sliceable: bool = True

    def kernel(self, items: int) -> KernelSpec:
        k = self.blocks_per_item
        return KernelSpec(
            blocks=max(1, items * k),
            flops_per_block=self.flops_per_item / k,
            dram_bytes_per_block=self.dram_bytes_per_item / k,
            name=self.name,
        )


#: A small library: compute bound, memory bound, transfer bound, and one that cannot be split.
DEFAULT_FUNCTIONS = (
    FunctionModel("matmul", flops_per_item=2.0e8, bytes_in_per_item=64_000, bytes_out_per_item=16_000,
                  blocks_per_item=16),  # fmt: skip
    FunctionModel("stencil", flops_per_item=4.0e6, bytes_in_per_item=64_000, bytes_out_per_item=64_000,
                  dram_bytes_per_item=6.4e7, blocks_per_item=32),  # fmt: skip
    FunctionModel("resize", flops_per_item=1.0e6, bytes_in_per_item=600_000, bytes_out_per_item=150_000),
    FunctionModel("inference", flops_per_item=1.0e8, bytes_in_per_item=150_000, bytes_out_per_item=4_000,
                  blocks_per_item=8, sliceable=False),  # fmt: skip
)


@dataclass(frozen=True)
class Profile:
    fn: str
    gpu_type: str
    a: float  # fixed seconds per launch
    b: float  # seconds per item
    r2: float
    points: int

    def predict(self, items: int) -> float:
        return self.a + self.b * items


@dataclass
class ProfileTable:
    profiles: dict[tuple[str, str], Profile] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def get(self, fn: str, gpu_type: str) -> Profile:
        p = self.profiles.get((fn, gpu_type))
        if p is None:
            raise KeyError(f"no profile for function {fn!r} on {gpu_type!r}")
        return p

    def as_rows(self) -> list[dict[str, Any]]:
        return [
            {"function": p.fn, "gpu_type": p.gpu_type, "fixed_ms": round(p.a * 1e3, 5),
             "per_item_us": round(p.b * 1e6, 5), "r2": round(p.r2, 5), "points": p.points}
            for p in self.profiles.values()
        ]  # fmt: skip


def _run_once(backend: GpuBackend, ctx: int, fn: FunctionModel, items: int) -> float:
    bin_ = backend.alloc(ctx, max(1, fn.bytes_in_per_item * items))
    bout = backend.alloc(ctx, max(1, fn.bytes_out_per_item * items))
    try:
        o1 = backend.memcpy_h2d(bin_)
        backend.launch(ctx, fn.kernel(items))
        o3 = backend.memcpy_d2h(bout)
        backend.wait_all([o3])
        return backend.timing(o3).end - backend.timing(o1).submit
    finally:
        backend.free(bin_)
        backend.free(bout)


def profile_functions(
    backend: GpuBackend,
    functions: Sequence[FunctionModel] = DEFAULT_FUNCTIONS,
    sizes: Sequence[int] = (1, 8, 64, 256),
    reps: int = 2,
    devices: Sequence[int] | None = None,
) -> ProfileTable:
    """Measure every function on one idle device of each GPU type and fit ``a + b n``."""
    table = ProfileTable()
    seen: dict[str, int] = {}
    for info in backend.devices():
        if devices is not None and info.index not in devices:
            continue
        seen.setdefault(info.gpu_type.name, info.index)
    for tname, dev in seen.items():
        ctx = backend.create_context(dev, 1.0, label="profiler")
        try:
            for fn in functions:
                xs, ys = [], []
                for n in sizes:
                    for r in range(reps):
                        t = _run_once(backend, ctx, fn, n)
                        xs.append(n)
                        ys.append(t)
                        table.rows.append({"function": fn.name, "gpu_type": tname, "items": n, "rep": r,
                                           "seconds": t})  # fmt: skip
                x, y = np.asarray(xs, float), np.asarray(ys, float)
                if len(set(xs)) >= 2:
                    b, a = np.polyfit(x, y, 1)
                else:
                    a, b = float(y.mean()), 0.0
                a, b = max(0.0, float(a)), max(1e-12, float(b))
                pred = a + b * x
                ss = float(((y - y.mean()) ** 2).sum())
                r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
                table.profiles[(fn.name, tname)] = Profile(fn.name, tname, a, b, r2, len(xs))
        finally:
            backend.destroy_context(ctx)
    return table


@dataclass(frozen=True)
class Invocation:
    id: str
    fn: str
    items: int
    arrival: float  # seconds from the start


def synthetic_invocations(
    functions: Sequence[FunctionModel],
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
    items_range: tuple[int, int] = (4, 512),
) -> list[Invocation]:
    """Poisson arrivals; log-uniform input sizes (many small, some large invocations)."""
    rng = random.Random(seed)
    out: list[Invocation] = []
    t = 0.0
    lo, hi = math.log(items_range[0]), math.log(items_range[1])
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            return out
        fn = rng.choice(list(functions))
        out.append(Invocation(f"i{len(out) + 1}", fn.name, max(1, round(math.exp(rng.uniform(lo, hi)))), t))


@dataclass
class _Part:
    inv: str
    device: int
    items: int
    predicted: float
    last_op: int
    bufs: tuple[int, int]


class Dispatcher:
    """Places invocations on devices by ``policy`` and submits them to the backend."""

    def __init__(
        self,
        backend: GpuBackend,
        functions: Sequence[FunctionModel],
        profiles: ProfileTable,
        policy: str = "faaster",
        devices: Sequence[int] | None = None,
        seed: int = 0,
        split_gain: float = 0.1,
        min_items: int = 4,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown dispatch policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.b = backend
        self.fns = {f.name: f for f in functions}
        self.profiles = profiles
        self.policy = policy
        self.devs = list(devices) if devices is not None else [d.index for d in backend.devices()]
        self.types = {d.index: d.gpu_type for d in backend.devices()}
        self.ctx = {d: backend.create_context(d, 1.0, label="faaster") for d in self.devs}
        self.queues: dict[int, deque[_Part]] = {d: deque() for d in self.devs}
        self.free_at: dict[int, float] = {d: 0.0 for d in self.devs}
        self.rng = random.Random(seed)
        self._rr = 0
        self.split_gain = split_gain
        self.min_items = min_items
        self.decisions: list[dict[str, Any]] = []

    def close(self) -> None:
        for d in self.devs:
            self.b.synchronize(self.ctx[d])
            self.collect()
            self.b.destroy_context(self.ctx[d])

    def backlog(self, dev: int, now: float) -> float:
        return max(0.0, self.free_at[dev] - now)

    def predict(self, fn: str, dev: int, items: int) -> float:
        return self.profiles.get(fn, self.types[dev].name).predict(items)

    def plan(self, inv: Invocation, now: float) -> list[tuple[int, int]]:
        """[(device, items)] for ``inv`` under the policy."""
        devs = self.devs
        if self.policy == "round-robin":
            d = devs[self._rr % len(devs)]
            self._rr += 1
            return [(d, inv.items)]
        if self.policy == "random":
            return [(self.rng.choice(devs), inv.items)]
        if self.policy == "least-loaded":
            return [(min(devs, key=lambda d: (len(self.queues[d]), d)), inv.items)]
        if self.policy == "fastest":
            top = max(self.types[d].peak_flops for d in devs)
            fast = [d for d in devs if self.types[d].peak_flops >= top]
            return [(min(fast, key=lambda d: (self.backlog(d, now), d)), inv.items)]
        finish = {d: now + self.backlog(d, now) + self.predict(inv.fn, d, inv.items) for d in devs}
        best = min(devs, key=lambda d: (finish[d], d))
        fn = self.fns[inv.fn]
        if self.policy == "faaster" and fn.sliceable and inv.items >= 2 * self.min_items and len(devs) > 1:
            parts, t_split = self._water_fill(inv, now)
            if len(parts) > 1:
                # split only when this invocation gains more time than the GPUs spend extra on
                # the parts' fixed costs (which every queued invocation would pay for)
                alone = self.predict(inv.fn, best, inv.items)
                extra = sum(self.predict(inv.fn, d, n) for d, n in parts) - alone
                saved = finish[best] - t_split
                if saved > self.split_gain * (finish[best] - now) and saved > extra:
                    return parts
        return [(best, inv.items)]

    def _water_fill(self, inv: Invocation, now: float) -> tuple[list[tuple[int, int]], float]:
        """Split ``inv.items`` so every used device is expected to finish at the same time."""
        prof = {d: self.profiles.get(inv.fn, self.types[d].name) for d in self.devs}
        start = {d: now + self.backlog(d, now) + prof[d].a for d in self.devs}

        def items_by(t: float) -> dict[int, float]:
            return {d: max(0.0, (t - start[d]) / prof[d].b) for d in self.devs}

        lo = min(start.values())
        hi = max(start.values()) + max(p.b for p in prof.values()) * inv.items
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(items_by(mid).values()) >= inv.items:
                hi = mid
            else:
                lo = mid
        share = items_by(hi)
        parts = {d: int(math.floor(x)) for d, x in share.items() if x >= self.min_items}
        if not parts:
            return [], math.inf
        left = inv.items - sum(parts.values())
        for d in sorted(parts, key=lambda d: start[d] + prof[d].b * parts[d]):
            if left <= 0:
                break
            parts[d] += 1
            left -= 1
        if left > 0:
            d0 = min(parts, key=lambda d: start[d] + prof[d].b * parts[d])
            parts[d0] += left
        t_end = max(start[d] + prof[d].b * n for d, n in parts.items())
        return sorted(parts.items()), t_end

    def submit(self, inv: Invocation, now: float) -> list[_Part]:
        fn = self.fns.get(inv.fn)
        if fn is None:
            raise KeyError(f"unknown function {inv.fn!r}")
        plan = self.plan(inv, now)
        parts = []
        for d, n in plan:
            ctx = self.ctx[d]
            bi = self.b.alloc(ctx, max(1, fn.bytes_in_per_item * n))
            bo = self.b.alloc(ctx, max(1, fn.bytes_out_per_item * n))
            self.b.memcpy_h2d(bi)
            self.b.launch(ctx, fn.kernel(n))
            last = self.b.memcpy_d2h(bo)
            pred = self.predict(inv.fn, d, n)
            self.free_at[d] = max(self.free_at[d], now) + pred
            p = _Part(inv.id, d, n, pred, last, (bi, bo))
            self.queues[d].append(p)
            parts.append(p)
        self.decisions.append({"invocation": inv.id, "time": now, "parts": [(d, n) for d, n in plan]})
        return parts

    def outstanding_ops(self) -> list[int]:
        return [q[0].last_op for q in self.queues.values() if q]

    def collect(self) -> list[tuple[_Part, float]]:
        """Finished parts (with their end time), re-anchoring each device's backlog."""
        out = []
        for d, q in self.queues.items():
            while q and self.b.done(q[0].last_op):
                p = q.popleft()
                end = self.b.timing(p.last_op).end
                for buf in p.bufs:
                    self.b.free(buf)
                self.free_at[d] = end + sum(x.predicted for x in q)
                out.append((p, end))
        return out


@dataclass
class DispatchResult:
    policy: str
    invocations: int
    mean_turnaround_s: float
    p95_turnaround_s: float
    max_turnaround_s: float
    split: int
    per_device: dict[str, int]
    rows: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "invocations": self.invocations,
            "mean_turnaround_ms": round(self.mean_turnaround_s * 1e3, 4),
            "p95_turnaround_ms": round(self.p95_turnaround_s * 1e3, 4),
            "max_turnaround_ms": round(self.max_turnaround_s * 1e3, 4),
            "split": self.split,
            "per_device": self.per_device,
        }


def run_dispatch(
    backend: GpuBackend,
    invocations: Sequence[Invocation],
    functions: Sequence[FunctionModel],
    profiles: ProfileTable,
    policy: str = "faaster",
    seed: int = 0,
    devices: Sequence[int] | None = None,
) -> DispatchResult:
    """Replay ``invocations`` (arrival times relative to now) through a dispatcher."""
    disp = Dispatcher(backend, functions, profiles, policy, devices=devices, seed=seed)
    t0 = backend.now()
    arrivals = sorted(invocations, key=lambda v: (v.arrival, v.id))
    parts_left: dict[str, int] = {}
    ends: dict[str, float] = {}
    placed: dict[str, list[tuple[int, int]]] = {}
    i = 0
    try:
        while True:
            now = backend.now() - t0
            while i < len(arrivals) and arrivals[i].arrival <= now + 1e-12:
                inv = arrivals[i]
                parts = disp.submit(inv, backend.now())
                parts_left[inv.id] = len(parts)
                placed[inv.id] = [(p.device, p.items) for p in parts]
                i += 1
            for p, end in disp.collect():
                parts_left[p.inv] -= 1
                ends[p.inv] = max(ends.get(p.inv, 0.0), end - t0)
            ops = disp.outstanding_ops()
            if i >= len(arrivals) and not ops:
                break
            until = t0 + arrivals[i].arrival if i < len(arrivals) else None
            if ops:
                backend.wait(ops, until=until)
            elif until is not None:
                backend.advance_to(until)
    finally:
        disp.close()
    rows = []
    turn = []
    per_dev: dict[str, int] = {}
    for v in arrivals:
        ta = ends[v.id] - v.arrival
        turn.append(ta)
        for d, _ in placed[v.id]:
            key = f"{d}:{disp.types[d].name}"
            per_dev[key] = per_dev.get(key, 0) + 1
        rows.append({"invocation": v.id, "function": v.fn, "items": v.items, "arrival_ms": round(v.arrival * 1e3, 6),
                     "turnaround_ms": round(ta * 1e3, 6),
                     "devices": " ".join(f"{d}x{n}" for d, n in placed[v.id])})  # fmt: skip
    arr = np.asarray(turn) if turn else np.zeros(1)
    return DispatchResult(
        policy=policy,
        invocations=len(arrivals),
        mean_turnaround_s=float(arr.mean()),
        p95_turnaround_s=float(np.percentile(arr, 95)),
        max_turnaround_s=float(arr.max()),
        split=sum(1 for v in placed.values() if len(v) > 1),
        per_device=per_dev,
        rows=rows,
    )
