"""An improvement step after any heuristic: empty whole hosts by moving their VMs elsewhere.

Why: greedy heuristics decide once and never revisit, so a plan often ends with a few lightly
filled hosts whose VMs would fit in the gaps the others left (most visibly on two-dimensional
mixes, where CPU-heavy and memory-heavy VMs strand each other's resource). Host elimination is
the classic local search for bin packing: take the least-loaded open host, try to re-place all
of its VMs on the *other open* hosts (largest VM first, each to the tightest fit, as best fit
does), and keep the result only if the host ends up empty; repeat until no host can be emptied.
It never opens a host, so it never uses more hosts than the plan it starts from.

Every move passes the same checks as a placement: the VM's allocation fits the destination
after overcommit, and the destination satisfies its constraints (anti-affinity, co-location
exclusion). VMs in an affinity group with other members are never moved, and quotas are
unaffected (a move changes no user's total). Pure: works on a copy of the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from symbiont.placement.state import ClusterState


@dataclass(frozen=True)
class Relocation:
    vm: str
    src: str
    dst: str

    def to_dict(self) -> dict[str, str]:
        return {"vm": self.vm, "from": self.src, "to": self.dst}


def eliminate_hosts(
    state: ClusterState, movable: set[str] | None = None, max_passes: int = 1_000
) -> tuple[ClusterState, list[Relocation]]:
    """Return an improved copy of ``state`` and the relocations that got there (see module doc).

    ``movable``: the VMs that may be relocated (e.g. the requests of a plan, not the VMs already
    running); None: all. A host with any VM that may not move is never emptied.
    """
    st = state.copy()
    moves: list[Relocation] = []
    inv_e = np.divide(1.0, st.effective, out=np.zeros_like(st.effective), where=st.effective > 0)
    tried_fail: set[tuple[int, int]] = set()  # (host, its VM count) known not to empty: skip retries
    for _ in range(max_passes):
        open_h = np.flatnonzero(st.count > 0)
        if open_h.size <= 1:
            break
        load = (st.used[open_h] * inv_e[open_h]).sum(axis=1)
        done = False
        for h in open_h[np.argsort(load, kind="stable")]:
            h = int(h)
            if (h, int(st.count[h])) in tried_fail:
                continue
            vms = [p for p in st.vms.values() if p.host == h]
            if any(p.request.affinity is not None and st.affinity_count[p.request.affinity] > 1 for p in vms):
                continue
            if movable is not None and any(p.request.id not in movable for p in vms):
                continue
            trial = st.copy()
            for p in vms:
                trial.remove(p.request.id)
            vms.sort(key=lambda p: (-float((p.demand * inv_e[h]).sum()), p.request.id))
            planned: list[Relocation] = []
            for p in vms:
                feasible = trial.fits(p.demand) & (trial.count > 0)
                feasible[h] = False
                for _, m in trial.constraints([p.request]):
                    feasible &= m
                if not feasible.any():
                    break
                slack = ((trial.avail - p.demand) * inv_e).sum(axis=1)
                g = int(np.argmin(np.where(feasible, slack, np.inf)))
                trial.add(p.request, g, p.demand)
                planned.append(Relocation(p.request.id, st.host_ids[h], st.host_ids[g]))
            if len(planned) == len(vms):
                st = trial
                moves.extend(planned)
                done = True
                break
            tried_fail.add((h, int(st.count[h])))
        if not done:
            break
    return st, moves
