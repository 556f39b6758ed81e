"""Hotspot detection and migration planning after Sandpiper (Wood et al., "Black-box and Gray-box
Strategies for Virtual Machine Migration", NSDI 2007; seeds/003 "Cluster load-balancing").

Why: overcommitment (seeds/003) packs VMs by their allocations, but contention comes from their
*usage*; when usage on a host stays high, the remedy is to live-migrate a VM to a less loaded
host. This module decides *when* (detection) and *what goes where* (the plan); moving the VMs is
the controller's job.

Detection. A host is a hotspot when, for some resource, its utilisation (sum of its VMs' usage /
physical capacity) exceeds the threshold in at least ``k`` of the last ``n`` samples — a
sustained overload, not a blip.

* black-box: only what the hypervisor sees per VM (CPU time, network bytes, memory it has
  handed to the guest). Memory is the weak signal: the hypervisor cannot see what the guest has
  freed, so the simulator models it as the high-water mark of guest usage.
* gray-box: the guest agent also reports its own memory usage (replacing the hypervisor's
  estimate) and, optionally, application response times: a VM whose response time exceeds
  ``sla_ms`` in ``k`` of ``n`` samples makes its host a hotspot even if no resource looks full.

Choosing VMs. Sandpiper's *volume* of a host or VM, with utilisations as fractions of the host's
physical capacity (capped at 0.99 to stay finite)::

    volume = 1 / ((1 - cpu) * (1 - mem) * (1 - net))

grows sharply as any resource nears saturation. The *volume-to-size ratio* ``VSR = volume / size``
(size = memory footprint, which is what a live migration must copy) ranks the VMs of a hotspot:
highest VSR first moves the most load per byte copied. VMs are moved off a hotspot, most VSR
first, until its projected utilisation is below every threshold.

Choosing destinations is delegated to the placement heuristics: the "available" vector of a
candidate host is its headroom below the thresholds (``threshold * capacity - load``), the request
is the VM's usage estimate, and the host must also have room for the VM's *allocation* after
overcommit and satisfy its placement constraints. The default, worst fit, takes the least-loaded
host, as Sandpiper does. Not implemented from Sandpiper: swaps (exchanging two VMs when no host
has room for either), the usage prediction that Sandpiper adds to the k-of-n test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from symbiont.placement import heuristics
from symbiont.placement.heuristics import HostView
from symbiont.placement.model import TOL, fmt
from symbiont.placement.state import ClusterState

VOLUME_DIMS = ("cpu", "mem", "net")
MODES = ("black-box", "gray-box")
_CAP = 0.99


@dataclass(frozen=True)
class HotspotConfig:
    """Thresholds (fraction of physical capacity per resource) and the k-of-n persistence rule."""

    thresholds: Mapping[str, float] = field(default_factory=lambda: {"cpu": 0.75, "mem": 0.75, "net": 0.75})
    k: int = 3
    n: int = 5
    sla_ms: float | None = None
    percentile: float = 95.0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError(f"hotspot rule needs 1 <= k <= n, got k={self.k}, n={self.n}")
        for d, t in self.thresholds.items():
            if not 0 < t <= 10:
                raise ValueError(f"threshold for {d}: {t} is not in (0, 10]")
        if self.sla_ms is not None and self.sla_ms <= 0:
            raise ValueError(f"sla_ms must be positive, got {self.sla_ms}")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")


@dataclass(frozen=True)
class GuestStats:
    """Gray-box samples from the guest agent, oldest first: used memory (host units) and response times."""

    mem: Sequence[float] | None = None
    response_ms: Sequence[float] | None = None


@dataclass(frozen=True)
class Hotspot:
    host: str
    reasons: tuple[str, ...]
    volume: float

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "reasons": list(self.reasons), "volume": self.volume}


@dataclass(frozen=True)
class Move:
    vm: str
    src: str
    dst: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "from": self.src, "to": self.dst, "reason": self.reason}


@dataclass
class MigrationPlan:
    hotspots: list[Hotspot]
    moves: list[Move]
    unresolved: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "hotspots": [h.to_dict() for h in self.hotspots],
            "moves": [m.to_dict() for m in self.moves],
            "unresolved": list(self.unresolved),
        }


def volume(util: Mapping[str, float] | np.ndarray, dims: Sequence[str] | None = None) -> float | np.ndarray:
    """Sandpiper volume 1/prod(1 - u) over cpu, mem, net (those present), u capped at 0.99.

    ``util`` is a mapping by resource name, or an array whose last axis follows ``dims``.
    """
    if isinstance(util, Mapping):
        u = np.array([min(max(float(util[d]), 0.0), _CAP) for d in VOLUME_DIMS if d in util])
        return float(1.0 / np.prod(1.0 - u)) if u.size else 1.0
    arr = np.asarray(util, dtype=float)
    if dims is None:
        raise ValueError("volume of an array needs dims")
    cols = [i for i, d in enumerate(dims) if d in VOLUME_DIMS]
    if not cols:
        return np.ones(arr.shape[:-1]) if arr.ndim > 1 else 1.0
    u = np.clip(arr[..., cols], 0.0, _CAP)
    return 1.0 / np.prod(1.0 - u, axis=-1)


def k_of_n(series: Sequence[float] | np.ndarray, threshold: float, k: int, n: int) -> int:
    """How many of the last ``n`` samples exceed ``threshold`` (the caller compares with ``k``)."""
    last = np.asarray(series, dtype=float)[-n:]
    return int(np.count_nonzero(last > threshold))


def observed(
    usage: Mapping[str, np.ndarray],
    dims: Sequence[str],
    mode: str = "black-box",
    guest: Mapping[str, GuestStats] | None = None,
) -> dict[str, np.ndarray]:
    """Per-VM usage series (samples, dims) as the detector sees them in ``mode``.

    Black-box takes the hypervisor's series as is; gray-box replaces the ``mem`` column by the
    guest-reported memory where the guest reported it (aligned on the newest sample).
    """
    if mode not in MODES:
        raise ValueError(f"unknown detection mode {mode!r}; known: {', '.join(MODES)}")
    out: dict[str, np.ndarray] = {}
    for vm, series in usage.items():
        arr = np.array(series, dtype=float, ndmin=2)
        if arr.shape[-1] != len(dims):
            raise ValueError(
                f"usage of {vm}: {arr.shape[-1]} columns but {len(dims)} resources ({', '.join(dims)})"
            )
        if (arr < 0).any() or not np.isfinite(arr).all():
            raise ValueError(f"usage of {vm}: values must be finite and non-negative")
        out[vm] = arr
    if mode == "gray-box" and guest and "mem" in dims:
        j = dims.index("mem")
        for vm, gs in guest.items():
            if vm in out and gs.mem is not None and len(gs.mem):
                g = np.asarray(gs.mem, dtype=float)[-out[vm].shape[0] :]
                out[vm][-g.size :, j] = g
    return out


def host_series(state: ClusterState, usage: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Utilisation series (samples, dims) per host that has VMs: sum of VM usage / physical capacity.

    Series of different lengths are aligned on the newest sample (a VM that arrived recently
    contributes nothing to older samples).
    """
    n = max((a.shape[0] for a in usage.values()), default=0)
    load: dict[int, np.ndarray] = {}
    for vm, arr in usage.items():
        if vm not in state.vms:
            raise ValueError(f"usage given for {vm!r}, which is not placed on any host")
        h = state.vms[vm].host
        acc = load.setdefault(h, np.zeros((n, len(state.dims))))
        acc[n - arr.shape[0] :] += arr
    cap = state.capacity
    return {
        h: np.divide(a, cap[h], out=np.where(a > 0, np.inf, 0.0), where=cap[h] > 0) for h, a in load.items()
    }


