"""An export served to QEMU's ``vhost-user-blk-pci`` (``native/vhostblk.c``).

Why: through NBD every byte crosses a unix socket twice more than on a plain virtio disk, and
QEMU 7.2 copies it in its one I/O thread; sequential 1 MiB at QD 16 stayed at 0.2-0.5x the
plain disk (BENCHMARKS.md). With vhost-user the C data path reads the guest's virtqueues and
does the pool I/O straight into the guest's buffers, so QEMU copies nothing. The price: the
guest's RAM must be a shared memfd (``<memoryBacking><source type='memfd'/><access
mode='shared'/>``), which KSM cannot merge, and QEMU blocks live migration of a VM with a
vhost-user disk whose backend lacks dirty logging (ours does).

The map, the rwlock, translation and counters are the export's own (:class:`NativeExport`),
so a resize commit is the same exclusive section for both transports. One connection is served
at a time (QEMU opens one per device and reconnects after a drop); each runs in a thread of
its own inside C, with the GIL released.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from symbiont.ssdcache.nbdserver import Export

log = logging.getLogger(__name__)

WORKERS = 8  # requests served at once per connection (the guest's queue depth is spread on these)


class VhostUserServer:
    """Serves one :class:`Export` as a vhost-user-blk backend on a unix socket."""

    def __init__(self, export: Export, socket_path: str | Path, serial: str, *, socket_mode: int = 0o660,
                 socket_gid: int | None = None, workers: int = WORKERS,
                 allow_peer: Callable[[int], bool] | None = None) -> None:  # fmt: skip
        """``serial``: what the guest reads as the disk's serial (at most 20 bytes; the guest
        agent finds its elastic disk by it). ``allow_peer(pid)``: whether the process that
        connected may be served (the VM's own QEMU: every QEMU runs as the same user, so the
        socket's mode alone cannot keep another VM's QEMU out; NBD has its export secret)."""
        if export.native is None:
            raise RuntimeError(f"export {export.name}: vhost-user needs the native data path")
        self.export, self.serial, self.workers = export, serial, workers
        self.socket_path = Path(socket_path)
        self.socket_mode, self.socket_gid = socket_mode, socket_gid
        self.allow_peer = allow_peer
        self.connections = self.refused = 0
        self.last_drop = ""
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(str(self.socket_path))
        os.chmod(self.socket_path, self.socket_mode)
        if self.socket_gid is not None:
            os.chown(self.socket_path, -1, self.socket_gid)
        ls.listen(1)
        self._listener = ls
        self._thread = threading.Thread(target=self._serve, name=f"vhost-{self.export.name}", daemon=True)
        self._thread.start()
        log.info("export %s: vhost-user-blk on %s (%d MiB)", self.export.name, self.socket_path,
                 self.export.size >> 20)  # fmt: skip

    def _serve(self) -> None:
        assert self._listener is not None and self.export.native is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            try:
                allowed = self.allow_peer is None or self.allow_peer(pid)
            except Exception as exc:  # noqa: BLE001 - the check failing refuses, never kills the server
                log.warning("export %s: peer check failed: %s", self.export.name, exc)
                allowed = False
            if not allowed:
                self.refused += 1
                self.last_drop = f"refused pid {pid}: not this VM's QEMU"
                log.warning("export %s: vhost-user connection from pid %d refused", self.export.name, pid)
                conn.close()
                continue
            self._conn = conn
            self.connections += 1
            log.info("export %s: vhost-user connection from pid %d", self.export.name, pid)
            try:
                why = self.export.native.serve_vhost(conn.fileno(), self.serial, self.workers)
            finally:
                self._conn = None
                conn.close()
            if why:
                self.last_drop = why
                log.warning("export %s: vhost-user connection dropped: %s", self.export.name, why)

    def close(self) -> None:
        """Stop serving: the listener and any live connection end (QEMU sees the disk go)."""
        self._closed.set()
        for s in (self._listener, self._conn):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        if self._listener is not None:
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
