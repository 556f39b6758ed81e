"""The NBD transmission phase in C (``native/nbdfast.c``), loaded with ctypes.

Why: the Python data path crosses the interpreter for every request (socket read, header parse,
thread-pool hand-off, reply: ~250 µs on this host) and holds the GIL while doing it, so random
4 KiB I/O ran at 0.22x the raw loop device. Python keeps the handshake (export name + secret
check); then the connected socket is handed to :func:`serve`, which runs the whole
transmission phase in C with ``threads`` workers for this connection while ctypes has released
the GIL. The block map stays the :class:`~symbiont.ssdcache.nbdserver.Export`'s own
``array('q')``; Python changes it only under the export's native rwlock (:class:`NativeExport`).

Built at first use with the host's C compiler by :class:`symbiont.native.NativeLibrary` (as
``dedup/native.py`` is). Without a compiler, or with ``SYMBIONT_NATIVE_NBD=0``, :func:`load`
returns ``None`` and the Python data path serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from array import array
from collections.abc import Iterator
from pathlib import Path

from symbiont.native import NativeLibrary

log = logging.getLogger(__name__)

# vhostblk.c includes nbdfast.c: one library, one ``struct export`` for both transports.
SOURCE = Path(__file__).with_name("native") / "vhostblk.c"
FLAGS = (["-O2", "-march=native"], ["-O2"])
# Order of the counters in nbdx_stats (enum in nbdfast.c).
STAT_NAMES = ("reads", "writes", "flushes", "trims", "zeroes", "read_bytes", "write_bytes",
              "unbacked_errors", "io_errors", "invalid_requests", "spliced_reads")  # fmt: skip


def _setup(so: ctypes.CDLL) -> ctypes.CDLL:
    vp, i64, u64, u32, ci, sz = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                                 ctypes.c_int, ctypes.c_size_t)  # fmt: skip
    so.nbdx_export_new.restype = vp
    so.nbdx_export_new.argtypes = [vp, vp, i64, ci, ci, ci, u64, u32]
    so.nbdx_export_free.restype = None
    so.nbdx_export_free.argtypes = [vp]
    so.nbdx_set_fds.restype = None
    so.nbdx_set_fds.argtypes = [vp, ci, ci]
    so.nbdx_set_chunk.restype = None
    so.nbdx_set_chunk.argtypes = [vp, u32]
    so.nbdx_set_splice.restype = None
    so.nbdx_set_splice.argtypes = [vp, ci]
    so.nbdx_wrlock.restype = None
    so.nbdx_wrlock.argtypes = [vp]
    so.nbdx_unlock.restype = None
    so.nbdx_unlock.argtypes = [vp]
    so.nbdx_stats.restype = None
    so.nbdx_stats.argtypes = [vp, vp]
    so.nbdx_last_error.restype = u64
    so.nbdx_last_error.argtypes = [vp, ctypes.c_char_p, sz]
    so.nbdx_serve.restype = ci
    so.nbdx_serve.argtypes = [vp, ci, ctypes.c_char_p, sz, ci, ctypes.c_char_p, sz]
    so.vhbx_serve.restype = ci
    so.vhbx_serve.argtypes = [vp, ci, ctypes.c_char_p, ci, ctypes.c_char_p, sz]
    return so


LIB: NativeLibrary[ctypes.CDLL] = NativeLibrary(
    "nbdfast", SOURCE, FLAGS, switch="SYMBIONT_NATIVE_NBD", what="nbdfast.c", setup=_setup, log=log,
    unavailable="ssdcache: native NBD data path unavailable (%s); serving from Python", level=logging.WARNING,
    extra_args=("-pthread",), timeout=120,
)
load = LIB.load  # the compiled data path, built once per process; None where it cannot be (see why)
why = LIB.why  # how the data path was built, or why it was not


class NativeExport:
    """The C side of one export: its rwlock, counters, and the addresses of the Export's arrays.

    ``map`` and ``last_access`` must outlive this object and never be resized (they are the
    Export's fixed-size arrays; C reads and writes them in place)."""

    def __init__(self, lib: ctypes.CDLL, map_: array, last_access: array, size_blocks: int, fd: int, dfd: int,
                 read_only: bool, pool_bytes: int, max_request: int) -> None:
        self.lib = lib
        self._keep = (map_, last_access)
        h = lib.nbdx_export_new(map_.buffer_info()[0], last_access.buffer_info()[0], size_blocks, fd, dfd,
                                int(read_only), pool_bytes, max_request)  # fmt: skip
        if not h:
            raise MemoryError("nbdx_export_new")
        self.handle: int = h

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No native request runs while this is held (waits for those in flight; GIL released)."""
        self.lib.nbdx_wrlock(self.handle)
        try:
            yield
        finally:
            self.lib.nbdx_unlock(self.handle)

    def set_fds(self, fd: int, dfd: int) -> None:
        self.lib.nbdx_set_fds(self.handle, fd, dfd)

    def set_chunk(self, nbytes: int) -> None:
        """Large aligned requests go to the pool as parallel chunks of ``nbytes`` (0: one
        synchronous pread/pwrite per piece; benchmarks compare both)."""
        self.lib.nbdx_set_chunk(self.handle, nbytes)

    def set_splice(self, on: bool) -> None:
        """Reads with others in flight go pool -> pipe -> socket by splice(), not through a
        buffer of ours (off: pread + sendmsg; benchmarks compare both)."""
        self.lib.nbdx_set_splice(self.handle, int(on))

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_uint64 * len(STAT_NAMES))()
        self.lib.nbdx_stats(self.handle, out)
        return dict(zip(STAT_NAMES, out, strict=True))

    def last_error(self) -> tuple[int, str]:
        """(how many errors so far, the last one's message)."""
        buf = ctypes.create_string_buffer(256)
        seq = self.lib.nbdx_last_error(self.handle, buf, len(buf))
        return seq, buf.value.decode(errors="replace")

    def serve(self, sock_fd: int, prefix: bytes, threads: int) -> str:
        """Serve one connection until it ends (blocks; the GIL is released). Returns "" after
        NBD_CMD_DISC, else why the connection was dropped."""
        why = ctypes.create_string_buffer(200)
        rc = self.lib.nbdx_serve(self.handle, sock_fd, prefix, len(prefix), threads, why, len(why))
        return "" if rc == 0 else why.value.decode(errors="replace") or "connection dropped"

    def serve_vhost(self, sock_fd: int, serial: str, workers: int) -> str:
        """Serve one vhost-user-blk connection (QEMU's) until it ends (blocks; the GIL is
        released). Returns "" when QEMU closed it, else why it was dropped."""
        why = ctypes.create_string_buffer(200)
        rc = self.lib.vhbx_serve(self.handle, sock_fd, serial.encode()[:20], workers, why, len(why))
        return "" if rc == 0 else why.value.decode(errors="replace") or "connection dropped"

    def __del__(self) -> None:  # the last reference: no connection thread uses it any more
        self.close()

    def close(self) -> None:
        if getattr(self, "handle", 0):
            self.lib.nbdx_export_free(self.handle)
            self.handle = 0
