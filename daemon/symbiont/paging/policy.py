"""Host paging policy (pure): the guest says *what* is cold, the host decides *how much*.

How much: a VM keeps its working set plus a margin resident; the rest of its resident guest
RAM may go to the swap tier: ``resident − (working set + margin)`` (never below a floor). The
working set is the guest's own sample (referenced mapped memory, ESX's f × memory), so a
busy guest keeps what it touches and an idle one shrinks towards the seed's few MiB.

What: the guest's list of guest-physical frames, in its order of preference (free frames,
then cold inactive-LRU pages), restricted to the pages that are resident on the host now —
a frame that is not resident costs nothing and paging it out frees nothing. Only when the
guest's lists do not cover the amount (or there is no cooperative agent) does the host pick
the rest blindly, from the top of guest RAM down; the decision log says which was used.

The guest is untrusted: :func:`sanitize_runs` bounds and clips what it sends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MAX_RUNS = 4096  # per class, as the agent sends at most
ALLOCATING_MIB = 16.0  # a guest whose own used memory rose this much in a period is allocating: not paged


@dataclass(frozen=True)
class Selection:
    """Page ranges (first page, count) within guest RAM to page out, and where they came from."""

    ranges: list[tuple[int, int]]
    pages_by_source: dict[str, int]

    @property
    def pages(self) -> int:
        return sum(self.pages_by_source.values())


def pageout_target_mib(resident_mib: float, wss_mib: float | None, margin_mib: float, floor_mib: float = 0.0) -> float:
    """How much of a VM's resident guest RAM to page out (MiB, ≥ 0).

    Without a working-set sample nothing is paged out: the host does not guess what a guest
    needs.
    """
    if wss_mib is None or wss_mib < 0:
        return 0.0
    keep = max(wss_mib + margin_mib, floor_mib)
    return max(0.0, resident_mib - keep)


def sanitize_runs(raw: object, npages: int, max_runs: int = MAX_RUNS) -> list[tuple[int, int]]:
    """A guest's ``[[first_pfn, count], ...]`` → sorted, non-overlapping runs inside ``npages``.

    Anything malformed raises ValueError (the whole answer is then ignored); runs are clipped
    to guest RAM, and more than ``max_runs`` is an error (the agent bounds its own answer).
    """
    if not isinstance(raw, list):
        raise ValueError("runs must be a list of [first_pfn, count]")
    if len(raw) > max_runs:
        raise ValueError(f"{len(raw)} runs, at most {max_runs} allowed")
    out: list[tuple[int, int]] = []
    for r in raw:
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            raise ValueError(f"run {r!r} is not [first_pfn, count]")
        a, n = r
        if a < 0 or n <= 0:
            raise ValueError(f"run {r!r} has a negative start or an empty count")
        a, b = min(a, npages), min(a + n, npages)
        if b > a:
            out.append((a, b - a))
    out.sort()
    merged: list[tuple[int, int]] = []
    for a, n in out:
        if merged and a <= merged[-1][0] + merged[-1][1]:
            pa, pn = merged[-1]
            merged[-1] = (pa, max(pa + pn, a + n) - pa)
        else:
            merged.append((a, n))
    return merged


def _mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    m = np.concatenate(([False], mask, [False]))
    d = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b - a)) for a, b in zip(d[0::2], d[1::2], strict=True)]


def select(present: np.ndarray, want_pages: int, classes: Sequence[tuple[str, list[tuple[int, int]]]],
           blind: bool = True) -> Selection:
    """Pick ``want_pages`` resident pages: from the guest's classes in order, then (``blind``)
    the remaining resident pages from the top of guest RAM down."""
    avail = present.astype(bool).copy()
    chosen = np.zeros_like(avail)
    by: dict[str, int] = {}
    left = max(0, int(want_pages))
    for name, runs in classes:
        if left <= 0:
            break
        cls = np.zeros_like(avail)
        for a, n in runs:
            cls[a:a + n] = True
        idx = np.flatnonzero(cls & avail)[:left]
        if idx.size:
            chosen[idx] = True
            avail[idx] = False
            by[name] = by.get(name, 0) + int(idx.size)
            left -= int(idx.size)
    if left > 0 and blind:
        idx = np.flatnonzero(avail)[::-1][:left]
        if idx.size:
            chosen[idx] = True
            by["host-blind"] = int(idx.size)
    return Selection(_mask_runs(chosen), by)


# -- the budget's shortfall (profile overcommit: host paging after ballooning) ------------------
@dataclass(frozen=True)
class VmFootprint:
    """One VM as the shortfall policy sees it, after this period's balloon decisions (the memory
    part ran first: its targets, pressure, ρ and u of this period)."""

    name: str
    running: bool  # a paused (parked) VM is paged out already and cannot answer its guest
    resident_mib: float  # guest RAM resident on the host
    allocated_mib: float  # the balloon target the memory part left this period
    wss_mib: float | None  # the guest's working set (memory part's sample)
    floor_mib: float  # the VM's minimum (policy memory.min_mib)
    pressure: bool = False  # the guest reports memory pressure this period (memory's PSI / MemAvailable test)
    growing: bool = False  # the memory part raised its balloon target this period (it is being given memory)
    rho: float | None = None  # memory's ρ for it (shares per page, idle pages taxed); None: not known
    unshared_fraction: float = 1.0  # u: the part of its memory KSM does not share (memory's figure)
    used_rise_mib: float = 0.0  # how much the guest's own used memory rose since the previous period

    @property
    def footprint_mib(self) -> float:
        """Guest memory the VM holds on the host, in guest MiB (what its balloon leaves resident)."""
        return min(self.resident_mib, self.allocated_mib)

    @property
    def host_mib(self) -> float:
        """Its footprint in host MiB: KSM-shared pages counted once, as the memory part counts
        its occupancy (Σ target × u) against the same budget."""
        return self.footprint_mib * min(1.0, max(0.0, self.unshared_fraction))

    @property
    def rank(self) -> float:
        """Memory's victim order: shares per *host* MiB, ρ/u (lowest pays first); unknown last."""
        u = min(1.0, max(0.0, self.unshared_fraction))
        if self.rho is None or not math.isfinite(self.rho) or u <= 0:
            return math.inf
        return self.rho / u


