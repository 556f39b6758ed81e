"""Pure policy for containers inside a VM: CPU ratio keeping and share-based memory reclamation.

No I/O here: every function is a pure function of what it is given, so that the guest agent
(which applies the results to cgroup v2 files) and the host daemon (which explains,
simulates and tests them: ``symbiont.cpu.policy``) share one implementation.

CPU (the seed's "1:1:4 desired CPU allocation ratio, not maintained after scaling down"):
each ratio-managed container ``i`` has a ratio ``r_i``. With ``N`` CPUs online its entitlement
is ``a_i = N * r_i / sum(r)`` CPUs. Strategy ``pin-share`` (the default) gives every
container ``floor(a_i)`` dedicated CPUs (cpuset pinning) and lets the fractional parts share a
pool of the remaining ``N - sum(floor(a_i))`` CPUs, where ``cpu.max = a_i`` and
``cpu.weight ~ r_i`` split it (sharing); the pool's fractions add up to its size exactly.
Strategy ``quota`` puts every container on all online CPUs with the same quotas and
weights. Both are recomputed after every vCPU change. The nesting-agnostic baseline computes
the allocation when containers start and never touches it after a vCPU change, and it
expresses the ratio in absolute terms only (quota, pinning, default weights), like a
container manager (``docker --cpus --cpuset-cpus``) under stock vCPU unplug.

Memory: when the host wants ``W`` bytes back, reclaim water-fills: containers flagged
no-reclaim give nothing; the others are brought down towards usage proportional to their
shares (``t_i = clamp(lambda * s_i, floor_i, u_i)``, one ``lambda`` for all), so that the
containers using the most memory per share give first and the usage ratio after
reclamation follows the configured shares as closely as the amount allows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

CPU_STRATEGIES = ("pin-share", "quota")
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000
WEIGHT_MIN, WEIGHT_MAX = 1, 10_000
EPS = 1e-9


@dataclass(frozen=True)
class CpuAlloc:
    """What one ratio-managed container gets on the CPUs online now."""

    cpus: float  # entitlement a_i in CPUs
    cpuset: tuple[int, ...]  # CPUs it may run on
    dedicated: tuple[int, ...]  # of those, CPUs no other managed container uses
    quota_us: int  # cpu.max quota per period
    period_us: int
    weight: int  # cpu.weight

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cpuset"] = list(self.cpuset)
        d["dedicated"] = list(self.dedicated)
        return d


def entitlements(ratios: Mapping[str, float], ncpus: int) -> dict[str, float]:
    """``a_i = ncpus * r_i / sum(r)`` for every container with a positive ratio."""
    if ncpus < 1:
        raise ValueError("need at least one CPU")
    for name, r in ratios.items():
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0):
            raise ValueError(f"ratio of {name!r} must be a positive number, got {r!r}")
    total = float(sum(ratios.values()))
    return {name: ncpus * float(r) / total for name, r in ratios.items()} if ratios else {}


def weights_for(ratios: Mapping[str, float]) -> dict[str, int]:
    """cpu.weight proportional to the ratios, the largest at 1000 (clamped to 1..10000)."""
    if not ratios:
        return {}
    top = max(ratios.values())
    return {n: max(WEIGHT_MIN, min(WEIGHT_MAX, round(1000 * r / top))) for n, r in ratios.items()}


def quota_for(cpus: float, period_us: int = PERIOD_US) -> int:
    return max(MIN_QUOTA_US, round(cpus * period_us))


def cpu_plan(
    online: Sequence[int],
    ratios: Mapping[str, float],
    strategy: str = "pin-share",
    period_us: int = PERIOD_US,
    proportional_weights: bool = True,
) -> dict[str, CpuAlloc]:
    """Allocation of the ``online`` CPUs to ratio-managed containers.

    Deterministic: the same inputs give the same plan. Dedicated CPUs are taken from the
    highest-numbered online CPUs (containers by decreasing entitlement, then name), the
    shared pool is the lowest-numbered ones (cpu0, which also runs the guest's own
    services, is always in the pool when there is one).

    ``proportional_weights=False`` leaves every ``cpu.weight`` at the kernel's default 100:
    the ratio expressed in absolute terms only (CPUs and pinning), the way a nesting-agnostic
    container manager configures it (``docker --cpus``/``--cpuset-cpus``).
    """
    if strategy not in CPU_STRATEGIES:
        raise ValueError(f"unknown CPU strategy {strategy!r} (known: {', '.join(CPU_STRATEGIES)})")
    cpus = sorted(set(online))
    if not cpus:
        raise ValueError("no CPUs online")
    ent = entitlements(ratios, len(cpus))
    weights = weights_for(ratios) if proportional_weights else dict.fromkeys(ratios, 100)
    if strategy == "quota":
        return {
            n: CpuAlloc(a, tuple(cpus), (), quota_for(a, period_us), period_us, weights[n])
            for n, a in sorted(ent.items())
        }
    whole = {n: int(math.floor(a + EPS)) for n, a in ent.items()}
    pool_size = len(cpus) - sum(whole.values())
    pool = cpus[:pool_size]
    free = list(reversed(cpus[pool_size:]))  # highest first
    plan: dict[str, CpuAlloc] = {}
    for n in sorted(ent, key=lambda k: (-ent[k], k)):
        mine = sorted(free.pop(0) for _ in range(whole[n]))
        frac = ent[n] - whole[n]
        cpuset = sorted(set(mine) | (set(pool) if frac > EPS else set()))
        plan[n] = CpuAlloc(ent[n], tuple(cpuset), tuple(mine), quota_for(ent[n], period_us), period_us, weights[n])
    return dict(sorted(plan.items()))


def ratio_error(usage: Mapping[str, float], ratios: Mapping[str, float]) -> float:
    """How far measured CPU usage is from the configured ratios: max |share_i - r_i/R|.

    0 is perfect; shares are fractions of the containers' total usage.
    """
    names = [n for n in ratios if n in usage]
    total_u = sum(max(0.0, usage[n]) for n in names)
    total_r = sum(ratios[n] for n in names)
    if total_u <= 0 or total_r <= 0:
        return 0.0
    return max(abs(max(0.0, usage[n]) / total_u - ratios[n] / total_r) for n in names)


# -- memory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemView:
    """One container as the reclamation policy sees it."""

    name: str
    usage: int  # memory.current, bytes
    shares: float  # proportional-share weight (> 0)
    no_reclaim: bool = False
    floor: int = 0  # never reclaim below this (memory.low / memory.min)


def reclaim_plan(containers: Iterable[MemView], want: int) -> dict[str, int]:
    """Bytes to reclaim from each container to free ``want`` bytes (or as much as allowed).

    Water-filling on usage per share: after reclamation every reclaimed-from container is at
    ``max(floor_i, lambda * s_i)``, one ``lambda`` for all; no-reclaim containers and those
    already below ``lambda * s_i`` give nothing. The total is ``min(want, reclaimable)``
    exactly (integer bytes).
    """
    views = list(containers)
    for v in views:
        if v.usage < 0 or v.floor < 0:
            raise ValueError(f"{v.name}: usage and floor must be non-negative")
        if not (math.isfinite(v.shares) and v.shares > 0):
            raise ValueError(f"{v.name}: shares must be a positive number")
    out = {v.name: 0 for v in views}
    cands = [v for v in views if not v.no_reclaim and v.usage > v.floor]
    if want <= 0 or not cands:
        return out
    room = sum(v.usage - v.floor for v in cands)
    goal = min(int(want), room)
    if goal == room:
        for v in cands:
            out[v.name] = v.usage - v.floor
        return out

    def target(v: MemView, lam: float) -> float:
        return max(float(v.floor), min(float(v.usage), lam * v.shares))

    def freed(lam: float) -> float:
        return sum(v.usage - target(v, lam) for v in cands)

    lo, hi = 0.0, max(v.usage / v.shares for v in cands)
    for _ in range(200):  # freed() is non-increasing in lambda: bisect for freed == goal
        mid = (lo + hi) / 2
        if freed(mid) > goal:
            lo = mid
        else:
            hi = mid
    lam = hi
    amounts = {v.name: v.usage - target(v, lam) for v in cands}
    ints = {n: int(math.floor(a)) for n, a in amounts.items()}
    short = goal - sum(ints.values())
    # Hand out the rounding remainder to the largest fractional parts that still have room.
    by_frac = sorted(cands, key=lambda v: (-(amounts[v.name] - ints[v.name]), -v.usage / v.shares, v.name))
    while short > 0:
        progressed = False
        for v in by_frac:
            if short <= 0:
                break
            if ints[v.name] < v.usage - v.floor:
                ints[v.name] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    while short < 0:  # bisection overshoot of a byte or so
        for v in sorted(cands, key=lambda v: -ints[v.name]):
            if short >= 0:
                break
            if ints[v.name] > 0:
                ints[v.name] -= 1
                short += 1
    out.update(ints)
    return out


def usage_ratio(usage: Mapping[str, float]) -> dict[str, float]:
    """Each container's fraction of the containers' total memory usage."""
    total = sum(max(0.0, u) for u in usage.values())
    return {n: (max(0.0, u) / total if total > 0 else 0.0) for n, u in usage.items()}
