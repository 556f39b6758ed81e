"""Other processes' memory through ``/proc/PID``: ``smaps`` (mappings, VmFlags, Rss) and
``pagemap`` (which pages are resident, their frames), and the guest-RAM mapping of a QEMU
process (see :func:`find_guest_ram`), and the contents of its pages through ``/proc/PID/mem``
(:class:`ProcessMemory`). Part of the host port's door: the dedup part reads a
VM's mergeability and resident guest RAM through :class:`symbiont.host.port.HostPort`, and its
hashing engine's page source (:mod:`symbiont.dedup.memsource`) builds on these readers.

QEMU allocates a VM's RAM as one private anonymous mapping of exactly the guest's memory size
(``pc.ram``); with mem-merge on (the default) it also ``madvise(MADV_MERGEABLE)``\\ s it, which
``smaps`` shows as the ``mg`` VmFlag. Under TCG the process also has many executable anonymous
mappings (the translation-block cache) that can be as large as the RAM, so "the largest
anonymous mapping" is not a safe rule: :func:`find_guest_ram` picks the private, writable,
non-executable anonymous mapping whose size matches the guest's memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from symbiont.host.ksm import PAGE_SIZE, mergeable_processes
from symbiont.host.port import HostError


class ProcMemError(HostError):
    """A process's smaps or pagemap could not be read (gone, or no permission)."""


class ProcessGone(ProcMemError):
    """The process exited while its memory was being read."""


PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_PFN_MASK = np.uint64((1 << 55) - 1)
_PAGEMAP_CHUNK = 1 << 20  # entries per pagemap read (8 MiB)


@dataclass(frozen=True)
class Mapping:
    """One mapping of ``/proc/PID/smaps``: the one parse both the dedup engine (``mg`` flag,
    ``Rss``) and host paging (:mod:`symbiont.host.pageout`: ``Rss``, ``Swap``) read."""

    start: int
    end: int
    perms: str
    path: str
    offset: int = 0
    flags: frozenset[str] = frozenset()
    rss_kib: int = 0
    swap_kib: int = 0

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
                "swap_kib": self.swap_kib, "mergeable": self.mergeable}  # fmt: skip


def field_kib(line: str) -> int:
    """The number of a ``Key:   123 kB`` line; 0 when it has none."""
    try:
        return int(line.split()[1])
    except (IndexError, ValueError):
        return 0


def parse_smaps(text: str) -> list[Mapping]:
    """Parse ``/proc/PID/smaps`` text (pure; tested on fixtures). A field missing from a
    mapping's block (or not a number) reads as 0 / no flags."""
    out: list[Mapping] = []
    cur: dict[str, object] | None = None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            try:
                a, b = (int(x, 16) for x in head[0].split("-", 1))
                offset = int(head[2], 16)
            except ValueError:
                pass
            else:
                if cur is not None:
                    out.append(Mapping(**cur))  # type: ignore[arg-type]
                cur = {"start": a, "end": b, "perms": head[1], "offset": offset,
                       "path": head[5].strip() if len(head) > 5 else ""}
                continue
        if cur is None:
            continue
        if line.startswith("VmFlags:"):
            cur["flags"] = frozenset(line.split(":", 1)[1].split())
        elif line.startswith("Rss:"):
            cur["rss_kib"] = field_kib(line)
        elif line.startswith("Swap:"):
            cur["swap_kib"] = field_kib(line)
    if cur is not None:
        out.append(Mapping(**cur))  # type: ignore[arg-type]
    return out


def read_smaps(pid: int, proc: Path | str = "/proc") -> list[Mapping]:
    """:func:`parse_smaps` of a live process; ProcMemError when it is gone or unreadable."""
    try:
        return parse_smaps((Path(proc) / str(pid) / "smaps").read_text())
    except FileNotFoundError:
        raise ProcMemError(f"process {pid} does not exist") from None
    except PermissionError:
        raise ProcMemError(f"no permission to read /proc/{pid}/smaps (needs root)") from None
    except ProcessLookupError:
        raise ProcMemError(f"process {pid} exited") from None


