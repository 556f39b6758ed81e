"""ESX-style memory allocation: shares-per-page with an idle-memory tax (pure, no I/O).

Waldspurger (OSDI'02, seeds/002) allocates memory by *shares per page*, taxing idle pages:

    ρ = S / (P · (f + k·(1 − f))),   k = 1 / (1 − τ)

S is the VM's shares, P its allocated pages (here MiB: the unit cancels in comparisons), f the
fraction of its memory that is active, τ ∈ [0, 1) the tax rate. τ = 0 gives k = 1 and pure
proportional share; τ → 1 makes idle pages arbitrarily expensive. When the host must
reclaim, memory is taken from the VM with the *lowest* ρ (it pays least per page); when
memory is free, it goes to the VM with the *highest* ρ that wants more.

Decisions respect each VM's ``[min_mib, max_mib]``, move at most ``max_step_mib`` per VM per
period, never balloon a guest below what it is using plus a margin (no guest OOM caused by
the host), and aim at a host free-memory target. Reclaim is *sharing-aware*: ballooning a
VM whose pages are KSM-shared frees only its unshared fraction ``u`` of the balloon (seeds/000,
Synergy: 600 MB ballooned reclaimed 216 MB with KSM on), so victims are ranked by memory
actually reclaimable and the balloon is sized by ``needed / u``.

Every decision carries its inputs and a reason string, so the daemon can log why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class VmMemory:
    """What the policy knows about one VM (all sizes in MiB)."""

    name: str
    shares: float
    allocated_mib: float  # current balloon target: memory the guest may use
    active_fraction: float  # f, from the working-set estimator (0..1)
    min_mib: float
    max_mib: float
    tax_rate: float = 0.75  # τ for this VM
    used_mib: float = 0.0  # guest MemTotal - MemAvailable: what the guest really needs now
    pressure: bool = False  # guest under memory pressure (PSI / MemAvailable)
    unshared_fraction: float = 1.0  # u: share of the VM's memory not merged by KSM
    cooperative: bool = True  # an uncooperative VM is neither grown nor shrunk by the policy

    def __post_init__(self) -> None:
        if self.shares <= 0:
            raise ValueError(f"{self.name}: shares must be positive")
        if not 0.0 <= self.tax_rate < 1.0:
            raise ValueError(f"{self.name}: tax rate τ must be in [0, 1)")
        if not self.min_mib <= self.max_mib:
            raise ValueError(f"{self.name}: min_mib must not exceed max_mib")


@dataclass(frozen=True)
class HostMemory:
    """The host side: how much memory the VMs may use in all, and the free target."""

    budget_mib: float  # memory available to VMs (an overcommitted host has less than Σ max)
    free_target_mib: float  # keep this much of the budget free
    max_step_mib: float = 256.0  # largest change to one VM in one period
    safety_margin_mib: float = 64.0  # never balloon below used + margin
    pressure_grant_mib: float = 64.0  # at least this much to a VM under pressure


@dataclass(frozen=True)
class Decision:
    name: str
    before_mib: float
    target_mib: float
    rho: float
    reason: str
    inputs: dict = field(default_factory=dict)

    @property
    def delta_mib(self) -> float:
        return self.target_mib - self.before_mib


def idle_tax_k(tax_rate: float) -> float:
    """k = 1/(1 − τ): the cost of an idle page relative to an active one."""
    if not 0.0 <= tax_rate < 1.0:
        raise ValueError("tax rate τ must be in [0, 1)")
    return 1.0 / (1.0 - tax_rate)


def shares_per_page(shares: float, pages: float, active_fraction: float, tax_rate: float) -> float:
    """ρ = S / (P · (f + k(1 − f))). Infinite for a VM with no pages (it pays nothing)."""
    f = min(1.0, max(0.0, active_fraction))
    if pages <= 0:
        return math.inf
    return shares / (pages * (f + idle_tax_k(tax_rate) * (1.0 - f)))


def rho(vm: VmMemory, allocated: float | None = None) -> float:
    return shares_per_page(vm.shares, vm.allocated_mib if allocated is None else allocated,
                           vm.active_fraction, vm.tax_rate)


def floor_mib(vm: VmMemory, host: HostMemory) -> float:
    """The lowest target this period: min, what the guest uses + margin, one step down."""
    return max(vm.min_mib, vm.used_mib + host.safety_margin_mib, vm.allocated_mib - host.max_step_mib)


def ceiling_mib(vm: VmMemory, host: HostMemory) -> float:
    return min(vm.max_mib, vm.allocated_mib + host.max_step_mib)


def decide(vms: Iterable[VmMemory], host: HostMemory, chunk_mib: float = 16.0) -> list[Decision]:
    """One control period: new balloon targets for every VM.

    1. *Free target*: while the budget's free memory is below ``free_target_mib``, take
       ``chunk_mib`` of host memory at a time from the reclaimable VM with the lowest ρ (its
       balloon grows by chunk/u, so a VM whose pages are KSM-shared is charged what it
       really frees).
    2. *Demand*: each VM under pressure wants ``pressure_grant_mib`` (or enough to cover what
       it uses + margin). Requests are served highest ρ first, from free memory above the
       target, then from VMs not under pressure whose ρ is lower than the requester's
       (lowest ρ first) — so an idle VM pays the idle tax to an active one.
    Targets stay within [floor, ceiling] of :func:`floor_mib`/:func:`ceiling_mib`;
    uncooperative VMs keep their allocation.
    """
    vms = list(vms)
    names = [v.name for v in vms]
    if len(set(names)) != len(names):
        raise ValueError("duplicate VM names")
    by_name = {v.name: v for v in vms}
    target = {v.name: float(v.allocated_mib) for v in vms}
    reasons: dict[str, list[str]] = {v.name: [] for v in vms}

    def now(v: VmMemory) -> VmMemory:
        return replace(v, allocated_mib=target[v.name])

    def free() -> float:  # host memory left in the budget (KSM-shared pages count once)
        return host.budget_mib - sum(target[n] * by_name[n].unshared_fraction for n in target)

    def shrinkable(v: VmMemory) -> float:
        return max(0.0, target[v.name] - floor_mib(v, host))

    def take(victim: VmMemory, host_mib: float, why: str) -> float:
        """Balloon ``victim`` to free up to ``host_mib`` of host memory; return what it freed."""
        balloon = min(host_mib / victim.unshared_fraction, shrinkable(victim))
        if balloon <= 0:
            return 0.0
        r = rho(now(victim))
        target[victim.name] -= balloon
        reasons[victim.name].append(f"reclaim {balloon:.0f} MiB ({why}; ρ={r:.4g}, u={victim.unshared_fraction:.2f})")
        return balloon * victim.unshared_fraction

    movable = [v for v in vms if v.cooperative]
    # 1. keep the free target
    while (need := host.free_target_mib - free()) > 1e-6:
        cands = [v for v in movable if shrinkable(v) > 1e-6 and v.unshared_fraction > 0]
        # A VM under pressure is a victim only when no other VM has anything left to give.
        cands = [v for v in cands if not v.pressure] or cands
        if not cands:
            break
        victim = min(cands, key=lambda v: (rho(now(v)), -reclaimable_mib(now(v), host), v.name))
        if take(victim, min(chunk_mib, need), "below the host free target, lowest ρ") <= 0:
            break
    # 2. serve VMs under pressure, highest ρ first
    for req in sorted((v for v in movable if v.pressure), key=lambda v: (-rho(v), v.name)):
        want = min(max(host.pressure_grant_mib, req.used_mib + host.safety_margin_mib - target[req.name]),
                   ceiling_mib(req, host) - target[req.name])
        got = 0.0
        while want - got > 1e-6:
            step = min(chunk_mib, want - got)
            room = free() - host.free_target_mib
            if room < step * req.unshared_fraction - 1e-9:
                victims = [v for v in movable if not v.pressure and v.name != req.name
                           and shrinkable(v) > 1e-6 and v.unshared_fraction > 0
                           and rho(now(v)) < rho(now(req))]
                if not victims:
                    break
                victim = min(victims, key=lambda v: (rho(now(v)), -reclaimable_mib(now(v), host), v.name))
                take(victim, step * req.unshared_fraction - max(0.0, room),
                     f"{req.name} is under pressure with higher ρ")
                continue
            target[req.name] += step
            got += step
        if got > 0:
            reasons[req.name].append(f"grant {got:.0f} MiB (under pressure; ρ={rho(now(req)):.4g})")
    out = []
    for v in vms:
        t = target[v.name]
        if v.cooperative:
            t = min(max(t, v.min_mib), v.max_mib)
        t = float(round(t))
        why = "; ".join(reasons[v.name]) or "unchanged"
        if not v.cooperative:
            why = "uncooperative agent: left as is"
        out.append(Decision(v.name, v.allocated_mib, t, rho(replace(v, allocated_mib=t)), why, _inputs(v, host)))
    return out


def reclaimable_mib(vm: VmMemory, host: HostMemory) -> float:
    """Host memory the balloon could free from this VM this period (its unshared part)."""
    return max(0.0, vm.allocated_mib - floor_mib(vm, host)) * vm.unshared_fraction


def _inputs(v: VmMemory, host: HostMemory) -> dict:
    return {
        "shares": v.shares, "allocated_mib": v.allocated_mib, "f": round(v.active_fraction, 4),
        "tau": v.tax_rate, "used_mib": v.used_mib, "pressure": v.pressure, "u": round(v.unshared_fraction, 4),
        "min_mib": v.min_mib, "max_mib": v.max_mib, "budget_mib": host.budget_mib,
        "free_target_mib": host.free_target_mib,
    }


# -- working-set estimate: ESX's fast and slow moving averages -------------------------------


@dataclass
class ActiveEstimate:
    """f from periodic samples, as ESX does: a fast and a slow EWMA plus the latest sample;
    the estimate is their maximum, so a VM that becomes active is seen at once and one that
    becomes idle is taxed only gradually."""

    fast_alpha: float = 0.5
    slow_alpha: float = 0.1
    fast: float | None = None
    slow: float | None = None
    last: float = 0.0

    def update(self, sample: float) -> float:
        s = min(1.0, max(0.0, sample))
        self.fast = s if self.fast is None else self.fast + self.fast_alpha * (s - self.fast)
        self.slow = s if self.slow is None else self.slow + self.slow_alpha * (s - self.slow)
        self.last = s
        return self.value

    @property
    def value(self) -> float:
        if self.fast is None or self.slow is None:
            return 1.0  # unknown: assume active (no tax until measured)
        return max(self.fast, self.slow, self.last)


def under_pressure(meminfo: Mapping[str, float], psi_some_avg10: float | None,
                   psi_threshold: float = 10.0, min_available_fraction: float = 0.10) -> bool:
    """Guest memory pressure: PSI memory 'some' avg10 above a threshold, or MemAvailable
    below a fraction of MemTotal."""
    total = meminfo.get("MemTotal", 0)
    avail = meminfo.get("MemAvailable", total)
    if total and avail / total < min_available_fraction:
        return True
    return psi_some_avg10 is not None and psi_some_avg10 > psi_threshold
