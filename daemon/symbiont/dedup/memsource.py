"""Guest memory as a page source: the QEMU process's guest-RAM mapping through ``/proc/PID``.

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
* ``/proc/PID/mem`` is read with ``preadv`` in runs of adjacent pages into one reusable buffer.
  A page that cannot be read (``EIO``) is returned as zeros and counted in ``read_errors``.

Equal frame numbers mean pages already merged (by KSM), which lets the engine report what is
still left to merge (``remaining``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from symbiont.dedup.backends import PAGE_SIZE
from symbiont.dedup.engine import EngineError, PageSource

PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_PFN_MASK = np.uint64((1 << 55) - 1)
_PAGEMAP_CHUNK = 1 << 20  # entries per pagemap read (8 MiB)


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/smaps`` with the fields the engine needs."""

    start: int
    end: int
    perms: str
    offset: int
    path: str
    flags: frozenset[str]
    rss_kib: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        return self.path == "" or self.path.startswith("[anon")

    @property
    def mergeable(self) -> bool:
        """``mg``: KSM may merge this mapping (QEMU's mem-merge, or MADV_MERGEABLE)."""
        return "mg" in self.flags

    def as_dict(self) -> dict[str, object]:
        return {"start": f"0x{self.start:x}", "end": f"0x{self.end:x}", "size": self.size, "perms": self.perms,
                "path": self.path, "flags": sorted(self.flags), "rss_kib": self.rss_kib,
                "mergeable": self.mergeable}  # fmt: skip


def parse_smaps(text: str) -> list[Mapping]:
    """Parse ``/proc/PID/smaps`` text (pure; tested on fixtures)."""
    out: list[Mapping] = []
    cur: dict[str, object] | None = None

    def flush() -> None:
        if cur is not None:
            out.append(Mapping(**cur))  # type: ignore[arg-type]

    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            try:
                a, b = (int(x, 16) for x in head[0].split("-", 1))
            except ValueError:
                a = b = -1
            if a >= 0:
                flush()
                cur = {"start": a, "end": b, "perms": head[1], "offset": int(head[2], 16),
                       "path": head[5].strip() if len(head) > 5 else "", "flags": frozenset(), "rss_kib": 0}  # fmt: skip
                continue
        if cur is None:
            continue
        if line.startswith("VmFlags:"):
            cur["flags"] = frozenset(line.split(":", 1)[1].split())
        elif line.startswith("Rss:"):
            try:
                cur["rss_kib"] = int(line.split()[1])
            except (IndexError, ValueError):
                pass
    flush()
    return out


def read_smaps(pid: int, proc: Path | str = "/proc") -> list[Mapping]:
    try:
        return parse_smaps((Path(proc) / str(pid) / "smaps").read_text())
    except FileNotFoundError:
        raise EngineError(f"process {pid} does not exist") from None
    except PermissionError:
        raise EngineError(f"no permission to read /proc/{pid}/smaps (needs root)") from None
    except ProcessLookupError:
        raise EngineError(f"process {pid} exited") from None


def find_guest_ram(maps: Sequence[Mapping], ram_bytes: int | None = None) -> Mapping | None:
    """The mapping that holds a QEMU guest's RAM (see the module docstring), or ``None``.

    With ``ram_bytes`` (the VM's boot memory) the smallest private, writable, non-executable
    anonymous mapping at least that large and at most 1/8 + 64 MiB larger wins; without it, the
    largest such mapping.
    """
    cands = [m for m in maps if m.anonymous and m.perms.startswith("rw") and "x" not in m.perms
             and m.perms.endswith("p")]  # fmt: skip
    if ram_bytes:
        slack = ram_bytes // 8 + (64 << 20)
        fit = [m for m in cands if ram_bytes <= m.size <= ram_bytes + slack]
        if not fit:
            return None
        return min(fit, key=lambda m: (m.size - ram_bytes, -m.rss_kib, m.start))
    return max(cands, key=lambda m: (m.size, m.rss_kib), default=None)


def mergeable_mappings(pid: int, min_bytes: int = 0, proc: Path | str = "/proc") -> list[Mapping]:
    """Mappings of a process that KSM may merge (``mg``), e.g. a workload's MADV_MERGEABLE buffer."""
    return [m for m in read_smaps(pid, proc) if m.mergeable and m.size >= min_bytes]


