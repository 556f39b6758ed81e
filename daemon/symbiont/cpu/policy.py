"""Pure policy of the CPU-and-nesting part: no I/O, every decision explained by its inputs.

The containers' CPU ratio keeping and share-based memory reclamation run *inside the guest*
(the guest decides what), so their implementation is the agent's standard-library module
:mod:`symbiont_agent.containers_policy`, re-exported here so that the daemon, the tests and
the experiments use the very same functions the agent applies. This module adds the host's
own decisions: how a vCPU scale step is carried out, how far measured usage is from the
ratios, and the ``cpu.weight`` of each VM's QEMU group on a cgroup v2 host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from symbiont_agent.containers_policy import (
    CPU_STRATEGIES,
    PERIOD_US,
    CpuAlloc,
    MemView,
    cpu_plan,
    entitlements,
    quota_for,
    ratio_error,
    reclaim_plan,
    usage_ratio,
    weights_for,
)

__all__ = [
    "CPU_STRATEGIES",
    "PERIOD_US",
    "CpuAlloc",
    "MemView",
    "ScaleStep",
    "cpu_plan",
    "cpu_shares",
    "entitlements",
    "expected_shares",
    "plan_scale",
    "qemu_cpu_weight",
    "quota_for",
    "ratio_error",
    "reclaim_plan",
    "schedule",
    "usage_ratio",
    "weights_for",
]


@dataclass(frozen=True)
class ScaleStep:
    """How one vCPU change is carried out.

    ``guest_first``: offline in the guest before asking libvirt (scale-down), so a busy CPU
    is never yanked and the ratios are in force even when libvirt's unplug times out (it
    does under TCG: the ACPI eject is not acknowledged within libvirt's fixed 5 s).
    """

    before: int
    after: int
    direction: str  # up | down | none
    guest_first: bool
    libvirt: bool  # ask libvirt at all (hot-plug up needs it; down is best effort)

    def as_dict(self) -> dict[str, object]:
        return {"before": self.before, "after": self.after, "direction": self.direction,
                "guest_first": self.guest_first, "libvirt": self.libvirt}


def plan_scale(guest_online: int, libvirt_live: int, target: int, max_vcpus: int, min_vcpus: int = 1,
               libvirt_unplug: bool = True) -> ScaleStep:
    """Decide the mechanism of a scale step to ``target`` vCPUs.

    Up: libvirt hot-plugs only what the VM does not have yet (CPUs offlined in the guest
    earlier are still present and just come back online). Down: the guest offlines first;
    libvirt's unplug follows when ``libvirt_unplug`` (stock behaviour), and a timeout is
    accepted because the guest-side offline is what takes the CPUs away from the workload.
    """
    if not min_vcpus <= target <= max_vcpus:
        raise ValueError(f"vcpus {target} outside {min_vcpus}..{max_vcpus}")
    if target > guest_online:
        return ScaleStep(guest_online, target, "up", False, target > libvirt_live)
    if target < guest_online:
        return ScaleStep(guest_online, target, "down", True, libvirt_unplug and target < libvirt_live)
    return ScaleStep(guest_online, target, "none", False, False)


def expected_shares(ratios: Mapping[str, float]) -> dict[str, float]:
    """The fraction of the containers' CPU time each should get: r_i / sum(r)."""
    total = float(sum(ratios.values()))
    return {n: (r / total if total > 0 else 0.0) for n, r in ratios.items()}


def cpu_shares(usage_delta_us: Mapping[str, float]) -> dict[str, float]:
    """Measured fractions of the containers' CPU time in one interval."""
    return usage_ratio(usage_delta_us)


def schedule(start: int, stop: int) -> list[int]:
    """vCPU counts for a stepwise scale-down (or up): ``schedule(4, 1) == [4, 3, 2, 1]``."""
    step = -1 if stop < start else 1
    return list(range(start, stop + step, step))


def qemu_cpu_weight(vm_weight: int | None, default: int = 100) -> int:
    """cgroup v2 ``cpu.weight`` for a VM's QEMU group from its registration's ``cpu.weight``."""
    w = default if vm_weight is None else int(vm_weight)
    return max(1, min(10_000, w))
