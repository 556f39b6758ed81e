"""Online and batch placement: turn requests into a plan, with a reason for every decision.

Why two modes: a cluster manager usually sees requests one at a time and must answer at once
(online, seeds/003 "Centralized resource allocation": find, update state, allocate); a planner
that knows a whole batch can sort it first, which is what the first-fit-decreasing family needs
and what makes every heuristic pack better. Both modes share the same decision step.

Affinity groups: online, the first member is placed by the heuristic and later members are
pinned to its host; in batch mode a group is placed as one unit (summed demand) so that it either
lands together or is rejected together with one reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from symbiont.placement import heuristics
from symbiont.placement.model import Host, Request, Vector, validate_requests
from symbiont.placement.state import ClusterState

MODES = ("batch", "online")


@dataclass(frozen=True)
class Decision:
    """Where one request went (``host``) or, when ``host`` is None, why it could not be placed."""

    request_id: str
    host: str | None
    reason: str
    score: float | None = None

    @property
    def placed(self) -> bool:
        return self.host is not None

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.request_id, "host": self.host, "reason": self.reason, "score": self.score}


@dataclass
class Plan:
    """The outcome of planning a batch of requests against a cluster."""

    heuristic: str
    mode: str
    dims: tuple[str, ...]
    decisions: list[Decision]
    hosts_used_before: int
    hosts_used: int
    utilisation_before: dict[str, dict[str, float]]
    utilisation_after: dict[str, dict[str, float]]
    seconds: float
    host_ids: list[str] = field(default_factory=list)

    @property
    def placements(self) -> dict[str, str]:
        return {d.request_id: d.host for d in self.decisions if d.host is not None}

    @property
    def rejected(self) -> list[Decision]:
        return [d for d in self.decisions if d.host is None]

    def to_dict(self) -> dict[str, Any]:
        n = len(self.decisions)
        return {
            "heuristic": self.heuristic,
            "mode": self.mode,
            "dims": list(self.dims),
            "decisions": [d.to_dict() for d in self.decisions],
            "placed": n - len(self.rejected),
            "rejected": len(self.rejected),
            "hosts_used_before": self.hosts_used_before,
            "hosts_used": self.hosts_used,
            "utilisation_before": self.utilisation_before,
            "utilisation_after": self.utilisation_after,
            "seconds": self.seconds,
            "us_per_decision": 1e6 * self.seconds / n if n else 0.0,
        }


class Placer:
    """Places requests one unit at a time against a :class:`ClusterState` it mutates."""

    def __init__(self, state: ClusterState, heuristic: str = "best-fit", prefer_open: bool = True) -> None:
        self.state = state
        self.heuristic = heuristics.get(heuristic)
        self.prefer_open = prefer_open

    def place(self, req: Request, now: float | None = None) -> Decision:
        """Online decision for one request."""
        return self.place_unit([req], now)[0]

    def place_unit(
        self, reqs: Sequence[Request], now: float | None = None, demands: Sequence[np.ndarray] | None = None
    ) -> list[Decision]:
        """Place ``reqs`` together on one host (one request, or an affinity group), or reject all."""
        st = self.state
        ds = [st.demand_of(r) for r in reqs] if demands is None else list(demands)
        total = ds[0] if len(ds) == 1 else np.sum(ds, axis=0)
        label = (
            reqs[0].id
            if len(reqs) == 1
            else f"affinity group {reqs[0].affinity!r} ({len(reqs)} VMs together)"
        )
        block = st.request_block(reqs, total, now)
        if block is not None:
            return [Decision(r.id, None, block) for r in reqs]
        cons = st.constraints(reqs)
        feasible = st.fits(total)
        for _, m in cons:
            feasible &= m
        idx, score = heuristics.choose(self.heuristic, total, st, feasible, st.count > 0, self.prefer_open)
        if idx < 0:
            why = st.explain(total, cons, label if len(reqs) > 1 else "")
            return [Decision(r.id, None, why) for r in reqs]
        for r, d in zip(reqs, ds, strict=True):
            st.add(r, idx, d)
        why = self.heuristic.name + ("" if score is None else f" score {score:.4g}")
        if cons:
            why += " within: " + "; ".join(c for c, _ in cons)
        return [Decision(r.id, st.host_ids[idx], why, score) for r in reqs]


def units_of(requests: Sequence[Request]) -> list[list[Request]]:
    """Group requests for batch placement: each affinity group is one unit, in first-seen order."""
    units: list[list[Request]] = []
    by_group: dict[str, list[Request]] = {}
    for r in requests:
        if r.affinity is None:
            units.append([r])
        elif r.affinity in by_group:
            by_group[r.affinity].append(r)
        else:
            by_group[r.affinity] = [r]
            units.append(by_group[r.affinity])
    return units


def _improve(
    state: ClusterState,
    placer: Placer,
    decisions: list[Decision],
    rejected_units: list[list[Request]],
    requests: list[Request],
    demands: dict[str, np.ndarray],
    now: float | None,
    improve_time: float,
) -> list[Decision]:
    """Run the improvement search on ``state``, then retry the rejected units on the result."""
    from symbiont.placement.bound import fits_alone, quick_bound
    from symbiont.placement.improve import eliminate_hosts

    d = np.array([p.demand for p in state.vms.values()]).reshape(len(state.vms), len(state.dims))
    target = quick_bound(d[fits_alone(d, state.effective)], state.effective).value  # valid for a subset too
    new, moved = eliminate_hosts(
        state, movable={r.id for r in requests}, time_limit=improve_time, target=target
    )
    placer.state = new
    dst = {m.vm: m for m in moved}
    out = [
        Decision(
            x.request_id, dst[x.request_id].dst, f"{x.reason}; improvement search moved it from {x.host}"
        )
        if x.request_id in dst
        else x
        for x in decisions
    ]
    # A unit rejected before the search may fit now (an emptied host); its old reason may be stale.
    retried: dict[str, Decision] = {}
    for u in rejected_units:
        for x in placer.place_unit(u, now, [demands[r.id] for r in u]):
            retried[x.request_id] = x
    return [retried.get(x.request_id, x) for x in out]


def plan(
    hosts: Sequence[Host],
    requests: Sequence[Request],
    heuristic: str = "best-fit",
    mode: str = "batch",
    existing: Iterable[tuple[Request, str]] = (),
    quotas: Mapping[str, Vector] | None = None,
    now: float | None = None,
    prefer_open: bool = True,
    improve: bool = False,
    improve_time: float = 1.0,
) -> Plan:
    """Plan ``requests`` onto ``hosts`` that already run ``existing`` (request, host id) VMs.

    ``improve``: after the heuristic, a local search of at most ``improve_time`` seconds empties
    what hosts it can by relocating the new requests (:func:`symbiont.placement.improve.eliminate_hosts`;
    VMs already running never move); requests rejected before it are then tried again, so a
    rejection's reason always describes the final state.

    Pure: builds its own state from the inputs. Raises ValueError for malformed input (unknown
    heuristic or mode, negative or mis-dimensioned demand, unknown host, contradictory groups);
    a request that is well-formed but cannot be placed gets a Decision with the reason instead.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if now is not None and (isinstance(now, bool) or not math.isfinite(now)):
        raise ValueError(f"now: {now!r} is not a finite time")  # NaN would silently disable deadlines
    if not math.isfinite(improve_time) or improve_time < 0:
        raise ValueError(f"improve_time: {improve_time!r} is not a non-negative number of seconds")
    h = heuristics.get(heuristic)
    existing = list(existing)
    requests = list(requests)
    validate_requests(requests + [r for r, _ in existing])
    state = ClusterState(hosts, quotas)
    for r, host in existing:
        state.add(r, host)
    demands = {r.id: state.demand_of(r) for r in requests}  # validate everything before deciding
    before = state.utilisation()
    used_before = state.hosts_used()
    placer = Placer(state, heuristic, prefer_open)
    if mode == "online":
        units = [[r] for r in requests]
    else:
        units = units_of(requests)
        sizes = np.array([np.sum([demands[r.id] for r in u], axis=0) for u in units]).reshape(
            len(units), len(state.dims)
        )
        order = heuristics.sort_order(h, sizes, state.scale, state.active)
        units = [units[i] for i in order]
    decisions: list[Decision] = []
    t0 = time.perf_counter()
    rejected_units: list[list[Request]] = []
    for u in units:
        ds = placer.place_unit(u, now, [demands[r.id] for r in u])
        decisions.extend(ds)
        if not ds[0].placed:
            rejected_units.append(u)
    if improve and state.vms:
        decisions = _improve(state, placer, decisions, rejected_units, requests, demands, now, improve_time)
        state = placer.state
    seconds = time.perf_counter() - t0
    return Plan(
        heuristic=heuristic,
        mode=mode,
        dims=state.dims,
        decisions=decisions,
        hosts_used_before=used_before,
        hosts_used=state.hosts_used(),
        utilisation_before=before,
        utilisation_after=state.utilisation(),
        seconds=seconds,
        host_ids=list(state.host_ids),
    )
