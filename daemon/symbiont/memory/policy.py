"""ESX-style memory allocation: shares-per-page with an idle-memory tax (pure, no I/O).

Waldspurger (OSDI'02, seeds/002) allocates memory by *shares per page*, taxing idle pages:

    ρ = S / (P · (f + k·(1 − f))),   k = 1 / (1 − τ)

S is the VM's shares, P its allocated pages (here MiB: the unit cancels in comparisons), f the
fraction of its memory that is active, τ ∈ [0, 1) the tax rate. τ = 0 gives k = 1 and pure
proportional share; τ → 1 makes idle pages arbitrarily expensive. When the host must
reclaim, memory is taken from the VM with the *lowest* ρ (it pays least per page); when
memory is free, it goes to the VM with the *highest* ρ that wants more.

Decisions respect each VM's ``[min_mib, max_mib]``, move at most ``max_step_mib`` per VM per
period, never balloon a guest below its floor (:mod:`symbiont.memory.floor`: its kernel's
reserve + what it uses + a margin, and the measured absolute floor: no guest OOM caused by
the host), and aim at a host free-memory target. Reclaim is *sharing-aware*: ballooning a
VM whose pages are KSM-shared frees only its unshared fraction ``u`` of the balloon (seeds/000,
Synergy: 600 MB ballooned reclaimed 216 MB with KSM on), so victims are ranked by shares per
*host* page, ``ρ/u = S / (P·u·(f + k(1 − f)))`` — what ballooning them actually frees — and
the balloon is sized by ``needed / u``. A victim held back by ``max_step_mib`` gives the rest
in later periods; the VMs above it in ρ are not taken from instead (ESX takes only from the
lowest ρ).

Every decision carries its inputs and a reason string, so the daemon can log why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from symbiont.memory.floor import floor_mib as _guest_floor


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
    reserve_mib: float | None = None  # guest kernel's memory below MemTotal (None: the default)
    boot_mib: float | None = None  # the domain's boot memory (caps the guest floor)

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


def guest_floor_mib(vm: VmMemory, host: HostMemory) -> float:
    """The lowest target a guest may ever get: its min, what it uses + the host's safety margin,
    and the guest floor (kernel reserve + used + watermark margin, the absolute floor)."""
    g = _guest_floor(vm.boot_mib, vm.reserve_mib, vm.used_mib, vm.min_mib)
    return float(max(vm.min_mib, vm.used_mib + host.safety_margin_mib, g))


def floor_mib(vm: VmMemory, host: HostMemory) -> float:
    """The lowest target this period: the guest floor, and at most one step down."""
    return max(guest_floor_mib(vm, host), vm.allocated_mib - host.max_step_mib)


def ceiling_mib(vm: VmMemory, host: HostMemory) -> float:
    return min(vm.max_mib, vm.allocated_mib + host.max_step_mib)


def decide(vms: Iterable[VmMemory], host: HostMemory) -> list[Decision]:
    """One control period: new balloon targets for every VM.

    Taking memory "from the VM with the lowest ρ" in ever smaller chunks converges to
    *water-filling*: victims shrink until their ρ rises to a common level L, since shrinking
    a VM to level L means P = S / (L·c) with c = f + k(1 − f). We solve for L by bisection
    over numpy arrays (O(N) per step), which is what makes 1,000 VMs take milliseconds.
    Levels are in shares per *host* MiB, ρ/u (c·u in place of c): a VM whose pages are mostly
    KSM-shared frees little per ballooned MiB and is taken from last.

    1. *Free target*: if the budget's free memory is below ``free_target_mib``, raise the
       water level until the VMs not under pressure give up exactly the shortfall (a VM
       frees ``u`` of each ballooned MiB; KSM-shared pages count once). VMs under pressure
       are victims only when no other VM has anything left to give.
    2. *Demand*: each VM under pressure wants ``pressure_grant_mib`` (or enough to cover what
       it uses + margin), served highest ρ first: from free memory above the target, then
       from VMs not under pressure whose ρ stays below the requester's (its ρ falls as it
       grows, so the largest feasible grant is found by bisection).
    The level is found with each VM's guest floor (:func:`guest_floor_mib`) only; the
    ``max_step_mib`` cap is applied afterwards, so what a capped victim cannot give this
    period is left for the next ones instead of being taken from VMs with a higher ρ (and a
    grant is cut to what was really freed). Uncooperative VMs keep their allocation.
    """
    given = list(vms)
    names = [v.name for v in given]
    if len(set(names)) != len(names):
        raise ValueError("duplicate VM names")
    order = sorted(range(len(given)), key=lambda i: names[i])  # order-independent result
    vl = [given[i] for i in order]
    n = len(vl)
    if n == 0:
        return []
    S = np.array([v.shares for v in vl], dtype=float)
    P = np.array([float(v.allocated_mib) for v in vl])
    f = np.clip(np.array([v.active_fraction for v in vl], dtype=float), 0.0, 1.0)
    k = np.array([idle_tax_k(v.tax_rate) for v in vl])
    C = f + k * (1.0 - f)  # ρ = S / (P·C)
    U = np.clip(np.array([v.unshared_fraction for v in vl], dtype=float), 0.0, 1.0)
    CU = C * U  # ρ/u = S / (P·C·u): shares per host MiB
    used = np.array([v.used_mib for v in vl], dtype=float)
    floor = np.array([guest_floor_mib(v, host) for v in vl])  # never below (the guest's needs)
    step_floor = P - host.max_step_mib  # at most one step down per period
    ceil = np.minimum(np.array([v.max_mib for v in vl], dtype=float), P + host.max_step_mib)  # ceiling_mib
    coop = np.array([v.cooperative for v in vl])
    press = np.array([v.pressure for v in vl])
    T = P.copy()
    reasons: list[list[str]] = [[] for _ in vl]

    def rho_of(i: int) -> float:
        return S[i] / (T[i] * C[i]) if T[i] > 0 else math.inf

    def shrink_at(level: float, mask: np.ndarray) -> np.ndarray:
        """MiB each masked VM would give when its ρ/u is raised to ``level`` (to its guest floor)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            at_level = np.where(level > 0, S / (level * CU), np.inf)
        room = np.clip(T - floor, 0.0, None)
        return np.where(mask & (U > 0), np.clip(T - at_level, 0.0, room), 0.0)

    def stepped(shrink: np.ndarray) -> np.ndarray:
        """What of ``shrink`` this period's ``max_step_mib`` allows."""
        return np.minimum(shrink, np.clip(T - step_floor, 0.0, None))

    def level_for(host_mib: float, mask: np.ndarray, cap: float = math.inf) -> tuple[float, np.ndarray]:
        """Lowest water level (≤ cap) at which the masked VMs free ``host_mib``; and their shrink."""
        full = shrink_at(cap, mask) if math.isfinite(cap) else np.where(mask & (U > 0),
                                                                         np.clip(T - floor, 0, None), 0.0)
        if float((full * U).sum()) <= host_mib:
            return cap, full
        with np.errstate(divide="ignore", invalid="ignore"):
            rhos = np.where(mask & (T > 0) & (U > 0), S / (T * CU), np.inf)
            tops = np.where(mask & (floor > 0) & (U > 0), S / (np.maximum(floor, 1e-9) * CU), 0.0)
        lo = float(rhos.min())
        hi = cap if math.isfinite(cap) else max(lo * 2.0, float(np.max(tops))) + 1e-12
        for _ in range(64):  # to 0.001 MiB: targets are whole MiB
            mid = 0.5 * (lo + hi)
            got = float((shrink_at(mid, mask) * U).sum())
            if got < host_mib:
                lo = mid
            else:
                hi = mid
                if got - host_mib < 1e-3:
                    break
        return hi, shrink_at(hi, mask)

    def free() -> float:
        return host.budget_mib - float((T * U).sum())

    def note_cap(i: int, ideal: float, got: float) -> str:
        return f"; {ideal - got:.0f} MiB more in later periods (max_step_mib)" if ideal - got > 0.5 else ""

    # 1. keep the free target
    need = host.free_target_mib - free()
    if need > 1e-9:
        mask = coop & (T - floor > 1e-9) & (U > 0)
        calm = mask & ~press
        mask = calm if calm.any() else mask
        if mask.any():
            level, ideal = level_for(need, mask)
            shrink = stepped(ideal)
            T -= shrink
            for i in np.nonzero(shrink > 1e-9)[0]:
                reasons[i].append(f"reclaim {shrink[i]:.0f} MiB (host below its free target; lowest ρ/u first, "
                                  f"level ρ/u={level:.4g}, u={U[i]:.2f}{note_cap(i, ideal[i], shrink[i])})")
    # 2. serve VMs under pressure: requesters grow (their ρ falls) and victims shrink (their ρ
    # rises) until both meet at one level L*; free memory above the target is used first.
    req = coop & press
    if req.any():
        want = np.where(req, np.clip(np.maximum(host.pressure_grant_mib, used + host.safety_margin_mib - T),
                                     0.0, np.clip(ceil - T, 0.0, None)), 0.0)
        req &= want > 1e-9
    if req.any():
        victims = coop & ~press & (T - floor > 1e-9) & (U > 0)
        room = max(0.0, free() - host.free_target_mib)
        CUr = np.where(U > 0, CU, np.nan)  # a requester whose pages are all shared costs nothing

        def grants(level: float) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                at_level = np.where(np.isnan(CUr), np.inf, S / (level * CUr))
            return np.where(req, np.clip(at_level - T, 0.0, want), 0.0)

        def balance(level: float) -> float:  # > 0: requesters want more than can be given at this level
            return float((grants(level) * U).sum()) - room - float((shrink_at(level, victims) * U).sum())

        with np.errstate(divide="ignore", invalid="ignore"):
            lo = float(np.min(np.where(req & (U > 0), S / ((T + want) * CU), np.inf)))  # every request in full
            hi = float(np.max(np.where(req & (U > 0), S / (T * CU), 0.0)))  # nothing granted
        if not math.isfinite(lo) or balance(lo) <= 0:
            level = lo if math.isfinite(lo) else hi
        else:
            for _ in range(64):  # to 0.001 MiB
                mid = 0.5 * (lo + hi)
                bal = balance(mid)
                if bal > 0:
                    lo = mid
                else:
                    hi = mid
                    if bal > -1e-3:
                        break
            level = hi
        g = grants(level)
        asked = float((g * U).sum())
        shrink = ideal = np.zeros(n)
        if asked > room + 1e-9 and victims.any():
            _, ideal = level_for(asked - room, victims, cap=level)
            shrink = stepped(ideal)
        supply = room + float((shrink * U).sum())
        if asked > supply + 1e-9:  # capped victims: grant only what was really freed this period
            g *= supply / asked
        T -= shrink
        T += g
        names_req = ", ".join(vl[i].name for i in np.nonzero(g > 1e-9)[0])
        for i in np.nonzero(shrink > 1e-9)[0]:
            reasons[i].append(f"reclaim {shrink[i]:.0f} MiB (VMs under pressure with higher ρ: {names_req}; "
                              f"level ρ/u={level:.4g}{note_cap(i, ideal[i], shrink[i])})")
        for i in np.nonzero(g > 1e-9)[0]:
            reasons[i].append(f"grant {g[i]:.0f} MiB (under pressure; ρ={rho_of(i):.4g})")
    out: dict[str, Decision] = {}
    for i, v in enumerate(vl):
        t = float(T[i])
        if v.cooperative:
            t = min(max(t, v.min_mib, min(floor[i], v.allocated_mib)), v.max_mib)
            why = "; ".join(reasons[i]) or "unchanged"
        else:
            t = float(v.allocated_mib)
            why = "uncooperative agent: left as is"
        t = float(math.ceil(t - 1e-6)) if t < v.allocated_mib else float(round(t))
        final_rho = shares_per_page(v.shares, t, v.active_fraction, v.tax_rate)
        out[v.name] = Decision(v.name, v.allocated_mib, t, final_rho, why, _inputs(v, host, float(floor[i])))
    return [out[name] for name in names]


