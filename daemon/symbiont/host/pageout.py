"""Paging another process's memory in and out: ``process_madvise`` on QEMU's guest RAM.

The hypervisor-paging lever (ESX's third primitive) without a hypervisor of our own: QEMU
keeps a guest's RAM in one private anonymous mapping of its process, so the host kernel can
swap it like any other anonymous memory. ``process_madvise(pidfd, iovec, MADV_PAGEOUT)``
(Linux 5.10+) reclaims exactly the ranges we name, now, into the swap tier (zram); with
``MADV_WILLNEED`` the swapped pages of a range are read back into the swap cache ahead of the
guest's faults. Reading ranges through ``/proc/PID/mem`` instead faults them in *and maps them*,
so the guest then runs without a single fault (:func:`touch`). Both need root (CAP_SYS_NICE /
ptrace rights over the QEMU process).

Which mapping is guest RAM (:func:`guest_ram`): the private, writable, *non-executable*
anonymous mapping whose size matches the domain's boot memory. Under TCG the process also has
``rwxp`` anonymous mappings of the translation-code cache (64 MiB each, as large as the RAM in
total), so "the largest anonymous mapping" would be wrong; those are found separately
(:func:`code_cache`) and reported apart from guest memory.

Residency comes from ``/proc/PID/pagemap`` (bit 63 present, bit 62 swapped), readable by root
for other processes; ``VmSwap`` and per-mapping ``Swap:`` from ``/proc/PID/status`` and
``smaps``. Nothing here decides anything.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from symbiont.host import procmem
from symbiont.host.procmem import Mapping, ProcMemError, field_kib, find_guest_ram

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
SYS_PIDFD_OPEN = 434  # the same number on every architecture (syscalls added after 4.20)
SYS_PROCESS_MADVISE = 440
MADV_WILLNEED = 3
MADV_COLD = 20
MADV_PAGEOUT = 21
IOV_MAX = 1024  # iovecs per process_madvise call (UIO_MAXIOV)
MAX_IOV_BYTES = 1 << 30  # one iovec stays well under MAX_RW_COUNT (INT_MAX & PAGE_MASK)
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62

_libc = ctypes.CDLL(None, use_errno=True)


class PageoutError(Exception):
    """A process, mapping or syscall is not what was expected; the message says why."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# -- smaps ------------------------------------------------------------------------------------
def read_smaps(pid: int, proc: str | Path = "/proc") -> list[Mapping]:
    """:func:`symbiont.host.procmem.read_smaps` (the one smaps parser), failing as paging does."""
    try:
        return procmem.read_smaps(pid, proc)
    except ProcMemError as exc:
        raise PageoutError(str(exc)) from None


def guest_ram(regions: Sequence[Mapping], ram_bytes: int) -> Mapping:
    """QEMU's guest-RAM mapping (:func:`symbiont.host.procmem.find_guest_ram`); raises when none."""
    ram = find_guest_ram(regions, ram_bytes)
    if ram is None:
        raise PageoutError(f"no anonymous rw-p mapping of {ram_bytes // MIB} MiB (the guest's RAM) in the process")
    return ram


def code_cache(regions: Sequence[Mapping]) -> list[Mapping]:
    """TCG's translation-code cache: the anonymous ``rwxp`` mappings (none under KVM)."""
    return [r for r in regions if r.anonymous and r.perms == "rwxp"]


