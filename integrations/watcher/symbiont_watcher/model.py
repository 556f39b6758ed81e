"""A Watcher cluster model built from live symbiont host daemons (their placement inventories).

Why: a lab without Nova (the symbiont multi-host lab) can still run the Watcher strategies on real
hosts: each daemon is a compute node (capacity from its libvirt), each registered running VM an
instance, and the daemons' sample series are the usage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from watcher.common import utils
from watcher.decision_engine.model import element, model_root

from symbiont_watcher import core


def model_from_inventories(invs: Sequence[Mapping[str, Any]]) -> model_root.ModelRoot:
    """A Watcher compute model of live symbiont hosts (one ComputeNode per daemon)."""
    snap = core.snapshot_from_inventories(invs)
    model = model_root.ModelRoot()
    for n in snap.nodes:
        node = element.ComputeNode(uuid=n.id, hostname=n.hostname, status="enabled", state="up",
                                   vcpus=int(n.capacity["cpu"]), memory=int(n.capacity["mem"]), disk=0,
                                   vcpu_reserved=0, memory_mb_reserved=0, disk_gb_reserved=0,
                                   vcpu_ratio=1.0, memory_ratio=1.0, disk_ratio=1.0)  # fmt: skip
        model.add_node(node)
    for v in snap.vms:
        inst = element.Instance(uuid=v.id, name=v.name, state="active", vcpus=int(v.demand["cpu"]),
                                memory=int(v.demand["mem"]), disk=0, project_id=utils.generate_uuid(),
                                metadata={}, locked=False, watcher_exclude=False)  # fmt: skip
        model.add_instance(inst)
        model.map_instance(inst, model.get_node_by_uuid(v.node))
    return model

