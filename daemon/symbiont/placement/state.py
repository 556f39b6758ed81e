"""The centralised allocation state of a cluster (seeds/003, "Centralized resource allocation").

Why: every policy (online placement, batch packing, hotspot migration, idle consolidation) asks
the same three questions of the same state: which hosts have room for a vector, which hosts do the
constraints allow, and why is nothing left. Keeping that in one place, as numpy matrices plus
small indexes for the constraint groups, keeps the policies short and makes the constraint
bookkeeping (which is where placement bugs live) testable once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from symbiont.placement.heuristics import HostView
from symbiont.placement.model import (
    TOL,
    Host,
    Request,
    Vector,
    cap_tol,
    fmt,
    host_matrices,
    quota_matrix,
    resolve_dims,
    to_vector,
)


@dataclass(frozen=True)
class Placed:
    """A VM the state knows about: its request, host index and allocated demand vector."""

    request: Request
    host: int
    demand: np.ndarray


class ClusterState(HostView):
    """Hosts, what is allocated on them, and the indexes the constraints need.

    ``avail = capacity * overcommit - used`` and the derived :class:`HostView` arrays are kept up
    to date incrementally (one host row per change), so a placement decision costs a few
    vector operations over the hosts, independent of how many VMs exist.
    """

    def __init__(
        self,
        hosts: Sequence[Host],
        quotas: Mapping[str, Vector] | None = None,
        dims: Sequence[str] | None = None,
    ) -> None:
        self.hosts = list(hosts)
        if not self.hosts:
            raise ValueError("no hosts given")
        self.dims: tuple[str, ...] = tuple(dims) if dims is not None else resolve_dims(self.hosts)
        if not self.dims:
            raise ValueError("hosts declare no resources")
        self.capacity, self.overcommit = host_matrices(self.hosts, self.dims)
        self.effective = self.capacity * self.overcommit
        HostView.__init__(self, self.effective, self.effective)
        self.host_ids = [h.id for h in self.hosts]
        self.index = {h: i for i, h in enumerate(self.host_ids)}
        self.used = np.zeros_like(self.effective)
        self.count = np.zeros(len(self.hosts), dtype=np.int64)
        # Per-dimension scale for size keys (batch sort order): the largest effective capacity.
        mx = self.effective.max(axis=0)
        self.active = mx > 0
        self.scale = np.where(self.active, mx, 1.0)
        self.vms: dict[str, Placed] = {}
        self.quota = quota_matrix(quotas, self.dims)
        self.user_used: dict[str, np.ndarray] = {}
        self.affinity_host: dict[str, int] = {}
        self.affinity_count: Counter[str] = Counter()
        self.anti: dict[str, Counter[int]] = {}
        self.app_hosts: dict[str, Counter[int]] = {}
        self.excluders: dict[str, Counter[int]] = {}

    # -- construction helpers -------------------------------------------------------------
    def copy(self) -> ClusterState:
        """An independent copy, so a planner can try things without touching the caller's state."""
        new = ClusterState.__new__(ClusterState)
        new.__dict__.update(self.__dict__)
        for k, v in self.__dict__.items():
            if isinstance(v, np.ndarray):
                new.__dict__[k] = v.copy()
        new.avail = new.avail_t.T  # the (hosts, dims) view must share the copied storage
        new.vms = dict(self.vms)
        new.user_used = {u: v.copy() for u, v in self.user_used.items()}
        new.affinity_host = dict(self.affinity_host)
        new.affinity_count = Counter(self.affinity_count)
        new.anti = {g: Counter(c) for g, c in self.anti.items()}
        new.app_hosts = {g: Counter(c) for g, c in self.app_hosts.items()}
        new.excluders = {g: Counter(c) for g, c in self.excluders.items()}
        return new

    def _refresh(self, h: int) -> None:
        """Recompute host ``h``'s derived rows from its availability (no drift accumulates)."""
        a = self.avail_t[:, h]
        an = a * self.inv_e[h]
        self.a_inv2[h] = a * self.inv_e2[h]
        self.an_sum[h] = an.sum()
        self.an_sq[h] = an @ an

    def host_index(self, host: str) -> int:
        if host not in self.index:
            raise ValueError(f"unknown host {host!r}; known: {', '.join(self.host_ids)}")
        return self.index[host]

    def demand_of(self, req: Request) -> np.ndarray:
        return to_vector(req.demand, self.dims, f"request {req.id}: demand")

    # -- mutation -------------------------------------------------------------------------
    def add(self, req: Request, host: int | str, demand: np.ndarray | None = None) -> None:
        """Record ``req`` as running on ``host``; checks identity, not capacity (callers decide)."""
        h = self.host_index(host) if isinstance(host, str) else int(host)
        if not 0 <= h < len(self.host_ids):
            raise ValueError(f"host index {h} out of range")
        if req.id in self.vms:
            raise ValueError(f"VM {req.id!r} is already placed on {self.host_ids[self.vms[req.id].host]}")
        d = self.demand_of(req) if demand is None else demand
        self.vms[req.id] = Placed(req, h, d)
        self.used[h] += d
        self.avail_t[:, h] -= d
        self.count[h] += 1
        self._refresh(h)
        if req.user:
            self.user_used[req.user] = self.user_used.get(req.user, np.zeros(len(self.dims))) + d
        if req.affinity is not None:
            self.affinity_host[req.affinity] = h
            self.affinity_count[req.affinity] += 1
        if req.anti_affinity is not None:
            self.anti.setdefault(req.anti_affinity, Counter())[h] += 1
        if req.app:
            self.app_hosts.setdefault(req.app, Counter())[h] += 1
        for x in req.exclude_apps:
            self.excluders.setdefault(x, Counter())[h] += 1

    def remove(self, vm_id: str) -> Placed:
        """Forget VM ``vm_id`` (departure, or the first half of a move)."""
        if vm_id not in self.vms:
            raise ValueError(f"unknown VM {vm_id!r}")
        p = self.vms.pop(vm_id)
        req, h, d = p.request, p.host, p.demand
        self.used[h] -= d
        self.avail_t[:, h] += d
        self.count[h] -= 1
        if self.count[h] == 0:  # drop accumulated float error on an emptied host
            self.used[h] = 0.0
            self.avail_t[:, h] = self.effective[h]
        self._refresh(h)
        if req.user:
            self.user_used[req.user] = self.user_used[req.user] - d
        if req.affinity is not None:
            self.affinity_count[req.affinity] -= 1
            if self.affinity_count[req.affinity] <= 0:
                del self.affinity_count[req.affinity]
                self.affinity_host.pop(req.affinity, None)
        if req.anti_affinity is not None:
            _dec(self.anti, req.anti_affinity, h)
        if req.app:
            _dec(self.app_hosts, req.app, h)
        for x in req.exclude_apps:
            _dec(self.excluders, x, h)
        return p

    def move(self, vm_id: str, host: int | str) -> None:
        p = self.remove(vm_id)
        self.add(p.request, host, p.demand)

    # -- queries --------------------------------------------------------------------------
    def constraints(self, reqs: Sequence[Request]) -> list[tuple[str, np.ndarray]]:
        """The constraints that restrict where the unit ``reqs`` may go: (why, allowed-hosts mask).

        ``reqs`` is one request, or an affinity group placed as a unit. An empty list means every
        host is allowed, which is the common case and costs only dictionary look-ups.
        """
        out: list[tuple[str, np.ndarray]] = []
        n = len(self.host_ids)
        for r in reqs:
            if r.affinity is not None and r.affinity in self.affinity_host:
                h = self.affinity_host[r.affinity]
                m = np.zeros(n, dtype=bool)
                m[h] = True
                out.append((f"affinity group {r.affinity!r} runs on host {self.host_ids[h]}", m))
                break
        for r in reqs:
            if r.anti_affinity is not None and self.anti.get(r.anti_affinity):
                hs = sorted(self.anti[r.anti_affinity])
                m = np.ones(n, dtype=bool)
                m[hs] = False
                out.append((f"anti-affinity group {r.anti_affinity!r} already on {self._names(hs)}", m))
        for r in reqs:
            blocked: set[int] = set()
            whys: list[str] = []
            for x in sorted(r.exclude_apps):
                if self.app_hosts.get(x):
                    blocked.update(self.app_hosts[x])
                    whys.append(f"{r.id} excludes app {x!r} (on {self._names(sorted(self.app_hosts[x]))})")
            if r.app and self.excluders.get(r.app):
                blocked.update(self.excluders[r.app])
                whys.append(f"VMs on {self._names(sorted(self.excluders[r.app]))} exclude app {r.app!r}")
            if blocked:
                m = np.ones(n, dtype=bool)
                m[sorted(blocked)] = False
                out.append(("co-location: " + "; ".join(whys), m))
        return out

    def request_block(self, reqs: Sequence[Request], demand: np.ndarray, now: float | None) -> str | None:
        """A host-independent reason the unit cannot be placed now (deadline or quota), or None."""
        if now is not None:
            for r in reqs:
                if r.deadline is not None and now > r.deadline + TOL:
                    return f"deadline: {r.id} had to start by {fmt(r.deadline)}, now is {fmt(now)}"
                if r.end is not None and now >= r.end - TOL:
                    return f"deadline: {r.id} ends at {fmt(r.end)}, now is {fmt(now)}"
        by_user: dict[str, np.ndarray] = {}
        for r in reqs:
            if r.user and r.user in self.quota:
                d = self.demand_of(r) if len(reqs) > 1 else demand
                by_user[r.user] = by_user.get(r.user, np.zeros(len(self.dims))) + d
        for user, d in by_user.items():
            would = self.user_used.get(user, np.zeros(len(self.dims))) + d
            over = np.flatnonzero(would > self.quota[user] + cap_tol(self.quota[user]))
            if over.size:
                i = int(over[0])
                return (
                    f"quota: user {user!r} would use {self.dims[i]} {fmt(would[i])} "
                    f"of quota {fmt(self.quota[user][i])}"
                )
        return None

    def explain(self, demand: np.ndarray, cons: list[tuple[str, np.ndarray]], label: str = "") -> str:
        """Why no host takes ``demand`` given constraints ``cons``: name the blocking constraint or
        resource, with the numbers (e.g. ``mem: needs 8, largest free 4 after overcommit 1``)."""
        allowed = np.ones(len(self.host_ids), dtype=bool)
        for _, m in cons:
            allowed &= m
        prefix = f"{label}: " if label else ""
        if not allowed.any():
            return prefix + "; ".join(why for why, _ in cons) + " — no host satisfies all constraints"
        idx = np.flatnonzero(allowed)
        a = self.avail[idx]
        parts: list[str] = []
        for d, name in enumerate(self.dims):
            if demand[d] > (a[:, d] + self.slack_t[d, idx]).max():
                best = idx[int(np.argmax(a[:, d]))]
                parts.append(
                    f"{name}: needs {fmt(demand[d])}, largest free {fmt(max(a[:, d].max(), 0.0))} "
                    f"after overcommit {fmt(self.overcommit[best, d])}"
                )
        scope = ""
        if not allowed.all():
            scope = f" (on the {idx.size} hosts allowed by: " + "; ".join(why for why, _ in cons) + ")"
        if parts:
            return prefix + "; ".join(parts) + scope
        # Every dimension fits somewhere, but never all on one host: fragmentation.
        counts = ", ".join(
            f"{name} fits on {int(np.sum(a[:, d] + self.slack_t[d, idx] >= demand[d]))}"
            for d, name in enumerate(self.dims)
            if demand[d] > 0
        )
        return prefix + f"fragmented: no single host has all of it free at once ({counts} hosts){scope}"

    def hosts_used(self) -> int:
        return int(np.count_nonzero(self.count))

    def utilisation(self) -> dict[str, dict[str, float]]:
        """Allocated / physical capacity per host and resource (above 1.0 means overcommitted)."""
        util = np.divide(self.used, self.capacity, out=np.zeros_like(self.used), where=self.capacity > 0)
        return {
            h: {d: round(float(util[i, j]), 6) for j, d in enumerate(self.dims)}
            for i, h in enumerate(self.host_ids)
        }

    def _names(self, idx: Sequence[int], limit: int = 4) -> str:
        names = [self.host_ids[i] for i in idx]
        if len(names) > limit:
            return ", ".join(names[:limit]) + f" and {len(names) - limit} more"
        return ", ".join(names)


def _dec(index: dict[str, Counter[int]], key: str, h: int) -> None:
    c = index[key]
    c[h] -= 1
    if c[h] <= 0:
        del c[h]
    if not c:
        del index[key]
