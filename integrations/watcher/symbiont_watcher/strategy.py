"""symbiont's placement as OpenStack Watcher strategies (entry point ``watcher_strategies``).

* ``symbiont_consolidation`` (goal ``server_consolidation``): symbiont's host elimination (the
  improvement search after its packing heuristics) on the current placement: live migrations that
  empty the least-filled compute nodes, which are then disabled (``change_nova_service_state``) so
  the scheduler does not refill them; VMs symbiont's idle rule calls idle (live symbiont daemons
  only) are resized to ``idle_flavor`` when one is given.
* ``symbiont_hotspot`` (goal ``workload_balancing``): Sandpiper — nodes whose utilisation is above
  a threshold in k of the last n observations, relieved by migrating the VMs with the highest
  volume-to-size ratio to the node symbiont's heuristic picks.

Usage comes from symbiont host daemons when ``symbiont_daemons`` is given (their sample series:
what Sandpiper's k-of-n rule is made for), else from Watcher's datasource
(``instance_cpu_usage`` in %, ``instance_ram_usage`` in MB, one aggregate per instance over
``period``: k = n = 1), else the allocations stand in (conservative). The action plan is then
Watcher's: its planner orders and its applier executes the actions.
"""

from __future__ import annotations

from typing import Any

from oslo_log import log
from watcher.decision_engine.model import element
from watcher.decision_engine.strategy.strategies import base

from symbiont_watcher import core

LOG = log.getLogger(__name__)


def _get(obj: Any, name: str, default: float) -> float:
    """A field of a model element, or ``default`` where the model leaves it unset."""
    return float(getattr(obj, name)) if obj.obj_attr_is_set(name) and getattr(obj, name) is not None else default


def snapshot(model: Any) -> core.Snapshot:
    """Watcher's compute model as a :class:`core.Snapshot` (capacity after reserve and ratio)."""
    nodes, vms = [], []
    for node in model.get_all_compute_nodes().values():
        enabled = node.status == element.ServiceState.ENABLED.value and node.state == element.ServiceState.ONLINE.value
        cap = {"cpu": max(0.0, (node.vcpus - _get(node, "vcpu_reserved", 0)) * (_get(node, "vcpu_ratio", 1) or 1.0)),
               "mem": max(0.0, (node.memory - _get(node, "memory_mb_reserved", 0))
                          * (_get(node, "memory_ratio", 1) or 1.0))}  # fmt: skip
        nodes.append(core.Node(node.uuid, node.hostname, cap, enabled))
        for inst in model.get_node_instances(node):
            movable = inst.state == element.InstanceState.ACTIVE.value and not inst.watcher_exclude and not inst.locked
            vms.append(core.Vm(inst.uuid, inst.name, node.uuid, {"cpu": float(inst.vcpus), "mem": float(inst.memory)},
                               movable))  # fmt: skip
    return core.Snapshot(nodes, vms)


class _Symbiont:
    """Shared parts: parameters, usage sources, and turning decisions into actions."""

    def _usage(self, snap: core.Snapshot) -> str:
        """Fill ``snap.usage`` (and activity); returns where it came from."""
        daemons = self.input_parameters.get("symbiont_daemons") or []
        if daemons:
            live = core.snapshot_from_inventories(core.fetch_inventories(daemons))
            by_name = {v.name: v.id for v in snap.vms}
            for vid, s in live.usage.items():  # symbiont names VMs by libvirt domain name or uuid
                key = vid if any(v.id == vid for v in snap.vms) else by_name.get(vid)
                if key:
                    snap.usage[key] = s
                    if vid in live.activity:
                        snap.activity[key] = live.activity[vid]
            return "symbiont daemons"
        try:
            ds = self.datasource_backend
        except Exception as exc:  # noqa: BLE001 - no datasource configured: allocations stand in
            LOG.info("symbiont: no datasource (%s); allocations stand in for usage", exc)
            return "allocations"
        period = int(self.input_parameters.get("period", 300))
        gran = int(self.input_parameters.get("granularity", 300))
        for v in snap.vms:
            inst = self.compute_model.get_instance_by_uuid(v.id)
            cpu = ds.statistic_aggregation(resource=inst, resource_type="instance", meter_name="instance_cpu_usage",
                                           period=period, aggregate="mean", granularity=gran)  # fmt: skip
            ram = ds.statistic_aggregation(resource=inst, resource_type="instance", meter_name="instance_ram_usage",
                                           period=period, aggregate="mean", granularity=gran)  # fmt: skip
            if cpu is None and ram is None:
                continue
            snap.usage[v.id] = [[float(cpu or 0.0) / 100.0 * v.demand["cpu"], float(ram or v.demand["mem"])]]
        return "datasource"

    def _migrate(self, vid: str, src: str, dst: str) -> None:
        model = self.compute_model
        inst = model.get_instance_by_uuid(vid)
        s, d = model.get_node_by_uuid(src), model.get_node_by_uuid(dst)
        if model.migrate_instance(inst, s, d):
            self.solution.add_action(
                action_type=self.MIGRATION,
                resource_id=inst.uuid,
                input_parameters={"migration_type": "live", "source_node": s.hostname,
                                  "destination_node": d.hostname, "resource_name": inst.name},
            )  # fmt: skip
            self.migrations += 1

    def _disable(self, node_id: str, reason: str) -> None:
        node = self.compute_model.get_node_by_uuid(node_id)
        if node.status == element.ServiceState.DISABLED.value:
            return
        self.solution.add_action(
            action_type="change_nova_service_state",
            resource_id=node.uuid,
            input_parameters={"state": element.ServiceState.DISABLED.value, "resource_name": node.hostname,
                              "disabled_reason": reason},
        )  # fmt: skip
        node.status = element.ServiceState.DISABLED.value
        self.released += 1


