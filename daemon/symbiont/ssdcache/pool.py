"""The shared SSD: a loop device over a file, or a real block device, in 1 MiB blocks.

Thin and real: ``losetup`` attaches the file (``--direct-io=on`` where the file system allows
it, so the data is not cached twice), the daemon keeps one read-write descriptor on the block
device and does positioned reads and writes on it. Zeroing a block uses ``BLKZEROOUT`` (on a
loop device the kernel turns it into ``fallocate`` on the backing file: a 1 MiB block is
zeroed without writing 1 MiB), with a write of zeros as the fallback.

After ``kill -9`` of the daemon the loop device stays attached; :meth:`Pool.open_file` finds it
again with ``losetup -j`` instead of attaching a second one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from symbiont.host import blockdev
from symbiont.host.blockdev import _in_use  # noqa: F401  (tests read sysfs fixtures through it)
from symbiont.ssdcache.layout import BLOCK_SHIFT, BLOCK_SIZE

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
BLKDISCARD = 0x1277
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
BLKFLSBUF = 0x1261
MAX_POOL_MIB = 1 << 24  # 16 TiB: a bound on what the API accepts
ZEROS = bytes(BLOCK_SIZE)
DIRECT_ALIGN = 4096  # safe for any logical block size up to 4 KiB


class PoolError(Exception):
    """The pool could not be created, attached or used; the message says why."""

    status = 422


class PoolForbidden(PoolError):
    """The config does not allow this path or device (``ssdcache.pool_dir``, ``allowed_devices``)."""

    status = 403


class PoolBusy(PoolError):
    """The device is in use by someone else (mounted, held, swap), or the disk is too full."""

    status = 409


def _libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def resolve_pool_file(file: str, pool_dir: str | Path) -> Path:
    """``file`` inside ``pool_dir`` (relative names are taken in it), symlinks resolved: a path
    that leaves the folder, directly or through a link, is refused."""
    base = Path(os.path.realpath(pool_dir))
    raw = Path(file)
    cand = raw if raw.is_absolute() else base / raw
    real = Path(os.path.realpath(cand))
    if real == base or not real.is_relative_to(base):
        raise PoolForbidden(f"pool file {file}: outside ssdcache.pool_dir ({base})")
    if cand.is_symlink():
        raise PoolForbidden(f"pool file {file}: is a symbolic link")
    return real


def device_allowed(device: str, patterns: list[str]) -> bool:
    """Is ``device`` (as given or resolved) matched by one of ``ssdcache.allowed_devices``?"""
    import fnmatch

    names = {device, os.path.realpath(device)}
    return any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, os.path.realpath(pat))
               for n in names for pat in patterns)


def device_in_use(device: str, sys_root: str = "/sys", proc_root: str = "/proc") -> str:
    """Why ``device`` (or a partition) must not be touched; empty when free (host/blockdev.py)."""
    return blockdev.device_in_use(device, sys_root, proc_root)


def loop_devices_of(path: str | Path) -> list[str]:
    """Loop devices attached to ``path``."""
    try:
        return blockdev.loop_devices_of(path)
    except blockdev.BlockDevError as exc:
        raise PoolError(str(exc)) from None


def attach_loop(path: str | Path) -> str:
    try:
        return blockdev.attach_loop(path)
    except blockdev.BlockDevError as exc:
        raise PoolError(str(exc)) from None


def detach_loop(dev: str) -> None:
    try:
        blockdev.detach_loop(dev)
    except blockdev.BlockDevError as exc:
        raise PoolError(str(exc)) from None


@dataclass
class Pool:
    """An open pool: ``device`` is the block device the I/O goes to."""

    path: str  # the backing file (kind "file") or the block device (kind "device")
    kind: str
    device: str
    nblocks: int
    attached_by_us: bool = False
    fd: int = -1  # buffered descriptor: unaligned I/O, zeroing
    dfd: int = -1  # O_DIRECT descriptor: aligned I/O (the data path), no second copy in the page cache
    bfd: int = -1  # the backing file (kind "file"): proof of zeros by SEEK_DATA, hole punching
    zeroout_ok: bool = True
    zeroed_blocks: int = 0
    adopted: bool = False  # an existing file: its old content must be zeroed before use
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- creation / attach ----------------------------------------------------------------
    @classmethod
    def create_file(cls, path: str | Path, size_mib: int, reserve_mib: int = 0) -> Pool:
        """Create a sparse backing file of ``size_mib`` MiB (or adopt one of exactly that size:
        ``adopted``, to be zeroed before use) and attach it.

        The file system must be able to hold the whole pool plus ``reserve_mib``: a sparse pool
        larger than the free space would let the guests' writes fill the host disk."""
        p = Path(path)
        if not p.is_absolute():
            raise PoolError(f"pool file {path}: must be an absolute path")
        if not 1 <= size_mib <= MAX_POOL_MIB:
            raise PoolError(f"pool size {size_mib} MiB outside 1..{MAX_POOL_MIB}")
        exists = p.exists() or p.is_symlink()
        if exists:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                raise PoolError(f"pool file {p}: exists and is not a regular file")
            if st.st_size != size_mib << 20:
                raise PoolError(f"pool file {p}: exists with {st.st_size} bytes, not {size_mib} MiB")
            allocated = st.st_blocks * 512
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            allocated = 0
        vfs = os.statvfs(p.parent)
        avail = vfs.f_bavail * vfs.f_frsize
        need = (size_mib << 20) - allocated + (reserve_mib << 20)
        if need > avail:
            raise PoolBusy(f"pool of {size_mib} MiB does not fit: {avail >> 20} MiB free on {p.parent} "
                           f"(keeping ssdcache.reserve_free_mib = {reserve_mib} MiB free for the host)")
        if not exists:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, size_mib << 20)
            finally:
                os.close(fd)
        pool = cls.open_file(p)
        pool.adopted = exists
        return pool

    @classmethod
    def open_file(cls, path: str | Path) -> Pool:
        """Attach an existing pool file, reusing a loop device already attached to it."""
        p = Path(path)
        if not p.is_file():
            raise PoolError(f"pool file {p} is missing")
        size = p.stat().st_size
        if size < BLOCK_SIZE:
            raise PoolError(f"pool file {p}: {size} bytes is less than one block")
        existing = loop_devices_of(p)
        if existing:
            why = device_in_use(existing[0])
            if why:
                raise PoolBusy(f"pool file {p}: its loop device {why}")
            dev, ours = existing[0], True  # left behind by a daemon that was killed: adopt it
            log.info("pool %s: reusing loop device %s", p, dev)
        else:
            dev, ours = attach_loop(p), True
            log.info("pool %s: attached %s", p, dev)
        try:
            return cls._open(str(p), "file", dev, ours)
        except BaseException:
            if not existing:
                detach_loop(dev)
            raise

    @classmethod
    def open_device(cls, device: str | Path) -> Pool:
        """Use a real block device (a lab host's SSD) as the pool; nothing is attached."""
        d = str(device)
        try:
            st = os.stat(d)
        except OSError as exc:
            raise PoolError(f"pool device {d}: {exc.strerror}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise PoolError(f"pool device {d}: not a block device")
        why = device_in_use(d)
        if why:
            raise PoolBusy(f"pool device {d}: {why}")
        return cls._open(d, "device", d, False)

    @classmethod
    def _open(cls, path: str, kind: str, dev: str, ours: bool) -> Pool:
        """Open ``dev`` with ``O_EXCL``: the kernel's own refusal of a mounted or held device,
        kept for the pool's life (nobody can mount it meanwhile)."""
        try:
            fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC | os.O_EXCL)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise PoolBusy(f"{dev} is busy (mounted, swap, or held by another user)") from None
            raise PoolError(f"cannot open {dev}: {exc.strerror}") from None
        bfd = -1
        if kind == "file":
            try:
                bfd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                os.close(fd)
                raise PoolError(f"cannot open {path}: {exc.strerror}") from None
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("Q", buf)[0]
        except OSError:
            size = os.lseek(fd, 0, os.SEEK_END)
        nblocks = size >> BLOCK_SHIFT
        if nblocks < 1:
            os.close(fd)
            if bfd >= 0:
                os.close(bfd)
            raise PoolError(f"{dev}: {size} bytes is less than one 1 MiB block")
        try:
            dfd = os.open(dev, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            log.info("%s: no O_DIRECT (%s); buffered I/O only", dev, exc.strerror)
            dfd = -1
        return cls(path=path, kind=kind, device=dev, nblocks=nblocks, attached_by_us=ours, fd=fd, dfd=dfd, bfd=bfd)

    def close(self, detach: bool = True) -> None:
        """Close the descriptor; detach the loop device when this pool attached (or adopted) it."""
        for name in ("dfd", "fd", "bfd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.close(fd)
                setattr(self, name, -1)
        if detach and self.kind == "file" and self.attached_by_us:
            try:
                detach_loop(self.device)
                log.info("pool %s: detached %s", self.path, self.device)
            except PoolError as exc:
                log.warning("pool %s: %s", self.path, exc)

    # -- I/O ------------------------------------------------------------------------------
    def _check(self, phys: int, length: int) -> None:
        if phys < 0 or length < 0 or phys + length > self.nblocks << BLOCK_SHIFT:
            raise PoolError(f"physical range {phys}+{length} outside the pool")

    def pread(self, phys: int, length: int) -> bytes:
        """Read through the page cache (tests, tools); the data path uses :meth:`read_into`."""
        self._check(phys, length)
        data = os.pread(self.fd, length, phys)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read at {phys}: {len(data)} of {length}")
        return data

    def read_into(self, buf: memoryview, phys: int) -> None:
        """Read ``len(buf)`` bytes at ``phys``: O_DIRECT when offset, length and buffer are aligned."""
        self._check(phys, len(buf))
        fd = self.dfd if self.dfd >= 0 and _aligned(buf, phys) else self.fd
        n = os.preadv(fd, [buf], phys)
        if n != len(buf):
            raise OSError(errno.EIO, f"short read at {phys}: {n} of {len(buf)}")

    def pwrite(self, phys: int, data: bytes | bytearray | memoryview) -> None:
        """Write at ``phys``: O_DIRECT when aligned (copying into an aligned buffer if needed)."""
        self._check(phys, len(data))
        fd = self.fd
        n = 0
        if self.dfd >= 0 and phys % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0:
            mv = memoryview(data)
            buf = None
            if not _aligned(mv, phys):
                buf = BUFFERS.get(len(mv))
                tmp = memoryview(buf)[: len(mv)]
                tmp[:] = mv
                mv = tmp
            try:
                n = os.pwrite(self.dfd, mv, phys)
            finally:
                if buf is not None:
                    mv.release()
                    BUFFERS.put(buf)
        else:
            n = os.pwrite(fd, data, phys)
        if n != len(data):
            raise OSError(errno.EIO, f"short write at {phys}: {n} of {len(data)}")

    def flush(self) -> None:
        os.fsync(self.fd)
        if self.dfd >= 0:
            os.fsync(self.dfd)

    def read_block(self, pbn: int) -> bytes:
        return self.pread(pbn << BLOCK_SHIFT, BLOCK_SIZE)

    def zero(self, pbns: list[int]) -> None:
        """Zero whole blocks, durably, before they can be handed to anyone else."""
        for start, count in _runs(pbns):
            self._check(start << BLOCK_SHIFT, count << BLOCK_SHIFT)
            if self.kind == "file":
                self._punch(start << BLOCK_SHIFT, count << BLOCK_SHIFT)
            else:
                self._zeroout(start << BLOCK_SHIFT, count << BLOCK_SHIFT)
            self.zeroed_blocks += count
        os.fsync(self.fd)
        if self.bfd >= 0:
            os.fsync(self.bfd)

    def _punch(self, off: int, length: int) -> None:
        """A file-backed range becomes a hole (no disk space), proven by ``SEEK_DATA``."""
        rng = struct.pack("QQ", off, length)
        try:
            fcntl.ioctl(self.fd, BLKDISCARD, rng)  # loop: punches the file, drops cached pages
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise PoolError(f"{self.device}: busy, not zeroing ({exc.strerror})") from None
            log.info("BLKDISCARD on %s failed (%s); punching %s", self.device, exc, self.path)
            _libc_fallocate(self.bfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
            fcntl.ioctl(self.fd, BLKFLSBUF, 0)  # the loop device's page cache may hold the old data
        if not self._is_hole(off, length):
            log.warning("%s: %d+%d is still allocated after punching; writing zeros", self.path, off, length)
            self._write_zeros(off, length)
        elif os.pread(self.fd, 4096, off) != ZEROS[:4096]:  # what a reader of the device sees
            raise PoolError(f"{self.device}: zeroed range {off}+{length} does not read back as zeros")

    def _is_hole(self, off: int, length: int) -> bool:
        try:
            return os.lseek(self.bfd, off, SEEK_DATA) >= off + length
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no data after off at all

    def _zeroout(self, off: int, length: int) -> None:
        if self.zeroout_ok:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", off, length))
                return
            except OSError as exc:
                if exc.errno == errno.EBUSY:  # someone else has it: never write over it
                    raise PoolError(f"{self.device}: busy, not zeroing ({exc.strerror})") from None
                log.info("BLKZEROOUT on %s failed (%s); writing zeros instead", self.device, exc)
                self.zeroout_ok = False
        self._write_zeros(off, length)

    def _write_zeros(self, off: int, length: int) -> None:
        for pos in range(off, off + length, BLOCK_SIZE):
            self.pwrite(pos, ZEROS[: min(BLOCK_SIZE, off + length - pos)])

    def drop_cache(self) -> None:
        """Drop the block device's page cache (benchmarks: cold reads)."""
        os.fsync(self.fd)
        try:
            fcntl.ioctl(self.fd, BLKFLSBUF, 0)
        except OSError:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def describe(self) -> dict[str, object]:
        return {
            "path": self.path,
            "kind": self.kind,
            "device": self.device,
            "blocks": self.nblocks,
            "block_size": BLOCK_SIZE,
            "size_mib": self.nblocks * BLOCK_SIZE >> 20,
            "zeroout": self.zeroout_ok,
            "zeroed_blocks": self.zeroed_blocks,
        }


def aligned_buffer(n: int) -> mmap.mmap:
    """A fresh page-aligned, zero-filled buffer of ``n`` bytes (usable for O_DIRECT)."""
    return mmap.mmap(-1, max(n, 1))


class BufferPool:
    """Reusable page-aligned buffers in power-of-two classes (64 KiB .. 64 MiB).

    A fresh 1 MiB mmap costs 256 page faults, the kernel's zeroing and a TLB shoot-down on
    unmap: measured, it halved the data path's 1 MiB throughput. Buffers come back with
    :meth:`put` once nobody references them; at most ``keep_bytes`` are kept.
    """

    def __init__(self, keep_bytes: int = 64 << 20) -> None:
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0
        self._lock = threading.Lock()

    @staticmethod
    def _class(n: int) -> int:
        return max(64 << 10, 1 << (max(n, 1) - 1).bit_length())

    def get(self, n: int) -> mmap.mmap:
        size = self._class(n)
        with self._lock:
            free = self._free.get(size)
            if free:
                self._kept -= size
                return free.pop()
        return mmap.mmap(-1, size)

    def put(self, buf: mmap.mmap) -> None:
        size = len(buf)
        if size != self._class(size):
            return
        with self._lock:
            if self._kept + size <= self.keep_bytes:
                self._free.setdefault(size, []).append(buf)
                self._kept += size


BUFFERS = BufferPool()


def _aligned(buf: memoryview, phys: int) -> bool:
    if phys % DIRECT_ALIGN or len(buf) % DIRECT_ALIGN or buf.readonly:
        return False
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return False
    return addr % DIRECT_ALIGN == 0


def _runs(pbns: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(set(pbns)):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out