@dataclass(frozen=True)
class VmPageout:
    """One VM's line in a shortfall plan: what the policy saw and why it took (or did not)."""

    name: str
    take_mib: int  # guest MiB to page out (0: none)
    reason: str
    inputs: dict[str, object]


@dataclass(frozen=True)
class ShortfallPlan:
    budget_mib: float
    footprint_mib: float
    shortfall_mib: float
    pageouts: list[tuple[str, int]]  # (vm, MiB)
    refused: str | None = None  # why nothing may be done (a budget below the VMs' floors)
    vms: list[VmPageout] = field(default_factory=list)  # every VM, in the order considered
    left_mib: float = 0.0  # host MiB still over the budget after the page-outs (protected VMs, no cold memory)


def _inputs(v: VmFootprint, cold: float) -> dict[str, object]:
    return {"running": v.running, "resident_mib": round(v.resident_mib, 1), "allocated_mib": round(v.allocated_mib, 1),
            "footprint_mib": round(v.footprint_mib, 1), "host_mib": round(v.host_mib, 1),
            "wss_mib": None if v.wss_mib is None else round(v.wss_mib, 1), "floor_mib": v.floor_mib,
            "cold_mib": round(cold, 1), "pressure": v.pressure, "growing": v.growing,
            "used_rise_mib": round(v.used_rise_mib, 1),
            "rho": None if v.rho is None or not math.isfinite(v.rho) else round(v.rho, 6),
            "u": round(v.unshared_fraction, 4)}