def _threshold_vector(state: ClusterState, config: HotspotConfig) -> np.ndarray:
    thr = np.ones(len(state.dims))
    for d, t in config.thresholds.items():
        if d not in state.dims:
            raise ValueError(
                f"threshold for unknown resource {d!r}; the cluster's resources are {', '.join(state.dims)}"
            )
        thr[state.dims.index(d)] = t
    return thr


def detect_hotspots(
    state: ClusterState,
    usage: Mapping[str, np.ndarray],
    config: HotspotConfig | None = None,
    mode: str = "black-box",
    guest: Mapping[str, GuestStats] | None = None,
) -> list[Hotspot]:
    """Hosts whose utilisation exceeds a threshold in >= k of the last n samples (and, gray-box,
    hosts with a VM over its response-time SLA in >= k of n), most voluminous first."""
    config = config or HotspotConfig()
    obs = observed(usage, state.dims, mode, guest)
    series = host_series(state, obs)
    thr = _threshold_vector(state, config)
    watched = [state.dims.index(d) for d in config.thresholds]
    found: list[Hotspot] = []
    sla_hosts: dict[int, list[str]] = {}
    if mode == "gray-box" and guest and config.sla_ms is not None:
        for vm, gs in guest.items():
            if gs.response_ms is None or vm not in state.vms:
                continue
            c = k_of_n(gs.response_ms, config.sla_ms, config.k, config.n)
            if c >= config.k:
                sla_hosts.setdefault(state.vms[vm].host, []).append(
                    f"{vm} response time above {fmt(config.sla_ms)} ms in {c} of last {config.n} samples"
                )
    for h in sorted(set(series) | set(sla_hosts)):
        reasons: list[str] = []
        s = series.get(h)
        if s is not None:
            for j in watched:
                c = k_of_n(s[:, j], thr[j], config.k, config.n)
                if c >= config.k:
                    reasons.append(
                        f"{state.dims[j]} above {fmt(thr[j])} in {c} of last {config.n} samples "
                        f"(latest {fmt(s[-1, j])})"
                    )
        reasons.extend(sla_hosts.get(h, []))
        if reasons:
            vol = float(volume(s[-1], state.dims)) if s is not None else 1.0
            found.append(Hotspot(state.host_ids[h], tuple(reasons), vol))
    found.sort(key=lambda x: -x.volume)
    return found