def find_guest_ram(maps: Sequence[Mapping], ram_bytes: int | None = None) -> Mapping | None:
    """The mapping that holds a QEMU guest's RAM (see the module docstring), or ``None``.

    With ``ram_bytes`` (the VM's boot memory) the smallest private, writable, non-executable
    anonymous mapping at least that large and at most 1/8 + 64 MiB larger wins (QEMU may round
    the block up: alignment, a guard page); of equal ones (e.g. a second RAM-sized buffer), the
    one holding more (resident + swapped) is RAM. Without it, the largest such mapping.
    """
    cands = [m for m in maps if m.anonymous and m.perms == "rw-p"]
    if ram_bytes:
        slack = ram_bytes // 8 + (64 << 20)
        fit = [m for m in cands if ram_bytes <= m.size <= ram_bytes + slack]
        if not fit:
            return None
        return min(fit, key=lambda m: (m.size - ram_bytes, -(m.rss_kib + m.swap_kib), m.start))
    return max(cands, key=lambda m: (m.size, m.rss_kib), default=None)


def mergeable_mappings(pid: int, min_bytes: int = 0, proc: Path | str = "/proc") -> list[Mapping]:
    """Mappings of a process that KSM may merge (``mg``), e.g. a workload's MADV_MERGEABLE buffer."""
    return [m for m in read_smaps(pid, proc) if m.mergeable and m.size >= min_bytes]