def protected(v: VmFootprint) -> str | None:
    """Why host paging must not take from this VM this period (None: it may). seeds/002: host
    paging is the last resort, and a VM the balloon is giving memory to, or whose guest is short
    of memory, would only fault back what is taken (the host fights the guest)."""
    if not v.running:
        return "not running (parked or paused: paged out already)"
    if v.pressure:
        return "under memory pressure this period"
    if v.growing:
        return "its balloon target rises this period (the memory part is giving it memory)"
    if v.used_rise_mib >= ALLOCATING_MIB:
        return (f"its guest is allocating (used memory +{v.used_rise_mib:.0f} MiB since the last period): "
                "what is paged out would be faulted straight back")
    if v.wss_mib is None or v.wss_mib < 0:
        return "no working-set sample (the host does not guess what a guest needs)"
    return None


def shortfall_plan(budget_mib: float, vms: Sequence[VmFootprint], margin_mib: float,
                   min_step_mib: int = 4) -> ShortfallPlan:
    """How much to page out of which VM so the VMs' host footprint fits the budget, after the
    balloon did what it could (seeds/002: sharing, then ballooning, then host paging).

    Pure. A budget below the sum of the VMs' floors cannot be met by any lever: refused, nothing
    done. Otherwise the shortfall (Σ footprint × u − budget: KSM-shared memory counted once, as
    the memory part counts it) is taken from the VMs in memory's victim order — lowest ρ/u
    first, so idle VMs (taxed: low ρ) pay before busy ones — each up to its cold memory
    (resident − (working set + margin)), paging ``1/u`` guest MiB per host MiB. Never from a VM
    that is under pressure, whose balloon target rises this period, whose guest is allocating
    (its used memory rose by ``ALLOCATING_MIB`` in a period: its working-set sample lags what it
    just allocated, so it looks the coldest), that is not running, or that has no working-set
    sample: the shortfall those would have covered is left (``left_mib``)
    for the balloon of later periods. Every VM gets a line with its inputs and the reason.
    """
    floors = sum(v.floor_mib for v in vms)
    footprint = sum(v.host_mib for v in vms)
    if floors > budget_mib:
        why = (f"budget {budget_mib:.0f} MiB is below the registered VMs' minimum floors ({floors:.0f} MiB): "
               "raise memory.budget_mib or lower a VM's memory.min_mib")
        short = max(0.0, footprint - budget_mib)
        return ShortfallPlan(budget_mib, footprint, short, [], why, left_mib=short)
    short = footprint - budget_mib
    if short <= 0:
        return ShortfallPlan(budget_mib, footprint, 0.0, [])
    order = sorted(vms, key=lambda v: (v.rank, -pageout_target_mib(v.footprint_mib, v.wss_mib, margin_mib,
                                                                    v.floor_mib), v.name))
    out: list[tuple[str, int]] = []
    lines: list[VmPageout] = []
    left = short
    for v in order:
        cold = pageout_target_mib(v.footprint_mib, v.wss_mib, margin_mib, v.floor_mib)
        inputs = _inputs(v, cold)
        why = protected(v)
        take = 0
        if why is None:
            u = min(1.0, max(0.0, v.unshared_fraction))
            if left < min_step_mib:
                why = "not needed: the shortfall is covered by VMs ranked lower"
            elif u <= 0:
                why = "all of its memory is KSM-shared: paging it frees nothing"
            else:
                take = int(min(cold, left / u))
                if take < min_step_mib:
                    why = f"{cold:.0f} MiB cold (resident − working set − margin): below the {min_step_mib} MiB step"
                    take = 0
                else:
                    left -= take * u
                    why = (f"page out {take} MiB of {cold:.0f} MiB cold: {short:.0f} MiB over the budget after "
                           f"ballooning; lowest ρ/u first ({'unknown' if not math.isfinite(v.rank) else f'{v.rank:.4g}'})")
                    out.append((v.name, take))
        lines.append(VmPageout(v.name, take, why, inputs))
    return ShortfallPlan(budget_mib, footprint, short, out, vms=lines, left_mib=max(0.0, left))


