"""Lower bounds on the number of hosts a set of VMs needs, to judge heuristics against.

Why: "best fit used 42 hosts" means nothing on its own; "42 hosts, at least 40 are needed" does.
Every heuristic is therefore reported as ``hosts used / lower bound`` (>= 1; 1 is optimal).

Three bounds, each valid for the multi-dimensional problem with heterogeneous hosts (constraints
such as anti-affinity are ignored, which can only lower the bound, so it stays valid):

* ``volume``: for each dimension d, the fewest hosts whose largest effective capacities add up to
  the total demand in d; the maximum over d. Also, VMs that need more than half of the largest
  host in some dimension pairwise cannot share a host, so their count per dimension is a bound.
  Cheap at any size.
* ``lp``: the LP relaxation of the MILP below, rounded up. Medium instances.
* ``milp``: the exact assignment MILP, solved by HiGHS through ``scipy.optimize.milp`` under a
  time limit; if the limit stops it, the solver's proven dual bound is used (still valid).

MILP, with x_vh = 1 when VM v is on host h and y_h = 1 when host h is used::

    minimise   sum_h y_h
    subject to sum_h x_vh = 1                          for every VM v
               sum_v r_vd x_vh <= E_hd y_h             for every host h and dimension d
               x_vh <= y_h                             (strengthens the LP relaxation)
               y_h >= y_h'  for consecutive identical hosts h, h'   (symmetry breaking)
               sum_h y_h >= volume bound                (a valid cut)
               x_vh = 0 where VM v does not fit host h alone
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from symbiont.placement.model import TOL


@dataclass(frozen=True)
class LowerBound:
    """A lower bound ``value`` on hosts needed, how it was obtained, and whether it is the optimum."""

    value: int
    method: str
    optimal: bool = False
    detail: str = ""


def _check(demands: np.ndarray, effective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(demands, dtype=float).reshape(-1, np.asarray(effective).shape[-1])
    e = np.asarray(effective, dtype=float)
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError("effective capacities must be a non-empty (hosts, dims) matrix")
    if (d < 0).any() or (e < 0).any() or not (np.isfinite(d).all() and np.isfinite(e).all()):
        raise ValueError("demands and capacities must be finite and non-negative")
    fits_somewhere = _fit_matrix(d, np.unique(e, axis=0)).any(axis=1)
    if not fits_somewhere.all():
        v = int(np.flatnonzero(~fits_somewhere)[0])
        raise ValueError(f"VM #{v} (demand {d[v].tolist()}) fits no host even when alone: no bound exists")
    return d, e


def _fit_matrix(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """(VMs, hosts): whether VM v fits on an otherwise empty host h."""
    return np.all(d[:, None, :] <= e[None, :, :] + TOL, axis=2)


def volume_bound(demands: np.ndarray, effective: np.ndarray) -> int:
    """max over dims of the fewest largest hosts covering the total demand; and the big-VM count."""
    d, e = _check(demands, effective)
    if d.shape[0] == 0:
        return 0
    best = 1
    for j in range(e.shape[1]):
        total = d[:, j].sum()
        if total <= TOL:
            continue
        caps = np.sort(e[:, j])[::-1]
        k = int(np.searchsorted(np.cumsum(caps), total - TOL * max(1.0, total)) + 1)
        best = max(best, min(k, e.shape[0]))
        big = int(np.count_nonzero(d[:, j] > caps[0] / 2 + TOL))
        best = max(best, big)
    return best


def _model(
    d: np.ndarray, e: np.ndarray, vol: int
) -> tuple[np.ndarray, list[LinearConstraint], Bounds, int, int]:
    """Objective, constraints and bounds of the MILP above (x first, VM-major; then y)."""
    nv, nh = d.shape[0], e.shape[0]
    nx = nv * nh
    c = np.concatenate([np.zeros(nx), np.ones(nh)])
    rows = np.arange(nv).repeat(nh)
    assign = sparse.csr_matrix((np.ones(nx), (rows, np.arange(nx))), shape=(nv, nx + nh))
    cons = [LinearConstraint(assign, 1.0, 1.0)]
    # capacity rows: (h, dim) -> sum_v r_vd x_vh - E_hd y_h <= 0
    nd = d.shape[1]
    r_idx, c_idx, vals = [], [], []
    for h in range(nh):
        for j in range(nd):
            row = h * nd + j
            nz = np.flatnonzero(d[:, j] > 0)
            r_idx.append(np.full(nz.size + 1, row))
            c_idx.append(np.concatenate([nz * nh + h, [nx + h]]))
            vals.append(np.concatenate([d[nz, j], [-e[h, j]]]))
    cap = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))), shape=(nh * nd, nx + nh)
    )
    cons.append(LinearConstraint(cap, -np.inf, 0.0))
    # linking x_vh - y_h <= 0
    link = sparse.hstack(
        [
            sparse.identity(nx, format="csr"),
            -sparse.csr_matrix((np.ones(nx), (np.arange(nx), np.tile(np.arange(nh), nv))), shape=(nx, nh)),
        ],
        format="csr",
    )
    cons.append(LinearConstraint(link, -np.inf, 0.0))
    # symmetry breaking between consecutive identical hosts, and the volume cut
    sym = [h for h in range(nh - 1) if np.array_equal(e[h], e[h + 1])]
    if sym:
        m = sparse.lil_matrix((len(sym), nx + nh))
        for i, h in enumerate(sym):
            m[i, nx + h] = 1.0
            m[i, nx + h + 1] = -1.0
        cons.append(LinearConstraint(m.tocsr(), 0.0, np.inf))
    cut = sparse.csr_matrix((np.ones(nh), (np.zeros(nh, dtype=int), nx + np.arange(nh))), shape=(1, nx + nh))
    cons.append(LinearConstraint(cut, float(vol), np.inf))
    ub = np.ones(nx + nh)
    ub[:nx] = _fit_matrix(d, e).astype(float).ravel()
    return c, cons, Bounds(np.zeros(nx + nh), ub), nx, nh


def _trim_hosts(d: np.ndarray, e: np.ndarray, upper: int) -> np.ndarray:
    """Keep at most ``upper`` hosts of each distinct capacity vector (an optimum never needs more),
    ordered so identical hosts are consecutive. Returns the kept host indices."""
    keys: dict[tuple[float, ...], list[int]] = {}
    for h in range(e.shape[0]):
        keys.setdefault(tuple(e[h].tolist()), []).append(h)
    keep: list[int] = []
    for hs in keys.values():
        keep.extend(hs[:upper])
    return np.array(keep, dtype=int)


def _upper_bound(d: np.ndarray, e: np.ndarray) -> int:
    """Hosts used by first-fit decreasing (by normalised sum), or all hosts if it cannot place all."""
    scale = np.where(e.max(axis=0) > 0, e.max(axis=0), 1.0)
    order = np.argsort(-(d / scale).sum(axis=1), kind="stable")
    avail = e.copy()
    for v in order:
        ok = np.flatnonzero(np.all(avail >= d[v] - TOL, axis=1))
        if ok.size == 0:
            return e.shape[0]
        avail[ok[0]] -= d[v]
    return int(np.count_nonzero(np.any(avail < e - TOL, axis=1)))


def milp_bound(
    demands: np.ndarray, effective: np.ndarray, time_limit: float = 10.0, relax: bool = False
) -> LowerBound:
    """Solve the MILP (or, with ``relax``, its LP relaxation) and return a valid lower bound."""
    d, e = _check(demands, effective)
    if d.shape[0] == 0:
        return LowerBound(0, "lp" if relax else "milp", optimal=True)
    vol = volume_bound(d, e)
    upper = _upper_bound(d, e)
    if upper <= vol:
        return LowerBound(vol, "volume", optimal=True, detail="first-fit-decreasing meets the volume bound")
    keep = _trim_hosts(d, e, upper)
    c, cons, bounds, nx, nh = _model(d, e[keep], vol)
    integrality = np.zeros(nx + nh) if relax else np.ones(nx + nh)
    res = milp(
        c,
        constraints=cons,
        bounds=bounds,
        integrality=integrality,
        options={"time_limit": float(time_limit), "disp": False},
    )
    method = "lp" if relax else "milp"
    if relax:
        if res.status != 0 or res.fun is None:
            return LowerBound(vol, "volume", detail=f"LP did not finish ({res.message}); volume bound")
        value = max(vol, math.ceil(res.fun - 1e-6))
        return LowerBound(value, method, optimal=value == upper, detail=f"LP optimum {res.fun:.4g}")
    if res.status == 0 and res.fun is not None:
        return LowerBound(int(round(res.fun)), method, optimal=True, detail="MILP solved to optimality")
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
        value = max(vol, math.ceil(dual - 1e-6))
        return LowerBound(value, method, detail=f"time limit {time_limit:g}s; solver dual bound {dual:.4g}")
    return LowerBound(vol, "volume", detail=f"MILP stopped ({res.message}) without a dual bound")


def lower_bound(
    demands: np.ndarray,
    effective: np.ndarray,
    *,
    time_limit: float = 10.0,
    exact_max_vars: int = 6_000,
    lp_max_vars: int = 150_000,
) -> LowerBound:
    """The best bound affordable for the instance size: exact MILP, else LP, else volume.

    Size is ``VMs x hosts`` MILP variables after trimming hosts no optimum needs.
    """
    d, e = _check(demands, effective)
    if d.shape[0] == 0:
        return LowerBound(0, "volume", optimal=True)
    upper = _upper_bound(d, e)
    vars_ = d.shape[0] * len(_trim_hosts(d, e, upper))
    if vars_ <= exact_max_vars:
        return milp_bound(d, e, time_limit)
    if vars_ <= lp_max_vars:
        return milp_bound(d, e, time_limit, relax=True)
    vol = volume_bound(d, e)
    return LowerBound(vol, "volume", optimal=vol == upper, detail=f"{vars_} variables: too large for LP here")


def quality(hosts_used: int, bound: LowerBound | int) -> float:
    """``hosts used / lower bound`` (1.0 is optimal; 0 hosts for 0 VMs counts as 1.0)."""
    lb = bound.value if isinstance(bound, LowerBound) else int(bound)
    if lb <= 0:
        return 1.0 if hosts_used == 0 else math.inf
    return hosts_used / lb
