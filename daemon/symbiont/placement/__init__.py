"""symbiont.placement: cluster placement (seeds/003) and idle-VM consolidation (seeds/004).

Pure policy code: multi-dimensional packing heuristics with allocation constraints
(:mod:`.planner`, :mod:`.heuristics`, :mod:`.state`), lower bounds to judge them (:mod:`.bound`),
Sandpiper hotspot detection and migration planning (:mod:`.overload`), idle-VM consolidation
(:mod:`.idle`), an improvement search after any heuristic (:mod:`.improve`), and a trace simulator with
a trace format and generator (:mod:`.simulator`, :mod:`.traces`). The part inside the daemon
(:mod:`.part`) feeds live inputs (:mod:`.live`) from its context and executes plans
(:mod:`.execute`, with libvirt only through :mod:`symbiont.host.migrate`); those are the only
modules that touch the outside world. Interfaces: ``symbiont place`` (:mod:`.cli`),
``/v1/placement`` (:mod:`.api`), experiments (:mod:`.experiments`). User documentation:
docs/placement.md.
"""

from symbiont.placement.model import Host, Request
from symbiont.placement.planner import Decision, Placer, Plan, plan

__all__ = ["Decision", "Host", "Placer", "Plan", "Request", "plan"]
