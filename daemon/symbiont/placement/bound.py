"""Lower bounds on the number of hosts a set of VMs needs, to judge heuristics against.

Why: "best fit used 42 hosts" means nothing on its own; "42 hosts, at least 40 are needed" does.
Every heuristic is therefore reported as ``hosts used / lower bound`` (>= 1; 1 is optimal).

Three bounds, each valid for the multi-dimensional problem with heterogeneous hosts (constraints
such as anti-affinity are ignored, which can only lower the bound, so it stays valid):

* ``volume``: for each dimension d, the fewest hosts whose largest effective capacities add up to
  the total demand in d; the maximum over d. Also, VMs that need more than half of the largest
  host in some dimension pairwise cannot share a host, so their count per dimension is a bound.
  Cheap at any size.
* ``l2``: Martello & Toth's L2 bound per dimension, against the largest host in that dimension (a
  relaxation, so valid for heterogeneous hosts too; tight for identical ones), and for vectors a
  conflict-clique bound: VMs that pairwise fit on no host together each need their own host, so
  a greedy clique of such VMs is a bound. O(n log n); ``quick_bound`` is the best of these.
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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from symbiont.placement.model import RTOL


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


def fits_alone(demands: np.ndarray, effective: np.ndarray) -> np.ndarray:
    """Per VM: whether it fits on some host when that host is empty (the bound needs all to)."""
    d = np.asarray(demands, dtype=float)
    e = np.asarray(effective, dtype=float)
    return _fit_matrix(d.reshape(-1, e.shape[1]), np.unique(e, axis=0)).any(axis=1)


def _fit_matrix(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """(VMs, hosts): whether VM v fits on an otherwise empty host h."""
    return np.all(d[:, None, :] <= e[None, :, :] * (1 + RTOL), axis=2)


def volume_bound(demands: np.ndarray, effective: np.ndarray) -> int:
    """max over dims of the fewest largest hosts covering the total demand; and the big-VM count."""
    d, e = _check(demands, effective)
    if d.shape[0] == 0:
        return 0
    best = 1
    for j in range(e.shape[1]):
        total = d[:, j].sum()
        if total <= 0:
            continue
        caps = np.sort(e[:, j])[::-1]
        k = int(np.searchsorted(np.cumsum(caps), total - RTOL * total) + 1)
        best = max(best, min(k, e.shape[0]))
        big = int(np.count_nonzero(d[:, j] > caps[0] / 2 * (1 + RTOL)))
        best = max(best, big)
    return best


def l2_bound(weights: np.ndarray, capacity: float) -> int:
    """Martello & Toth's L2 for one dimension: max over K of |J1| + |J2| + ceil(excess of J3 / C).

    J1 = {w > C - K}, J2 = {C/2 < w <= C - K}, J3 = {K <= w <= C/2}, for K = 0 and each distinct
    w <= C/2; the J3 volume that does not fit beside J2's items needs new hosts. Vectorised: O(n log n).
    """
    c = float(capacity)
    w = np.sort(np.asarray(weights, dtype=float))
    w = w[w > 0]
    if w.size == 0 or c <= 0:
        return 0
    tol = RTOL * c
    pre = np.concatenate([[0.0], np.cumsum(w)])
    n = w.size
    ks = np.unique(np.concatenate([[0.0], w[w <= c / 2 + tol]]))
    i_half = np.searchsorted(w, c / 2 + tol, side="right")  # w[i_half:] > C/2
    i_j1 = np.searchsorted(w, c - ks + tol, side="right")  # w[i_j1:] > C - K
    i_j1 = np.maximum(i_j1, i_half)
    i_k = np.searchsorted(w, ks, side="left")  # w[i_k:] >= K
    n1 = n - i_j1
    n2 = i_j1 - i_half
    s2 = pre[i_j1] - pre[i_half]
    s3 = pre[i_half] - pre[np.minimum(i_k, i_half)]
    extra = np.ceil(np.maximum(0.0, s3 - (n2 * c - s2)) / c - 1e-9)
    return int(np.max(n1 + n2 + extra))


def clique_bound(demands: np.ndarray, effective: np.ndarray) -> int:
    """Size of a greedy clique of VMs that pairwise fit on no host together (each needs its own).

    Greedy from several orders (each dimension's size and the normalised sum, decreasing); any
    clique is a valid bound, the largest found is returned. O(n x clique) per order.
    """
    d, e = np.asarray(demands, dtype=float), np.asarray(effective, dtype=float)
    if d.shape[0] == 0:
        return 0
    hosts = np.unique(e, axis=0)
    cap = hosts + RTOL * np.abs(hosts)
    scale = np.where(e.max(axis=0) > 0, e.max(axis=0), 1.0)
    norm = d / scale
    # Only VMs above half of the largest host in some dimension can conflict with a VM like themselves;
    # a VM conflicts with another only if together they exceed every host in some dimension.
    # A VM can share a clique with another only if, with the largest VM of some dimension, it
    # overflows the largest host there; the rest (most VMs of a cloud mix) are skipped up front.
    top = np.sort(d, axis=0)[-2:] if d.shape[0] > 1 else d
    cand = np.flatnonzero(np.any(d + top[-1] > cap.max(axis=0), axis=1))
    if cand.size <= 1:
        return min(1, d.shape[0])
    d, norm = d[cand], norm[cand]
    orders = [np.argsort(-norm[:, j], kind="stable") for j in range(d.shape[1])]
    orders.append(np.argsort(-norm.sum(axis=1), kind="stable"))
    best = 0
    for order in orders:
        clique: list[int] = []
        for v in order[: min(len(order), 5_000)]:
            if clique:
                pair = d[clique] + d[v]  # (clique, dims)
                fits_some = np.any(np.all(pair[:, None, :] <= cap[None, :, :], axis=2), axis=1)
                if fits_some.any():
                    continue
            clique.append(int(v))
        best = max(best, len(clique))
    return best


def quick_bound(demands: np.ndarray, effective: np.ndarray) -> LowerBound:
    """The best of the cheap bounds (volume, L2 per dimension, conflict clique); O(n log n)."""
    d, e = _check(demands, effective)
    if d.shape[0] == 0:
        return LowerBound(0, "volume", optimal=True)
    vol = volume_bound(d, e)
    l2 = max((l2_bound(d[:, j], float(e[:, j].max())) for j in range(d.shape[1])), default=0)
    cl = clique_bound(d, e) if d.shape[1] > 1 else 0
    value = max(vol, l2, cl)
    method = "volume" if value == vol else ("l2" if value == l2 else "clique")
    return LowerBound(value, method, detail=f"volume {vol}, L2 {l2}" + (f", clique {cl}" if cl else ""))


def _model(d: np.ndarray, e: np.ndarray, vol: int) -> tuple[np.ndarray, list[Any], Any, int, int]:
    """Objective, constraints and bounds of the MILP above (x first, VM-major; then y)."""
    from scipy import sparse  # imported here: SciPy costs ~1 s to import, the cheap bounds need none of it
    from scipy.optimize import Bounds, LinearConstraint

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
        ok = np.flatnonzero(np.all(avail + RTOL * e >= d[v], axis=1))
        if ok.size == 0:
            return e.shape[0]
        avail[ok[0]] -= d[v]
    return int(np.count_nonzero(np.any(avail < e * (1 - RTOL), axis=1)))


def milp_bound(
    demands: np.ndarray,
    effective: np.ndarray,
    time_limit: float = 10.0,
    relax: bool = False,
    *,
    floor: LowerBound | None = None,
) -> LowerBound:
    """Solve the MILP (or, with ``relax``, its LP relaxation) and return a valid lower bound.

    ``time_limit`` covers the whole call (building the model too), not just the solver's part.
    ``floor``: a bound already known (default: :func:`quick_bound`), used as a cut and as the answer
    when the solver is stopped without a better one.
    """
    deadline = time.perf_counter() + max(0.0, float(time_limit))
    d, e = _check(demands, effective)
    if d.shape[0] == 0:
        return LowerBound(0, "lp" if relax else "milp", optimal=True)
    base = floor if floor is not None else quick_bound(d, e)
    vol = base.value
    upper = _upper_bound(d, e)
    if upper <= vol:
        return LowerBound(
            vol, base.method, optimal=True, detail=f"first-fit-decreasing meets the {base.method} bound"
        )
    keep = _trim_hosts(d, e, upper)
    est = d.shape[0] * len(keep) * _BUILD_S_PER_VAR
    if deadline - time.perf_counter() < est + _MIN_SOLVE_S:
        return _stopped(base, f"time limit {time_limit:.3g}s: no time for the {'LP' if relax else 'MILP'}")
    from scipy.optimize import milp

    c, cons, bounds, nx, nh = _model(d, e[keep], vol)
    left = deadline - time.perf_counter()
    if left < _MIN_SOLVE_S:
        return _stopped(base, f"time limit {time_limit:.3g}s reached while building the model")
    integrality = np.zeros(nx + nh) if relax else np.ones(nx + nh)
    res = milp(
        c,
        constraints=cons,
        bounds=bounds,
        integrality=integrality,
        # HiGHS checks its clock between phases and overshoots by up to ~0.2 s: give it a margin.
        options={"time_limit": float(max(_MIN_SOLVE_S, 0.75 * left - 0.02)), "disp": False},
    )
    method = "lp" if relax else "milp"
    if relax:
        if res.status != 0 or res.fun is None:
            return _stopped(base, f"LP did not finish ({res.message})")
        value = max(vol, math.ceil(res.fun - 1e-6))
        return LowerBound(value, method, optimal=value == upper,
                          detail=f"LP optimum {res.fun:.4g}")  # fmt: skip
    if res.status == 0 and res.fun is not None:
        return LowerBound(int(round(res.fun)), method, optimal=True, detail="MILP solved to optimality")
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
        value = max(vol, math.ceil(dual - 1e-6))
        return LowerBound(value, method,
                          detail=f"time limit {time_limit:.3g}s; solver dual bound {dual:.4g}")  # fmt: skip
    return _stopped(base, f"MILP stopped ({res.message}) without a dual bound")


# Measured on the 2-core dev host: building the model costs about 4 us per variable; the solver
# is not started with less than this left, so that a time limit is honoured as a whole.
_BUILD_S_PER_VAR = 5e-6
_MIN_SOLVE_S = 0.02


def _stopped(base: LowerBound, why: str) -> LowerBound:
    return LowerBound(base.value, base.method, base.optimal, f"{why}; {base.detail}".strip("; "))


def lower_bound(
    demands: np.ndarray,
    effective: np.ndarray,
    *,
    time_limit: float = 2.0,
    exact_max_vars: int = 6_000,
    lp_max_vars: int = 150_000,
) -> LowerBound:
    """The best bound affordable within ``time_limit`` seconds (the whole call): the cheap bounds
    (volume, L2, clique), then the exact MILP or its LP relaxation by instance size.

    Size is ``VMs x hosts`` MILP variables after trimming hosts no optimum needs. With
    ``time_limit`` 0 only the cheap bounds are computed.
    """
    deadline = time.perf_counter() + max(0.0, float(time_limit))
    d, e = _check(demands, effective)
    if d.shape[0] == 0:
        return LowerBound(0, "volume", optimal=True)
    qb = quick_bound(d, e)
    upper = _upper_bound(d, e)
    if upper <= qb.value:
        return LowerBound(
            qb.value, qb.method, optimal=True, detail=f"first-fit-decreasing meets it; {qb.detail}"
        )
    left = deadline - time.perf_counter()
    vars_ = d.shape[0] * len(_trim_hosts(d, e, upper))
    if vars_ <= exact_max_vars and left > 0:
        return milp_bound(d, e, left, floor=qb)
    if vars_ <= lp_max_vars and left > 0:
        return milp_bound(d, e, left, relax=True, floor=qb)
    why = "time limit" if left <= 0 else f"{vars_} variables: too large for LP here"
    return _stopped(qb, why)


def quality(hosts_used: int, bound: LowerBound | int) -> float:
    """``hosts used / lower bound`` (1.0 is optimal; 0 hosts for 0 VMs counts as 1.0)."""
    lb = bound.value if isinstance(bound, LowerBound) else int(bound)
    if lb <= 0:
        return 1.0 if hosts_used == 0 else math.inf
    return hosts_used / lb


def plan_bound(
    ids: list[str], demands: np.ndarray, effective: np.ndarray, hosts_used: int, **kw: Any
) -> dict[str, Any]:
    """A plan's bound report (``place --bound`` and ``POST /plan`` with ``bound``): the lower
    bound on hosts for the VMs ``ids`` (rows of ``demands``) and the plan's ratio to it.

    A VM already running that no host could take alone (an overcommitted one) has no bound;
    the bound of the others is still a valid bound on hosts used, so it is left out and named
    (``left_out``) instead of failing the whole report. ``kw`` goes to :func:`lower_bound`."""
    d = np.asarray(demands, dtype=float).reshape(len(ids), np.asarray(effective).shape[1])
    ok = fits_alone(d, effective)
    lb = lower_bound(d[ok], effective, **kw)
    out: dict[str, Any] = {
        "value": lb.value,
        "method": lb.method,
        "optimal": lb.optimal and bool(ok.all()),
        "detail": lb.detail,
        "ratio": round(quality(hosts_used, lb), 4),
    }
    if not ok.all():
        out["left_out"] = [ids[i] for i in np.flatnonzero(~ok)]
        out["detail"] += "; left out (fit no host alone): " + ", ".join(out["left_out"])
    return out
