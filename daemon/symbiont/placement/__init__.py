"""symbiont.placement: cluster placement (seeds/003) and idle-VM consolidation (seeds/004).

Pure policy code, no I/O: multi-dimensional packing heuristics with allocation constraints
(:mod:`.planner`, :mod:`.heuristics`, :mod:`.state`), lower bounds to judge them (:mod:`.bound`),
Sandpiper hotspot detection and migration planning (:mod:`.overload`), idle-VM consolidation
(:mod:`.idle`), and a trace simulator with a trace format and generator (:mod:`.simulator`,
:mod:`.traces`). Interfaces: ``symbiont place`` (:mod:`.cli`), ``/v1/placement`` (:mod:`.api`),
experiments (:mod:`.experiments`). User documentation: docs/placement.md.
"""

from symbiont.placement.model import Host, Request
from symbiont.placement.planner import Decision, Placer, Plan, plan

__all__ = ["Decision", "Host", "Placer", "Plan", "Request", "plan"]