# -- /proc/PID/status ---------------------------------------------------------------------------
def status_kib(pid: int, keys: Iterable[str] = ("VmRSS", "VmSwap"), proc: str | Path = "/proc") -> dict[str, int]:
    """``VmRSS``/``VmSwap``/... of a process in KiB (missing keys are absent)."""
    want = set(keys)
    out: dict[str, int] = {}
    try:
        text = (Path(proc) / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise PageoutError(f"process {pid} does not exist") from None
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in want:
            out[k] = field_kib(":" + v) if v.split() else 0
    return out


# -- pagemap ------------------------------------------------------------------------------------
def pagemap(pid: int, start: int, length: int, proc: str | Path = "/proc") -> np.ndarray:
    """The pagemap entries (uint64) of ``[start, start+length)`` in process ``pid``."""
    n = length // PAGE_SIZE
    try:
        fd = os.open(Path(proc) / str(pid) / "pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise PageoutError(f"process {pid} does not exist") from None
    try:
        buf = os.pread(fd, n * 8, (start // PAGE_SIZE) * 8)
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=np.uint64)


def residency(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(present, swapped) boolean arrays from pagemap entries."""
    return (entries & np.uint64(PM_PRESENT)) != 0, (entries & np.uint64(PM_SWAPPED)) != 0


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[(first_page, npages), ...]`` of the True runs of a boolean array (pure)."""
    if mask.size == 0:
        return []
    m = np.concatenate(([False], mask.astype(bool), [False]))
    d = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b - a)) for a, b in zip(d[0::2], d[1::2], strict=True)]


# -- the syscalls -------------------------------------------------------------------------------
def pidfd_open(pid: int) -> int:
    fd = _libc.syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise PageoutError(f"pidfd_open({pid}): {os.strerror(e)}")
    return int(fd)


def _split(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for start, length in ranges:
        while length > 0:
            n = min(length, MAX_IOV_BYTES)
            out.append((start, n))
            start += n
            length -= n
    return out


def process_madvise(pid: int, ranges: Iterable[tuple[int, int]], advice: int, pidfd: int | None = None) -> int:
    """Advise ``[(address, length), ...]`` of process ``pid``; returns the bytes advised.

    Calls go in batches of at most IOV_MAX iovecs. A range the kernel skips (e.g. one that
    was unmapped meanwhile: ENOMEM) ends that batch; the rest is still tried.
    """
    own = pidfd is None
    fd = pidfd_open(pid) if own else pidfd
    done = 0
    try:
        iovs = _split(ranges)
        for i in range(0, len(iovs), IOV_MAX):
            batch = iovs[i:i + IOV_MAX]
            arr = (_Iovec * len(batch))(*[_Iovec(a, n) for a, n in batch])
            r = _libc.syscall(SYS_PROCESS_MADVISE, ctypes.c_int(fd), arr, ctypes.c_size_t(len(batch)),
                              ctypes.c_int(advice), ctypes.c_uint(0))
            if r < 0:
                e = ctypes.get_errno()
                if e in (errno.ENOMEM, errno.EFAULT) and len(batch) > 1:
                    # One bad range: advise the batch range by range so the others still happen.
                    for a, n in batch:
                        one = (_Iovec * 1)(_Iovec(a, n))
                        r1 = _libc.syscall(SYS_PROCESS_MADVISE, ctypes.c_int(fd), one, ctypes.c_size_t(1),
                                           ctypes.c_int(advice), ctypes.c_uint(0))
                        done += max(0, r1)
                    continue
                raise PageoutError(f"process_madvise({pid}, advice {advice}): {os.strerror(e)}"
                                   + (" (needs root / CAP_SYS_NICE)" if e == errno.EPERM else ""))
            done += r
    finally:
        if own:
            os.close(fd)
    return done


def pageout(pid: int, ranges: Iterable[tuple[int, int]]) -> int:
    """Reclaim the ranges into swap now (MADV_PAGEOUT); returns the bytes advised."""
    return process_madvise(pid, ranges, MADV_PAGEOUT)


def willneed(pid: int, ranges: Iterable[tuple[int, int]]) -> int:
    """Read the ranges' swapped pages into the swap cache ahead of the faults (MADV_WILLNEED)."""
    return process_madvise(pid, ranges, MADV_WILLNEED)


def touch(pid: int, ranges: Iterable[tuple[int, int]], chunk: int = 4 * MIB) -> int:
    """Fault the ranges in *and map them* by reading them through ``/proc/PID/mem``.

    The kernel resolves each page in the target's page tables (get_user_pages), so the
    process later finds them resident without a fault. Returns the bytes read.
    """
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    buf = bytearray(chunk)
    view = memoryview(buf)
    done = 0
    try:
        for start, length in ranges:
            off, end = start, start + length
            while off < end:
                n = min(chunk, end - off)
                try:
                    got = os.preadv(fd, [view[:n]], off)
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EFAULT):
                        break  # unmapped meanwhile: skip the rest of this range
                    raise
                if got <= 0:
                    break
                done += got
                off += got
    finally:
        os.close(fd)
    return done


def coalesce(ranges: Iterable[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Join sorted ``(address, length)`` ranges separated by at most ``gap`` bytes (pure):
    fewer syscalls for a few extra pages."""
    out: list[tuple[int, int]] = []
    for a, n in sorted(ranges):
        if out and a - (out[-1][0] + out[-1][1]) <= gap:
            pa, pn = out[-1]
            out[-1] = (pa, max(pa + pn, a + n) - pa)
        else:
            out.append((a, n))
    return out