# -- idle detection (seeds/004: "VM doesn't use its scheduling quantum entirely") ---------------
IDLE_LOAD = 0.5  # the guest's own 1-min load average at or above this: something is runnable in it


@dataclass(frozen=True)
class IdleSample:
    """One period's look at a VM for the idle policy (cumulative counters, differenced here)."""

    t: float  # when (seconds, monotonic or wall: only differences are used)
    running: bool  # libvirt's state is running (a paused/parked or down VM restarts the window)
    vcpu_s: float | None  # the VM's vCPU time so far (libvirt), None: not readable this period
    net_packets: int | None  # rx + tx packets on its tap(s) so far; None: it has no tap
    requests: int  # agent calls made for it from outside the control loop so far
    load1: float | None = None  # the guest's 1-min load average (its run queue), if its stats carry it


@dataclass(frozen=True)
class IdleVerdict:
    park: bool
    reason: str
    inputs: dict[str, object]


def idle_verdict(samples: Sequence[IdleSample], idle_after_s: float, idle_cpu_pct: float,
                 max_load: float = IDLE_LOAD) -> IdleVerdict:
    """Park or not, and why, from a VM's recent samples (oldest first). Pure.

    Idle means, over the last ``idle_after_s`` seconds without a gap: the VM ran the whole time,
    in *every* interval its vCPUs used less than ``idle_cpu_pct`` % of one core (it gave its
    scheduling quantum back: seeds/004's heuristic), no frame crossed its tap(s), nobody asked
    its agent anything, and the guest's own run queue (load average, when known) is below
    ``max_load``. Anything unknown within the window (a vCPU time not read) is not idle.
    """
    if not samples:
        return IdleVerdict(False, "no samples yet", {})
    last = samples[-1]
    # the window: the newest run of running samples, back to the first at or before now − idle_after_s
    start = len(samples) - 1
    while start > 0 and samples[start - 1].running and last.t - samples[start].t < idle_after_s:
        start -= 1
    win = samples[start:]
    span = last.t - win[0].t
    inputs: dict[str, object] = {"window_s": round(span, 1), "idle_after_s": idle_after_s,
                                 "idle_cpu_pct": idle_cpu_pct, "samples": len(win)}
    if not last.running:
        return IdleVerdict(False, "not running", inputs)
    if not all(s.running for s in win):
        return IdleVerdict(False, "not running for the whole window", inputs)
    peak = 0.0
    for a, b in zip(win, win[1:], strict=False):
        if a.vcpu_s is None or b.vcpu_s is None:
            return IdleVerdict(False, "vCPU time not known for the whole window", inputs)
        dt = b.t - a.t
        if dt <= 0:
            continue
        peak = max(peak, 100.0 * max(0.0, b.vcpu_s - a.vcpu_s) / dt)
    inputs["vcpu_peak_pct"] = round(peak, 2)
    if len(win) >= 2 and None not in (win[0].vcpu_s, last.vcpu_s) and span > 0:
        inputs["vcpu_mean_pct"] = round(100.0 * max(0.0, (last.vcpu_s or 0.0) - (win[0].vcpu_s or 0.0)) / span, 2)
    nets = [s.net_packets for s in win]
    packets = None if None in nets else int(nets[-1] or 0) - int(nets[0] or 0)  # type: ignore[operator]
    inputs["tap_packets"] = packets
    inputs["requests"] = last.requests - win[0].requests
    inputs["guest_load1"] = last.load1
    if peak >= idle_cpu_pct:
        return IdleVerdict(False, f"busy: vCPU {peak:.1f} % of a core (threshold {idle_cpu_pct:g} %)", inputs)
    if packets is not None and packets != 0:
        return IdleVerdict(False, f"{packets} frames on its tap", inputs)
    if last.requests != win[0].requests:
        return IdleVerdict(False, f"{last.requests - win[0].requests} agent requests from outside", inputs)
    if last.load1 is not None and last.load1 >= max_load:
        return IdleVerdict(False, f"guest load {last.load1:.2f} (≥ {max_load:g})", inputs)
    if span < idle_after_s:
        return IdleVerdict(False, f"idle for {span:.0f} of {idle_after_s:g} s", inputs)
    return IdleVerdict(True, (f"idle for {span:.0f} s: vCPU ≤ {peak:.1f} % of a core (< {idle_cpu_pct:g} %), "
                              f"{'no tap' if packets is None else 'no frames on its tap'}, no agent request"
                              + ("" if last.load1 is None else f", guest load {last.load1:.2f}")), inputs)


