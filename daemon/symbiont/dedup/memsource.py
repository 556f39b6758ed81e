"""Guest memory as a page source: the QEMU process's guest-RAM mapping through ``/proc/PID``
(smaps, pagemap and ``/proc/PID/mem`` are read by :mod:`symbiont.host.procmem`; this module
turns them into the page source the hashing engine scans).

QEMU allocates a VM's RAM as one private anonymous mapping of exactly the guest's memory size
(``pc.ram``); with mem-merge on (the default) it also ``madvise(MADV_MERGEABLE)``\\ s it, which
``/proc/PID/smaps`` shows as the ``mg`` VmFlag. Under TCG the process also has many
executable anonymous mappings (the translation-block cache) that can be as large as the RAM, so
"the largest anonymous mapping" is not a safe rule: :func:`find_guest_ram` picks the private,
writable, non-executable anonymous mapping whose size matches the guest's memory.

Reading (root, or ptrace rights over the process):

* ``/proc/PID/pagemap`` tells which pages are resident (bit 63) and, for root, their host frame
  numbers (bits 0-54). Only resident pages are read: a page the guest never touched costs no host
  memory, so counting it as "shareable" would overstate the potential; reading it would also
  fault in the zero page. Swapped-out pages (bit 62) are skipped for the same reason, and so are
  pages mapped to the kernel's shared zero page or huge zero page (:func:`zero_pfns`): guest
  memory that was only read, which also uses no memory and which KSM does not touch.
* ``/proc/PID/mem`` is read (by :class:`symbiont.host.procmem.ProcessMemory`) in runs of adjacent
  pages into one reusable buffer. A page that cannot be read (``EIO``) is returned as zeros and
  counted in ``read_errors``.

Equal frame numbers mean pages already merged (by KSM), which lets the engine report what is
still left to merge (``remaining``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from symbiont.dedup.backends import PAGE_SIZE
from symbiont.dedup.engine import EngineError, PageSource
from symbiont.host import procmem
from symbiont.host.procmem import (
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SWAPPED,
    Mapping,
    ProcessGone,
    ProcessMemory,
    ProcMemError,
    find_guest_ram,
    parse_smaps,
    zero_pfns,
)


def read_smaps(pid: int, proc: Path | str = "/proc") -> list[Mapping]:
    """:func:`symbiont.host.procmem.read_smaps`, failing as the engine does."""
    try:
        return procmem.read_smaps(pid, proc)
    except ProcMemError as exc:
        raise EngineError(str(exc)) from None


def read_pagemap(pid: int, start: int, end: int, proc: Path | str = "/proc") -> np.ndarray:
    """:func:`symbiont.host.procmem.read_pagemap`, failing as the engine does."""
    try:
        return procmem.read_pagemap(pid, start, end, proc)
    except ProcMemError as exc:
        raise EngineError(str(exc)) from None


def mergeable_mappings(pid: int, min_bytes: int = 0, proc: Path | str = "/proc") -> list[Mapping]:
    """Mappings of a process that KSM may merge (``mg``), e.g. a workload's MADV_MERGEABLE buffer."""
    return [m for m in read_smaps(pid, proc) if m.mergeable and m.size >= min_bytes]


host_mergeable_pages = procmem.host_mergeable_pages

__all__ = ["PM_PFN_MASK", "PM_PRESENT", "PM_SWAPPED", "Mapping", "ProcessMemorySource", "find_guest_ram",
           "host_mergeable_pages", "mergeable_mappings", "parse_smaps", "read_pagemap", "read_smaps", "zero_pfns"]


