"""Multi-dimensional packing heuristics from seeds/003, vectorised over hosts.

Notation, used in every formula below, for a request ``r`` and a host ``h``:

* ``E_h = capacity_h * overcommit_h``: the host's effective (placeable) capacity vector;
* ``a_h = E_h - sum of demands already on h``: its *available* vector **before** ``r`` is placed
  (the seed's "a = Server Capacity - sum of VM sizes");
* ``r^ = r / E_h`` and ``a^ = a_h / E_h``: both normalised per dimension by the host's effective
  capacity, so that cores and GiB are comparable (a dimension with ``E_h = 0`` contributes 0).

A host is *feasible* for ``r`` if ``r <= a_h`` in every dimension and the constraints allow it.
Among feasible hosts each heuristic minimises or maximises a score; ties go to the lowest host
index, so every decision is deterministic.

Any-fit rule: except for first fit, the score is taken over hosts that already run a VM ("open"
hosts) and an empty host is opened only if no open host is feasible. Without this rule, scores
such as cosine similarity prefer a fresh empty host (whose ``a`` points along the diagonal) and
spread VMs over the whole cluster. Pass ``prefer_open=False`` to score all feasible hosts, which is
what load balancing wants (worst fit then picks the least-loaded host).

Note on naming: seeds/003 words best fit as "most free resources" and worst fit as "least free";
that is the reverse of the standard bin-packing definitions (best fit = tightest fit). This module
uses the standard definitions, stated exactly in each docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from symbiont.placement.model import RTOL, TOL

# Scores within this relative distance of the best count as a tie (and go to the lowest host index):
# two hosts with the same free capacity reached through different sums differ in the last bits.
TIE_RTOL = 1e-9


class HostView:
    """The arrays a score needs about the hosts, derived from availability and effective capacity.

    ``ClusterState`` keeps these same attributes up to date incrementally; this class computes
    them from scratch for callers with their own notion of "available" (e.g. the hotspot planner,
    whose available vector is headroom below a utilisation threshold). All (hosts, dims) unless
    noted: ``avail`` = a, ``avail_t`` = a transposed (dims, hosts), ``inv_e`` = 1/E (0 where E = 0),
    ``inv_e2`` = inv_e**2, ``a_inv2`` = a * inv_e**2, ``an_sum`` (hosts) = sum_i a^_i,
    ``an_sq`` (hosts) = sum_i a^_i**2.
    """

    def __init__(self, avail: np.ndarray, effective: np.ndarray) -> None:
        # Always a copy: for one dimension the transpose is already contiguous, and a view would make
        # every placement write through into the caller's array (the state's effective capacity).
        self.avail_t = np.array(np.asarray(avail, dtype=float).T, order="C", copy=True)
        self.avail = self.avail_t.T
        eff = np.asarray(effective, dtype=float)
        self.slack_t = np.ascontiguousarray(RTOL * np.abs(eff).T)  # relative capacity tolerance
        self.inv_e = np.divide(1.0, eff, out=np.zeros_like(eff), where=eff > 0)
        self.inv_e2 = self.inv_e * self.inv_e
        self.a_inv2 = self.avail * self.inv_e2
        an = self.avail * self.inv_e
        self.an_sum = an.sum(axis=1)
        self.an_sq = (an * an).sum(axis=1)

    def fits(self, demand: np.ndarray) -> np.ndarray:
        """Boolean mask of hosts with ``demand <= a`` in every dimension, up to RTOL x capacity."""
        return (self.avail_t + self.slack_t >= demand[:, None]).all(axis=0)


ScoreFn = Callable[[np.ndarray, HostView], np.ndarray]

# Each score is computed for every host at once from the maintained sums, so a decision is a few
# matrix-vector products (see the module docstring for the notation).


def _best_fit_score(r: np.ndarray, v: HostView) -> np.ndarray:
    """Normalised leftover after placing: sum_i (a_i - r_i) / E_i = sum_i a^_i - sum_i r_i / E_i."""
    return v.an_sum - v.inv_e @ r


def _cosine(r: np.ndarray, v: HostView) -> np.ndarray:
    """Cosine similarity r^.a^ / (|r^| |a^|); 0 where either vector is zero."""
    num = v.a_inv2 @ r
    den = np.sqrt((v.inv_e2 @ (r * r)) * v.an_sq)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _l2_diff(r: np.ndarray, v: HostView) -> np.ndarray:
    """sum_i (r^_i - a^_i)^2 = |r^|^2 - 2 r^.a^ + |a^|^2."""
    return v.inv_e2 @ (r * r) - 2.0 * (v.a_inv2 @ r) + v.an_sq


def _l2_ratio(r: np.ndarray, v: HostView) -> np.ndarray:
    """sum_i r_i / a_i over dimensions with r_i > 0 (feasible hosts have a_i >= r_i > 0 there)."""
    used = np.flatnonzero(r > 0)
    if used.size == 0:
        return np.zeros(v.avail_t.shape[1])
    return r[used] @ (1.0 / np.maximum(v.avail_t[used], TOL))


@dataclass(frozen=True)
class Heuristic:
    """A placement heuristic: how it scores a feasible host, and how batch mode sorts requests.

    ``score`` is None for the first-fit family (the lowest feasible host index wins). ``sort_key``
    names the batch order: "sum" (sum of r / max E, decreasing) or "prod" (product, decreasing).
    """

    name: str
    formula: str
    doc: str
    score: ScoreFn | None = None
    maximise: bool = False
    sort_key: str = "sum"
    any_fit: bool = True


HEURISTICS: dict[str, Heuristic] = {
    h.name: h
    for h in (
        Heuristic(
            "first-fit",
            "h* = min { h : r <= a_h }",
            "Lowest-index feasible host, hosts in inventory order (the seed's 'sort by server-id').",
        ),
        Heuristic(
            "best-fit",
            "h* = argmin_h sum_i (a_hi - r_i) / E_hi",
            "Tightest fit: the host left with the least normalised free capacity after placing r.",
            score=_best_fit_score,
        ),
        Heuristic(
            "worst-fit",
            "h* = argmax_h sum_i (a_hi - r_i) / E_hi",
            "Loosest fit: the host left with the most normalised free capacity after placing r.",
            score=_best_fit_score,
            maximise=True,
        ),
        Heuristic(
            "cosine",
            "h* = argmax_h (r^ . a^_h) / (|r^| |a^_h|)",
            "Cosine similarity between the request and the host's available vector (before placing): "
            "prefer hosts whose free capacity has the request's shape.",
            score=_cosine,
            maximise=True,
        ),
        Heuristic(
            "l2-norm-diff",
            "h* = argmin_h sum_i (r^_i - a^_hi)^2",
            "Squared Euclidean distance between the request and the host's available vector.",
            score=_l2_diff,
        ),
        Heuristic(
            "l2-norm-ratio",
            "h* = argmax_h sum_{i: r_i>0} r_i / a_hi",
            "Sum of per-resource ratios request/available (seed formula): prefer the host whose "
            "remaining capacity the request fills most. Unit-free, so no normalisation is needed.",
            score=_l2_ratio,
            maximise=True,
        ),
        Heuristic(
            "ffd-prod",
            "sort by prod_i r_i / max_h E_hi (decreasing), then first fit",
            "First-fit decreasing by the product of normalised demands (ties by the sum). "
            "Online (one request, nothing to sort) it is first fit.",
            sort_key="prod",
        ),
        Heuristic(
            "ffd-sum",
            "sort by sum_i r_i / max_h E_hi (decreasing), then first fit",
            "First-fit decreasing by the sum of normalised demands. Online it is first fit.",
        ),
    )
}


def get(name: str) -> Heuristic:
    """The heuristic called ``name``; ValueError listing the known names otherwise."""
    if name not in HEURISTICS:
        raise ValueError(f"unknown heuristic {name!r}; known: {', '.join(HEURISTICS)}")
    return HEURISTICS[name]


def choose(
    h: Heuristic,
    r: np.ndarray,
    view: HostView,
    feasible: np.ndarray,
    is_open: np.ndarray | None = None,
    prefer_open: bool = True,
) -> tuple[int, float | None]:
    """Pick a host among ``feasible`` (bool mask) for request vector ``r``: (index, score) or (-1, None)."""
    if h.score is None:
        i = int(np.argmax(feasible))
        return (i, None) if feasible[i] else (-1, None)
    cand = feasible
    if prefer_open and h.any_fit and is_open is not None:
        open_feas = feasible & is_open
        if open_feas.any():
            cand = open_feas
    if not cand.any():
        return -1, None
    s = h.score(r, view)
    masked = np.where(cand, -s if h.maximise else s, np.inf)  # minimise
    k = int(np.argmin(masked))
    # Ties, up to float noise, go to the lowest host index as documented: look only below k.
    lim = masked[k] + TIE_RTOL * max(1.0, abs(float(masked[k])))
    if k and (masked[:k] <= lim).any():
        k = int(np.argmax(masked[:k] <= lim))
    return k, float(s[k])


def sort_order(
    h: Heuristic, demands: np.ndarray, scale: np.ndarray, active: np.ndarray | None = None
) -> np.ndarray:
    """Batch order (indices into ``demands``): decreasing size by the heuristic's key, stable.

    ``scale`` is the per-dimension normaliser (the largest effective capacity in the cluster).
    The product key uses only the ``active`` dimensions (those some host supplies); a zero demand in one of them makes
    the product 0, exactly as the formula says, and the sum then breaks the tie.
    """
    norm = demands / scale
    ssum = norm.sum(axis=1)
    if h.sort_key == "prod":
        prod = np.prod(norm if active is None else norm[:, active], axis=1)
        return np.lexsort((np.arange(len(demands)), -ssum, -prod))
    return np.lexsort((np.arange(len(demands)), -ssum))