# -- where a VM's memory is (symbiont status) ----------------------------------------------------
@dataclass(frozen=True)
class VmMemoryInputs:
    """What the host and the guest say about one VM's memory (MiB)."""

    configured_mib: float  # boot memory (the guest RAM mapping's size)
    balloon_mib: float | None  # what the balloon leaves the guest (libvirt current); None: not ballooned
    guest_used_mib: float | None  # MemTotal − MemAvailable (the guest's own view)
    ram_resident_mib: float  # guest RAM mapping, resident (smaps)
    ram_swapped_mib: float  # guest RAM mapping, in swap (smaps)
    ksm_shared_mib: float | None  # guest RAM pages merged by KSM (ksm_merging_pages)
    code_resident_mib: float = 0.0  # TCG translation cache
    code_swapped_mib: float = 0.0
    other_resident_mib: float = 0.0  # QEMU's heap, stacks, libraries
    other_swapped_mib: float = 0.0
    pss_mib: float | None = None  # the QEMU process's PSS (KSM-shared pages split among sharers)
    swap_cost: float | None = None  # the tier's compressed / stored bytes: what a swapped MiB costs in RAM


def account(m: VmMemoryInputs) -> dict[str, float | None]:
    """Each MiB of a VM's configured memory in exactly one place (docs/paging.md)::

        configured = ballooned + paged_out + shared + private + untouched

    paged_out, shared (KSM-merged, resident) and private (resident, not merged) are host
    facts about the guest RAM mapping; ballooned is what the balloon took (configured −
    balloon), as far as the host facts leave room for it; untouched is the rest (never
    touched, or freed by the guest and reported free). A reading that does not fit (KSM's
    stale counter above resident, a balloon that just moved) is clamped, never counted twice.
    QEMU's own memory (code cache + other) is not guest memory: reported apart as overhead.
    Host footprint = PSS + swapped × the tier's compression ratio (RSS would count a shared
    page once per sharer, and a swapped page costs its compressed size).
    """
    c = max(0.0, m.configured_mib)
    paged = min(max(0.0, m.ram_swapped_mib), c)
    resident = min(max(0.0, m.ram_resident_mib), c - paged)
    shared = min(max(0.0, m.ksm_shared_mib or 0.0), resident)
    private = resident - shared
    took = c - m.balloon_mib if m.balloon_mib is not None else 0.0
    ballooned = min(max(0.0, took), c - paged - resident)
    untouched = c - paged - resident - ballooned
    overhead = max(0.0, m.code_resident_mib) + max(0.0, m.other_resident_mib)
    swapped_all = paged + max(0.0, m.code_swapped_mib) + max(0.0, m.other_swapped_mib)
    rss = resident + overhead
    base = m.pss_mib if m.pss_mib is not None else rss
    cost = m.swap_cost if m.swap_cost is not None and m.swap_cost > 0 else 1.0
    return {"configured_mib": c, "ballooned_mib": ballooned, "paged_out_mib": paged, "shared_mib": shared,
            "private_mib": private, "untouched_mib": untouched, "guest_used_mib": m.guest_used_mib,
            "qemu_overhead_mib": overhead, "overhead_swapped_mib": swapped_all - paged,
            "rss_mib": rss, "swap_mib": swapped_all, "pss_mib": m.pss_mib,
            "host_mib": base + swapped_all * cost}