def host_mergeable_pages(proc: Path | str = "/proc") -> int:
    """Resident pages in mergeable mappings of every process: what ksmd walks in one full pass."""
    from symbiont.host.ksm import mergeable_processes

    total = 0
    for pid, st in mergeable_processes(proc).items():
        if st.get("ksm_mergeable") is False and not st.get("ksm_rmap_items"):
            continue
        try:
            total += sum(m.rss_kib for m in read_smaps(pid, proc) if m.mergeable) * 1024 // PAGE_SIZE
        except EngineError:
            continue
    return total


def read_pagemap(pid: int, start: int, end: int, proc: Path | str = "/proc") -> np.ndarray:
    """Raw 64-bit pagemap entries of the pages in ``[start, end)``."""
    n = (end - start) // PAGE_SIZE
    out = np.empty(n, dtype=np.uint64)
    try:
        fd = os.open(Path(proc) / str(pid) / "pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise EngineError(f"process {pid} does not exist") from None
    except PermissionError:
        raise EngineError(f"no permission to read /proc/{pid}/pagemap (needs root)") from None
    try:
        for i in range(0, n, _PAGEMAP_CHUNK):
            k = min(_PAGEMAP_CHUNK, n - i)
            buf = os.pread(fd, 8 * k, (start // PAGE_SIZE + i) * 8)
            if len(buf) != 8 * k:
                raise EngineError(f"short pagemap read for process {pid}")
            out[i : i + k] = np.frombuffer(buf, dtype=np.uint64)
    finally:
        os.close(fd)
    return out


_ZERO_PFNS: np.ndarray | None = None


def zero_pfns() -> np.ndarray:
    """Frame numbers of the kernel's shared zero page and huge zero page (root; else empty).

    A guest page that was only ever *read* is mapped to one of these: it is resident in the page
    tables but uses no memory, and KSM leaves it alone. Found once by faulting both into private
    mappings of this process and reading its own pagemap.
    """
    global _ZERO_PFNS
    if _ZERO_PFNS is not None:
        return _ZERO_PFNS
    import ctypes
    import mmap

    found: set[int] = set()
    small = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    big = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _ = small[0]
        a = ctypes.addressof(ctypes.c_char.from_buffer(small))
        found.update(int(x) for x in read_pagemap(os.getpid(), a, a + PAGE_SIZE) & PM_PFN_MASK)
        b = ctypes.addressof(ctypes.c_char.from_buffer(big))
        off = (-b) % (2 << 20)
        with contextlib.suppress(OSError, AttributeError):
            big.madvise(mmap.MADV_HUGEPAGE, off, 2 << 20)
        _ = big[off]
        found.update(int(x) for x in read_pagemap(os.getpid(), b + off, b + off + (2 << 20)) & PM_PFN_MASK)
        del a, b
    except (EngineError, OSError, TypeError):
        pass
    finally:
        with contextlib.suppress(BufferError):
            small.close()
        with contextlib.suppress(BufferError):
            big.close()
    found.discard(0)
    _ZERO_PFNS = np.array(sorted(found), dtype=np.uint64)
    return _ZERO_PFNS


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
        try:
            self._fd = os.open(self.proc / str(pid) / "mem", os.O_RDONLY)
        except FileNotFoundError:
            raise EngineError(f"process {pid} does not exist") from None
        except PermissionError:
            raise EngineError(f"no permission to read /proc/{pid}/mem (needs root)") from None

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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
        mv = memoryview(dst)
        done = 0
        while done < len(mv):
            try:
                n = os.preadv(self._fd, [mv[done:]], offset + done)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise EngineError(f"{self.name}: process {self.pid} exited") from None
                if exc.errno != errno.EIO:
                    raise EngineError(f"{self.name}: reading /proc/{self.pid}/mem: {exc.strerror}") from None
                n = 0
            if n == 0:
                # an unreadable page: zeros, counted, then go on with the next page
                end = min(len(mv), (done // PAGE_SIZE + 1) * PAGE_SIZE)
                mv[done:end] = b"\0" * (end - done)
                self.read_errors += 1
                done = end
                continue
            done += n

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
