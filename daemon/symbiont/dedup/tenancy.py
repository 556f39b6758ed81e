"""Tenant boundaries: letting a VM opt out of cross-VM page sharing, with what the host can enforce.

Why: deduplication is a timing side channel (seeds/003). A write to a merged page takes a
copy-on-write fault and is measurably slower, so an attacker VM that plants a page and times a
write to it later learns whether some other VM holds the same content (which library version it
runs, or bits of a key).

What the host can enforce, and what it cannot:

* KSM only merges memory that its owner marked ``MADV_MERGEABLE`` (or that a process opted in as a
  whole with ``prctl(PR_SET_MEMORY_MERGE)``). QEMU marks guest RAM mergeable when the machine
  option ``mem-merge`` is on, its default; libvirt turns it off with
  ``<memoryBacking><nosharepages/></memoryBacking>``. This is the enforcement point: a VM defined
  that way has no mergeable RAM, so KSM can never merge its pages with anybody's.
* It is all-or-nothing per VM: KSM has no notion of "merge only within this VM". An opted-out VM
  also loses intra-VM merging (its own duplicate pages), and mem-merge cannot be changed on a
  running QEMU (the VM must be redefined and restarted).
* The host cannot undo ``MADV_MERGEABLE`` from outside: ``MADV_UNMERGEABLE`` only works on the
  calling process, and ``process_madvise(2)`` accepts only MADV_COLD/PAGEOUT/WILLNEED/COLLAPSE.
* So when a VM that opted out still has mergeable RAM (defined without ``<nosharepages/>``), the
  only host-side enforcement left is host-wide: keep ksmd stopped, and unmerge (``run=2``) if any
  of that VM's pages were merged already. The controller does exactly that and reports the VM
  as a violation until it is redefined.
* Guest-internal sharing (the guest's own KSM, page cache) is beyond the host's reach, and the
  side channel through other shared resources (caches, the page-cache of a shared disk image)
  is out of scope.

The check reads ``/proc/PID/smaps`` of the QEMU process: the guest-RAM mapping's ``mg`` VmFlag
says whether KSM may merge it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any


def has_nosharepages(domain_xml: str) -> bool:
    root = ET.fromstring(domain_xml)
    return root.find("./memoryBacking/nosharepages") is not None


def with_nosharepages(domain_xml: str) -> str:
    """The domain XML with ``<memoryBacking><nosharepages/></memoryBacking>`` (idempotent)."""
    root = ET.fromstring(domain_xml)
    mb = root.find("./memoryBacking")
    if mb is None:
        mb = ET.Element("memoryBacking")
        # libvirt accepts elements in any order, but keep it near <memory> for readability
        kids = list(root)
        pos = max((i + 1 for i, k in enumerate(kids) if k.tag in ("currentMemory", "memory")), default=len(kids))
        root.insert(pos, mb)
    if mb.find("nosharepages") is None:
        ET.SubElement(mb, "nosharepages")
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class TenantState:
    """What is known about one VM for the boundary check."""

    vm: str
    cross_vm: bool  # the VM allows cross-VM sharing
    running: bool
    mergeable: bool | None  # guest RAM has the mg flag (None: unknown, e.g. not readable)
    merging_pages: int = 0  # its pages currently merged by KSM


@dataclass(frozen=True)
class Verdict:
    vm: str
    status: str  # "shared" | "enforced" | "violated" | "unknown" | "stopped"
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "status": self.status, "reason": self.reason}


def check(states: list[TenantState]) -> tuple[list[Verdict], str, bool]:
    """Verdict per VM, the blocking reason for KSM (empty: none) and whether to unmerge now.

    A running VM that opted out but whose RAM is mergeable (or cannot be checked) blocks KSM;
    if any of its pages are merged already, everything must be unmerged.
    """
    verdicts: list[Verdict] = []
    blocking: list[str] = []
    unmerge = False
    for s in sorted(states, key=lambda s: s.vm):
        if s.cross_vm:
            verdicts.append(Verdict(s.vm, "shared", "cross-VM sharing allowed"))
            continue
        if not s.running:
            verdicts.append(Verdict(s.vm, "stopped", "not running"))
            continue
        if s.mergeable is False:
            verdicts.append(Verdict(s.vm, "enforced", "guest RAM is not mergeable (mem-merge off / nosharepages)"))
            continue
        why = ("guest RAM is mergeable: redefine the VM with <memoryBacking><nosharepages/>"
               if s.mergeable else "cannot tell whether guest RAM is mergeable")  # fmt: skip
        verdicts.append(Verdict(s.vm, "violated" if s.mergeable else "unknown", why))
        blocking.append(f"{s.vm} opted out of cross-VM sharing but {why}")
        if s.merging_pages > 0:
            unmerge = True
    return verdicts, "; ".join(blocking), unmerge


__all__ = ["TenantState", "Verdict", "check", "has_nosharepages", "with_nosharepages"]
