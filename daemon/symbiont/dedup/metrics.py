"""Prometheus metrics of the dedup part (default registry, defined once at import; idempotent)."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Gauge, Histogram


def _get_or_create(cls: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
    names = getattr(REGISTRY, "_names_to_collectors", {})
    for key in (name, f"{name}_total", f"{name}_bucket"):
        if key in names:
            return names[key]
    return cls(name, doc, labels, **kw)


VM = ("vm",)

VM_SHARED = _get_or_create(
    Gauge, "symbiont_dedup_vm_shared_bytes", "Guest RAM of the VM mapped to KSM-merged frames (ksm_merging_pages)", VM
)
VM_UNSHARED = _get_or_create(
    Gauge, "symbiont_dedup_vm_unshared_bytes", "Resident guest RAM of the VM not merged by KSM", VM
)
VM_UNSHARED_FRACTION = _get_or_create(
    Gauge, "symbiont_dedup_vm_unshared_fraction", "Unshared share of the VM's resident guest RAM (0..1)", VM
)
VM_POTENTIAL = _get_or_create(
    Gauge, "symbiont_dedup_vm_potential_bytes", "The VM's share of the memory merging could save (last scan)", VM
)
VM_MERGEABLE = _get_or_create(
    Gauge, "symbiont_dedup_vm_mergeable", "1 when the VM's guest RAM is KSM-mergeable (QEMU mem-merge)", VM
)
VM_TENANT_VIOLATION = _get_or_create(
    Gauge, "symbiont_dedup_vm_tenant_violation",
    "1 when the VM opted out of cross-VM sharing but the host cannot enforce it", VM,
)  # fmt: skip
KSM_PAGES = _get_or_create(Gauge, "symbiont_dedup_ksm_pages", "KSM counters (/sys/kernel/mm/ksm)", ("counter",))
KSM_SAVED = _get_or_create(Gauge, "symbiont_dedup_ksm_saved_bytes", "Memory saved by KSM (pages_sharing)")
KSM_SETTING = _get_or_create(Gauge, "symbiont_dedup_ksm_setting", "Current KSM tunables", ("knob",))
KSMD_CPU = _get_or_create(Gauge, "symbiont_dedup_ksmd_cpu_seconds", "CPU seconds ksmd has used (utime+stime)")
POLICY = _get_or_create(Gauge, "symbiont_dedup_policy", "1 for the active KSM policy", ("policy",))
SCAN_SECONDS = _get_or_create(
    Histogram, "symbiont_dedup_scan_seconds", "Wall time of a hashing-engine scan",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
SCAN_SAVEABLE = _get_or_create(
    Gauge, "symbiont_dedup_scan_saveable_bytes", "Memory merging could save (last scan), by scope", ("scope",)
)

PER_VM = (VM_SHARED, VM_UNSHARED, VM_UNSHARED_FRACTION, VM_POTENTIAL, VM_MERGEABLE, VM_TENANT_VIOLATION)


def forget_vm(vm: str) -> None:
    for g in PER_VM:
        try:
            g.remove(vm)
        except KeyError:
            pass