def estimate(series: np.ndarray, config: HotspotConfig) -> np.ndarray:
    """A VM's usage estimate for planning: the ``percentile`` of its last ``n`` samples, per resource."""
    return np.percentile(series[-config.n :], config.percentile, axis=0)


def plan_migrations(
    state: ClusterState,
    usage: Mapping[str, np.ndarray],
    hotspots: Sequence[Hotspot],
    config: HotspotConfig | None = None,
    heuristic: str = "worst-fit",
    mode: str = "black-box",
    guest: Mapping[str, GuestStats] | None = None,
    prefer_open: bool = True,
) -> MigrationPlan:
    """Moves that bring each hotspot below its thresholds: most voluminous hotspot first, its VMs by
    decreasing VSR, each to the host the placement ``heuristic`` picks among hosts with headroom.

    Pure: ``state`` is not modified. VMs in an affinity group with other members are never moved
    alone (that would break the group); such cases end up in ``unresolved`` if nothing else helps.
    """
    config = config or HotspotConfig()
    heur = heuristics.get(heuristic)
    obs = observed(usage, state.dims, mode, guest)
    work = state.copy()
    thr = _threshold_vector(state, config)
    limit = state.capacity * thr
    est = {vm: estimate(a, config) for vm, a in obs.items()}
    load = np.zeros_like(state.capacity)
    for vm, u in est.items():
        if vm not in work.vms:
            raise ValueError(f"usage given for {vm!r}, which is not placed on any host")
        load[work.vms[vm].host] += u
    hot = np.zeros(len(state.host_ids), dtype=bool)
    for hs in hotspots:
        hot[state.host_index(hs.host)] = True
    size_j = state.dims.index("mem") if "mem" in state.dims else None
    moves: list[Move] = []
    unresolved: list[str] = []
    for hs in sorted(hotspots, key=lambda x: -x.volume):
        h = state.host_index(hs.host)
        over = _over(load[h], limit[h], state.dims)
        if not over:
            continue
        vms = [vm for vm, p in work.vms.items() if p.host == h and vm in est]
        ranked = sorted(vms, key=lambda vm: (-_vsr(est[vm], work, h, size_j), vm))
        skipped: list[str] = []
        for vm in ranked:
            if not _over(load[h], limit[h], state.dims):
                break
            req = work.vms[vm].request
            if req.affinity is not None and work.affinity_count.get(req.affinity, 0) > 1:
                skipped.append(f"{vm} (affinity group {req.affinity!r})")
                continue
            u = est[vm]
            placed = work.remove(vm)
            feasible = work.fits(placed.demand)
            for _, m in work.constraints([req]):
                feasible &= m
            headroom = limit - load
            feasible &= np.all(headroom >= u - TOL, axis=1)
            feasible &= ~hot
            feasible[h] = False
            view = HostView(headroom, limit)
            dst, score = heuristics.choose(heur, u, view, feasible, work.count > 0, prefer_open)
            if dst < 0:
                work.add(req, h, placed.demand)
                skipped.append(f"{vm} (no host has headroom for it)")
                continue
            work.add(req, dst, placed.demand)
            load[h] -= u
            load[dst] += u
            v = _vsr(u, work, h, size_j)  # the ranking value, on the source host
            moves.append(
                Move(
                    vm,
                    hs.host,
                    state.host_ids[dst],
                    f"{hs.host} hot ({'; '.join(hs.reasons)}); {vm} has the highest VSR left ({v:.3g}); "
                    f"{heur.name} chose {state.host_ids[dst]}"
                    + ("" if score is None else f" (score {score:.3g})"),
                )
            )
        still = _over(load[h], limit[h], state.dims)
        if still:
            unresolved.append(
                f"{hs.host}: still above threshold ({', '.join(still)})"
                + (f"; could not move {', '.join(skipped)}" if skipped else "")
            )
    return MigrationPlan(list(hotspots), moves, unresolved)


def _over(load: np.ndarray, limit: np.ndarray, dims: Sequence[str]) -> list[str]:
    return [f"{dims[j]} {fmt(load[j])} > {fmt(limit[j])}" for j in np.flatnonzero(load > limit + TOL)]


def _vsr(u: np.ndarray, state: ClusterState, h: int, size_j: int | None) -> float:
    """Volume of the VM's usage on host ``h`` divided by its size (memory, at least 1e-3)."""
    cap = state.capacity[h]
    frac = np.divide(u, cap, out=np.zeros_like(u), where=cap > 0)
    vol = float(volume(frac, state.dims))
    size = float(u[size_j]) if size_j is not None else 1.0
    return vol / max(size, 1e-3)
