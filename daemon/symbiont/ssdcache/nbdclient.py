"""A small synchronous NBD client (fixed newstyle, NBD_OPT_GO, simple replies).

For host-side workloads (experiments, benchmarks) that drive an elastic SSD export without a
VM; the VM path is QEMU's own client. Errors from the server surface as ``OSError(errno)``.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading

from symbiont.ssdcache import nbdserver as nbd


class NbdClient:
    def __init__(self, socket_path: str, export: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path)
        self._lock = threading.Lock()
        self._handle = 0
        self.size = self._handshake(export.encode())

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self, name: bytes) -> int:
        hello = self._recv(18)
        if hello[:8] != nbd.NBDMAGIC:
            raise ConnectionError("not an NBD server")
        self.sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(data)) + data)
        size = -1
        while True:
            _magic, _opt, rtype, n = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(n)
            if rtype == nbd.REP_INFO and struct.unpack(">H", payload[:2])[0] == nbd.INFO_EXPORT:
                size = struct.unpack(">QH", payload[2:12])[0]
            elif rtype == nbd.REP_ACK:
                return size
            elif rtype >= 1 << 31:
                raise ConnectionError(f"NBD_OPT_GO refused ({rtype:#x}): {payload[:200]!r}")

    def _call(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> bytes:
        with self._lock:
            self._handle += 1
            handle = struct.pack(">Q", self._handle)
            self.sock.sendall(struct.pack(">IHH8sQI", nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)
            magic, err, h = struct.unpack(">II8s", self._recv(16))
            if magic != nbd.SIMPLE_REPLY_MAGIC or h != handle:
                raise ConnectionError("bad reply from NBD server")
            if err:
                raise OSError(err, f"NBD {nbd.CMD_NAMES.get(cmd, cmd)} {offset}+{length}: {errno.errorcode.get(err, err)}")
            return self._recv(length) if cmd == nbd.CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._call(nbd.CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._call(nbd.CMD_WRITE, offset, len(data), bytes(data), nbd.CMDFLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._call(nbd.CMD_FLUSH, 0, 0)

    def close(self) -> None:
        try:
            with self._lock:
                self.sock.sendall(struct.pack(">IHH8sQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, b"\0" * 8, 0, 0))
        except OSError:
            pass
        self.sock.close()