class SymbiontConsolidation(_Symbiont, base.ServerConsolidationBaseStrategy):
    """Free compute nodes with symbiont's host elimination; resize idle VMs."""

    def __init__(self, config: Any, osc: Any = None) -> None:
        super().__init__(config, osc)
        self.migrations = 0
        self.released = 0
        self.nodes_count = 0

    @classmethod
    def get_name(cls) -> str:
        return "symbiont_consolidation"

    @classmethod
    def get_display_name(cls) -> str:
        return "symbiont consolidation (host elimination + idle VMs)"

    @classmethod
    def get_translatable_display_name(cls) -> str:
        return "symbiont consolidation (host elimination + idle VMs)"

    @classmethod
    def get_schema(cls) -> dict[str, Any]:
        return {"properties": {
            "time_limit": {"description": "seconds for the improvement search", "type": "number", "default": 1.0},
            "idle_flavor": {"description": "flavor idle VMs are resized to (empty: no resize)", "type": "string",
                            "default": ""},
            "symbiont_daemons": {"description": "symbiont host daemons (sockets or URLs) for live usage",
                                 "type": "array", "items": {"type": "string"}, "default": []},
        }}  # fmt: skip

    def pre_execute(self) -> None:
        self._pre_execute()

    def do_execute(self, audit: Any = None) -> None:
        snap = snapshot(self.compute_model)
        self.nodes_count = len(snap.nodes)
        flavor = self.input_parameters.get("idle_flavor") or ""
        if flavor or self.input_parameters.get("symbiont_daemons"):
            self._usage(snap)
        moves, emptied = core.consolidate(snap, float(self.input_parameters.get("time_limit", 1.0)))
        LOG.info("symbiont consolidation: %d migrations empty %s", len(moves), emptied)
        for vid, src, dst in moves:
            self._migrate(vid, src, dst)
        for nid in emptied:
            self._disable(nid, "symbiont consolidation: node emptied")
        if flavor:
            for vid, why in core.idle_vms(snap):
                self.solution.add_action(action_type="resize", resource_id=vid,
                                         input_parameters={"flavor": flavor})  # fmt: skip
                LOG.info("symbiont: resize %s to %s: %s", vid, flavor, why)

    def post_execute(self) -> None:
        self.solution.set_efficacy_indicators(
            compute_nodes_count=self.nodes_count,
            released_compute_nodes_count=self.released,
            instance_migrations_count=self.migrations,
        )


class SymbiontHotspot(_Symbiont, base.BaseStrategy):
    """Sandpiper hotspot relief (goal workload_balancing)."""

    def __init__(self, config: Any, osc: Any = None) -> None:
        super().__init__(config, osc)
        self.migrations = 0
        self.released = 0
        self.hotspots: list[dict[str, Any]] = []

    @classmethod
    def get_goal_name(cls) -> str:
        return "workload_balancing"

    @classmethod
    def get_name(cls) -> str:
        return "symbiont_hotspot"

    @classmethod
    def get_display_name(cls) -> str:
        return "symbiont Sandpiper hotspot relief"

    @classmethod
    def get_translatable_display_name(cls) -> str:
        return "symbiont Sandpiper hotspot relief"

    @classmethod
    def get_schema(cls) -> dict[str, Any]:
        return {"properties": {
            "cpu_threshold": {"description": "node CPU fraction", "type": "number", "default": 0.75},
            "mem_threshold": {"description": "node memory fraction", "type": "number", "default": 0.75},
            "k": {"description": "observations over threshold (of n) for a hotspot", "type": "integer", "default": 3},
            "n": {"description": "observations looked at", "type": "integer", "default": 5},
            "period": {"description": "datasource period (s)", "type": "number", "default": 300},
            "granularity": {"description": "datasource granularity (s)", "type": "number", "default": 300},
            "symbiont_daemons": {"description": "symbiont host daemons (sockets or URLs) for usage series",
                                 "type": "array", "items": {"type": "string"}, "default": []},
        }}  # fmt: skip

    def pre_execute(self) -> None:
        self._pre_execute()

    def do_execute(self, audit: Any = None) -> None:
        snap = snapshot(self.compute_model)
        source = self._usage(snap)
        k, n = int(self.input_parameters.get("k", 3)), int(self.input_parameters.get("n", 5))
        if source != "symbiont daemons":
            k = n = 1  # one aggregate per instance: the datasource's period is the persistence filter
        th = {"cpu": float(self.input_parameters.get("cpu_threshold", 0.75)),
              "mem": float(self.input_parameters.get("mem_threshold", 0.75))}  # fmt: skip
        moves, self.hotspots, unresolved = core.hotspots(snap, th, k, n)
        LOG.info("symbiont hotspots (%s usage): %s; %d migrations; unresolved %s", source,
                 [h["host"] for h in self.hotspots], len(moves), unresolved)  # fmt: skip
        for vid, src, dst, _why in moves:
            self._migrate(vid, src, dst)

    def post_execute(self) -> None:
        self.solution.set_efficacy_indicators(instance_migrations_count=self.migrations,
                                              instances_count=len(self.compute_model.get_all_instances()))  # fmt: skip
