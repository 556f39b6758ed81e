"""A fake guest for adversarial tests: it plays QEMU's end of a channel socket.

It is the test's attacker, not a stand-in for a feature: the daemon under test is real.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

from symbiont_agent import protocol as proto

VALID_STATS = {
    "uptime_s": 1.0,
    "loadavg": [0.0, 0.0, 0.0],
    "meminfo": {"MemTotal": 512 << 20, "MemAvailable": 400 << 20},
    "vmstat": {"pgfault": 1},
    "psi": {"cpu": {"some_avg10": 0.0}, "memory": {"some_avg10": 0.0}, "io": {}},
    "cpus": {"online": [0], "present": [0]},
    "cpu_times": {"user": 1},
}


class FakeGuest:
    """Listens on ``path``; ``behave`` answers like a good agent in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        os.chmod(path, 0o777)
        self.srv.listen(4)
        self.srv.settimeout(30)
        self.conn: socket.socket | None = None
        self.accepted = 0
        self.stats_answered = 0
        self.stats_times: list[float] = []  # monotonic time of each stats answer
        self.stats: dict = VALID_STATS  # what behave() answers to "stats"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def accept(self, timeout: float = 30) -> socket.socket:
        self.srv.settimeout(timeout)
        conn, _ = self.srv.accept()
        self.accepted += 1
        self.conn = conn
        return conn

    def read_frames(self, conn: socket.socket, until_type: str, timeout: float = 15) -> list[proto.Message]:
        reader = proto.FrameReader()
        conn.settimeout(timeout)
        got: list[proto.Message] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = conn.recv(65536)
            if not data:
                break
            got.extend(reader.feed(data))
            if any(m.type == until_type for m in got):
                return got
        raise AssertionError(f"no {until_type} frame from the daemon (got {[m.type for m in got]})")

    def handshake(self, conn: socket.socket, proto_version: int = proto.PROTOCOL_VERSION) -> None:
        self.read_frames(conn, "hello")
        h = proto.hello("agent", "fake", ["ping", "stats", "online-cpus"], boot_id="fake", pid=1)
        h["proto"] = proto_version
        conn.sendall(proto.encode(h))

    def is_closed_by_peer(self, conn: socket.socket, timeout: float) -> bool:
        """True when the daemon closes the connection within ``timeout`` (draining its frames)."""
        conn.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return True
            if not data:
                return True
        return False

    # -- a well-behaved agent, in a thread --------------------------------------------------
    def behave(self, stats: dict | None = None) -> None:
        """Answer like a good agent, in a thread (``stats``: the answer to "stats")."""
        self.stats = stats if stats is not None else VALID_STATS
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop_behaving(self) -> None:
        """End behave()'s thread and its connection (the daemon reconnects)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._stop.clear()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.accept(timeout=1)
            except TimeoutError:
                continue
            except OSError:
                return
            reader = proto.FrameReader()
            conn.settimeout(0.5)
            with contextlib.suppress(OSError):
                while not self._stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    for m in reader.feed(data):
                        if m.type == "hello":
                            conn.sendall(proto.encode(proto.hello("agent", "fake", ["ping", "stats"], boot_id="good", pid=2)))
                        elif m.type == "req":
                            result = self.stats if m.header["op"] == "stats" else {"pong": True}
                            if m.header["op"] == "stats":
                                self.stats_answered += 1
                                self.stats_times.append(time.monotonic())
                            conn.sendall(proto.encode(proto.response_ok(m.header["id"], result)))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        self.srv.close()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(OSError):
            self.path.unlink()


def trickle_until_closed(conn: socket.socket, data: bytes, interval: float, timeout: float) -> float | None:
    """Send ``data`` one byte per ``interval`` (slow-loris), draining what the daemon sends;
    return the seconds until the daemon closed the connection, or None if it never did."""
    t0 = time.monotonic()
    conn.settimeout(interval)
    i = 0
    while time.monotonic() - t0 < timeout:
        try:
            if i < len(data):
                conn.sendall(data[i : i + 1])
                i += 1
            while True:
                got = conn.recv(65536)
                if not got:
                    return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def raw_frame(jlen: int, blen: int, body: bytes = b"") -> bytes:
    return struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, jlen, blen) + body