def _statm_resident(pid: int, proc: Path | str) -> int | None:
    try:
        return int((Path(proc) / str(pid) / "statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None


MERGEABLE_CACHE_S = 60.0  # a process's figure is reused at most this long


def host_mergeable_pages(proc: Path | str = "/proc",
                         cache: dict[int, tuple[int, int, float]] | None = None,
                         now: float | None = None) -> int:
    """Resident pages in mergeable mappings of every process: what ksmd walks in one full pass.

    With ``cache`` (pid → (statm resident, mergeable pages, when)), a process whose resident
    page count has not moved since it was read (a paused, parked VM) keeps its figure for up
    to MERGEABLE_CACHE_S instead of a smaps pass (~7 ms per QEMU, for every process every
    period); any change in its resident pages reads smaps again."""
    import time

    now = time.monotonic() if now is None else now
    total = 0
    seen: set[int] = set()
    for pid, st in mergeable_processes(proc).items():
        if st.get("ksm_mergeable") is False and not st.get("ksm_rmap_items"):
            continue
        seen.add(pid)
        rss = _statm_resident(pid, proc) if cache is not None else None
        hit = cache.get(pid) if cache is not None else None
        if hit is not None and rss is not None and hit[0] == rss and now - hit[2] < MERGEABLE_CACHE_S:
            total += hit[1]
            continue
        try:
            pages = sum(m.rss_kib for m in read_smaps(pid, proc) if m.mergeable) * 1024 // PAGE_SIZE
        except ProcMemError:
            continue
        total += pages
        if cache is not None and rss is not None:
            cache[pid] = (rss, pages, now)
    if cache is not None:
        for pid in [p for p in cache if p not in seen]:
            del cache[pid]
    return total


def read_pagemap(pid: int, start: int, end: int, proc: Path | str = "/proc") -> np.ndarray:
    """Raw 64-bit pagemap entries of the pages in ``[start, end)``."""
    n = (end - start) // PAGE_SIZE
    out = np.empty(n, dtype=np.uint64)
    try:
        fd = os.open(Path(proc) / str(pid) / "pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise ProcMemError(f"process {pid} does not exist") from None
    except PermissionError:
        raise ProcMemError(f"no permission to read /proc/{pid}/pagemap (needs root)") from None
    except ProcessLookupError:
        raise ProcessGone(f"process {pid} exited") from None
    try:
        for i in range(0, n, _PAGEMAP_CHUNK):
            k = min(_PAGEMAP_CHUNK, n - i)
            buf = os.pread(fd, 8 * k, (start // PAGE_SIZE + i) * 8)
            if len(buf) != 8 * k:
                raise ProcMemError(f"short pagemap read for process {pid}")
            out[i : i + k] = np.frombuffer(buf, dtype=np.uint64)
    except ProcessLookupError:
        # ESRCH from pread: the process exited after the open (a VM removed while its period ran;
        # seen as 'part dedup: period failed' for every VM in the density run's teardown)
        raise ProcessGone(f"process {pid} exited while its pagemap was read") from None
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
    except (ProcMemError, OSError, TypeError):
        pass
    finally:
        with contextlib.suppress(BufferError):
            small.close()
        with contextlib.suppress(BufferError):
            big.close()
    found.discard(0)
    _ZERO_PFNS = np.array(sorted(found), dtype=np.uint64)
    return _ZERO_PFNS


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_set)`` for a small sorted set, by binary search: no sort of
    ``values`` (np.isin sorts both: ~10 ms for a 512 MiB guest's 131072 pagemap entries against
    the 513 zero-page frames, for every VM every period)."""
    if not sorted_set.shape[0] or not values.shape[0]:
        return np.zeros(values.shape, dtype=bool)
    idx = np.searchsorted(sorted_set, values)
    np.minimum(idx, sorted_set.shape[0] - 1, out=idx)
    return sorted_set[idx] == values


def resident_bytes(pid: int, start: int, end: int) -> int:
    """Bytes of ``[start, end)`` resident and really backed (not the shared zero page)."""
    pm = read_pagemap(pid, start, end)
    on = (pm & PM_PRESENT) != 0
    zp = zero_pfns()
    if zp.shape[0]:
        present = pm[on] & PM_PFN_MASK  # only present entries hold a frame (a parked VM: few)
        return int(present.shape[0] - int(in_sorted(present, zp).sum())) * PAGE_SIZE
    return int(on.sum()) * PAGE_SIZE


class ProcessMemory:
    """Read access to another process's pages through ``/proc/PID/mem`` (root, or ptrace rights).

    ``pread_run`` reads a run of adjacent pages with ``preadv``; a page that cannot be read
    (``EIO``: e.g. a guard page, or memory unmapped meanwhile) comes back as zeros and is counted,
    so one bad page does not end a scan."""

    def __init__(self, pid: int, proc: Path | str = "/proc") -> None:
        self.pid = pid
        try:
            self._fd = os.open(Path(proc) / str(pid) / "mem", os.O_RDONLY)
        except FileNotFoundError:
            raise ProcMemError(f"process {pid} does not exist") from None
        except PermissionError:
            raise ProcMemError(f"no permission to read /proc/{pid}/mem (needs root)") from None

    def pread_run(self, offset: int, dst: memoryview) -> int:
        """Fill ``dst`` with the bytes at virtual address ``offset``; returns how many pages
        could not be read (zeros in ``dst``)."""
        errors = 0
        done = 0
        while done < len(dst):
            try:
                n = os.preadv(self._fd, [dst[done:]], offset + done)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise ProcessGone(f"process {self.pid} exited") from None
                if exc.errno != errno.EIO:
                    raise ProcMemError(f"reading /proc/{self.pid}/mem: {exc.strerror}") from None
                n = 0
            if n == 0:  # an unreadable page: zeros, counted, then go on with the next page
                end = min(len(dst), (done // PAGE_SIZE + 1) * PAGE_SIZE)
                dst[done:end] = b"\0" * (end - done)
                errors += 1
                done = end
                continue
            done += n
        return errors

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def smaps_rollup_kib(text: str) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` as {field: KiB} (Rss, Pss, Swap, SwapPss...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
            out[parts[0][:-1]] = int(parts[1])
    return out


def read_smaps_rollup(pid: int) -> dict[str, int]:
    """:func:`smaps_rollup_kib` of a live process; {} when it is gone or unreadable."""
    try:
        return smaps_rollup_kib(open(f"/proc/{pid}/smaps_rollup").read())
    except (OSError, ValueError):
        return {}