class ProcessMemorySource(PageSource):
    """Pages of one or more address ranges of a live process, read through ``/proc/PID/mem``."""

    def __init__(
        self,
        name: str,
        pid: int,
        ranges: Sequence[tuple[int, int]],
        resident_only: bool = True,
        proc: Path | str = "/proc",
    ) -> None:
        self.name = name
        self.pid = pid
        self.proc = Path(proc)
        for a, b in ranges:
            if a % PAGE_SIZE or b % PAGE_SIZE or b <= a:
                raise EngineError(f"bad range 0x{a:x}-0x{b:x}")
        self.ranges = list(ranges)
        self.resident_only = resident_only
        self.read_errors = 0
        self.refresh()
        self._buf: np.ndarray | None = None
        self._mem: ProcessMemory | None = None
        try:
            self._mem = ProcessMemory(pid, self.proc)
        except ProcMemError as exc:
            raise EngineError(str(exc)) from None

    def refresh(self) -> None:
        """Which pages are resident now, and their frames (``/proc/PID/pagemap``)."""
        addrs, pfns = [], []
        self.range_pages = 0
        self.swapped_pages = 0
        self.zero_mapped_pages = 0
        zp = zero_pfns() if self.resident_only else np.empty(0, np.uint64)
        for a, b in self.ranges:
            pm = read_pagemap(self.pid, a, b, self.proc)
            self.range_pages += pm.shape[0]
            present = (pm & PM_PRESENT) != 0
            self.swapped_pages += int(((pm & PM_SWAPPED) != 0).sum())
            if zp.shape[0]:
                on_zero = present & np.isin(pm & PM_PFN_MASK, zp)
                self.zero_mapped_pages += int(on_zero.sum())
                present &= ~on_zero  # mapped to the shared zero page: no memory used, nothing to merge
            sel = np.flatnonzero(present) if self.resident_only else np.arange(pm.shape[0])
            addrs.append(np.uint64(a) + sel.astype(np.uint64) * np.uint64(PAGE_SIZE))
            pfns.append(np.where(present[sel], pm[sel] & PM_PFN_MASK, np.uint64(0)))
        self._addr = np.concatenate(addrs) if addrs else np.empty(0, np.uint64)
        self._pfns = np.concatenate(pfns) if pfns else np.empty(0, np.uint64)

    @classmethod
    def guest_ram(cls, name: str, pid: int, ram_bytes: int | None, **kw: object) -> ProcessMemorySource:
        """The guest RAM of a QEMU process (``ram_bytes``: the VM's boot memory)."""
        m = find_guest_ram(read_smaps(pid), ram_bytes)
        if m is None:
            raise EngineError(f"{name}: no guest-RAM mapping of {ram_bytes} bytes in QEMU process {pid}")
        src = cls(name, pid, [(m.start, m.end)], **kw)  # type: ignore[arg-type]
        src.mapping = m
        return src

    mapping: Mapping | None = None
    _mem: ProcessMemory | None = None

    @property
    def npages(self) -> int:
        return int(self._addr.shape[0])

    @property
    def has_pfns(self) -> bool:
        return bool((self._pfns != 0).any())

    def addresses(self) -> np.ndarray:
        return self._addr

    def pfns(self) -> np.ndarray | None:
        return self._pfns if self.has_pfns else None

    def close(self) -> None:
        if self._mem is not None:
            self._mem.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _read_addrs(self, addr: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out`` (k, 4096) with the pages at ascending addresses ``addr``, run by run."""
        k = addr.shape[0]
        if k == 0:
            return
        brk = np.flatnonzero(np.diff(addr) != PAGE_SIZE) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [k]))
        flat = out.reshape(-1)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            self._pread_run(int(addr[s]), flat[s * PAGE_SIZE : e * PAGE_SIZE])

    def _pread_run(self, offset: int, dst: np.ndarray) -> None:
        assert self._mem is not None
        try:
            self.read_errors += self._mem.pread_run(offset, memoryview(dst))
        except ProcessGone:
            raise EngineError(f"{self.name}: process {self.pid} exited") from None
        except ProcMemError as exc:
            raise EngineError(f"{self.name}: {exc}") from None

    def batches(self, batch_pages: int) -> Iterator[np.ndarray]:
        if self._buf is None or self._buf.shape[0] < min(batch_pages, self.npages):
            self._buf = np.empty((max(1, min(batch_pages, self.npages)), PAGE_SIZE), dtype=np.uint8)
        for i in range(0, self.npages, batch_pages):
            a = self._addr[i : i + batch_pages]
            out = self._buf[: a.shape[0]]
            self._read_addrs(a, out)
            yield out

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        o = np.argsort(indices, kind="stable")
        out_sorted = np.empty((indices.shape[0], PAGE_SIZE), dtype=np.uint8)
        self._read_addrs(self._addr[indices[o]], out_sorted)
        out = np.empty_like(out_sorted)
        out[o] = out_sorted
        return out


__all__ = [
    "Mapping",
    "ProcessMemorySource",
    "find_guest_ram",
    "host_mergeable_pages",
    "mergeable_mappings",
    "parse_smaps",
    "read_pagemap",
    "read_smaps",
    "zero_pfns",
]