def reclaimable_mib(vm: VmMemory, host: HostMemory) -> float:
    """Host memory the balloon could free from this VM this period (its unshared part)."""
    return max(0.0, vm.allocated_mib - floor_mib(vm, host)) * vm.unshared_fraction


def _inputs(v: VmMemory, host: HostMemory, floor: float | None = None) -> dict:
    return {
        "shares": v.shares, "allocated_mib": v.allocated_mib, "f": round(v.active_fraction, 4),
        "tau": v.tax_rate, "used_mib": v.used_mib, "pressure": v.pressure, "u": round(v.unshared_fraction, 4),
        "min_mib": v.min_mib, "max_mib": v.max_mib, "budget_mib": host.budget_mib,
        "free_target_mib": host.free_target_mib, "reserve_mib": v.reserve_mib, "floor_mib": floor,
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
    upper: float = 1.0  # samples are clamped to [0, upper]: 1 for fractions, inf for MiB

    def update(self, sample: float) -> float:
        s = min(self.upper, max(0.0, sample))
        self.fast = s if self.fast is None else self.fast + self.fast_alpha * (s - self.fast)
        self.slow = s if self.slow is None else self.slow + self.slow_alpha * (s - self.slow)
        self.last = s
        return self.value

    @property
    def value(self) -> float:
        if self.fast is None or self.slow is None:
            return 1.0  # unknown: assume active (no tax until measured)
        return max(self.fast, self.slow, self.last)

    @property
    def known(self) -> float | None:
        """The estimate, or None before the first sample."""
        return None if self.fast is None or self.slow is None else max(self.fast, self.slow, self.last)


def active_fraction(active_mib: float | None, allocated_mib: float) -> float:
    """f for ρ: the active MiB as a fraction of the allocation P that ρ divides by. Not
    referenced / MemTotal: MemTotal shrinks with the balloon and excludes the kernel's reserve,
    so the same working set would read as more active MiB (P·f) the more the VM is ballooned
    (P/MemTotal: 1.09 at 512 MiB, 1.5 at 128 MiB on the lab guest). Unknown: 1 (no tax)."""
    if active_mib is None or not math.isfinite(active_mib):
        return 1.0
    if allocated_mib <= 0:
        return 1.0
    return min(1.0, max(0.0, active_mib / allocated_mib))


def under_pressure(meminfo: Mapping[str, float], psi_some_avg10: float | None,
                   psi_threshold: float = 10.0, min_available_fraction: float = 0.10) -> bool:
    """Guest memory pressure: PSI memory 'some' avg10 above a threshold, or MemAvailable
    below a fraction of MemTotal."""
    total = meminfo.get("MemTotal", 0)
    avail = meminfo.get("MemAvailable", total)
    if total and avail / total < min_available_fraction:
        return True
    return psi_some_avg10 is not None and psi_some_avg10 > psi_threshold
