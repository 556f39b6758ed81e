"""Containers made to be migrated, and the counter workload the tests and experiments run.

CRIU dumps a container from its init (PID 1 of its PID namespace) and needs that init to
lead its own session and to hold no file descriptors opened outside its mount namespace.
The container part starts commands through ``unshare`` from the agent (session and stdio
outside); :func:`migratable_command` wraps a command so that its init calls ``setsid`` and
re-opens its standard streams inside the container (onto the container's log file).
"""

from __future__ import annotations

LOG_DIR = "/var/log/symbiont-containers"

# One line per tick to its work file through a pipe between two processes. The writer forks
# its pipe reader first, then allocates ``mib`` MiB of its own (so the container holds ``mib``
# MiB once, not twice through a copy-on-write child), and writes ``dirty`` bytes per second
# spread over it, one byte per 4 KiB page, cycling: the dirty rate pre-copy has to chase.
COUNTER = r"""
import os, sys, time
mib, path, period, dirty = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
os.makedirs(os.path.dirname(path), exist_ok=True)
r, w = os.pipe()
if os.fork() == 0:
    os.close(w)
    out = open(path, "a")
    for line in os.fdopen(r):
        out.write(line)
        out.flush()
    os._exit(0)
os.close(r)
buf = bytearray(mib << 20)
chunk = os.urandom(1 << 16)
for i in range(0, len(buf), 1 << 16):
    buf[i:i + (1 << 16)] = chunk  # incompressible, every page present
per_tick = max(1, int(dirty * period) // 4096) if buf else 0
pages = len(buf) // 4096
pos = n = 0
while True:
    n += 1
    os.write(w, b"%d %.3f\n" % (n, time.time()))
    for _ in range(per_tick):
        buf[pos * 4096] = n & 255
        pos = (pos + 1) % pages
    time.sleep(period)
"""

# A TCP echo server: one line in, the same line out, connection after connection. Bound to
# the wildcard address: the client connects to the container's own address on the guest link.
ECHO = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(4)
while True:
    conn, _ = srv.accept()
    f = conn.makefile("rwb", buffering=0)
    for line in f:
        conn.sendall(line)
    conn.close()
"""


def migratable_command(name: str, argv: list[str]) -> list[str]:
    """``argv`` run as a migratable container init: own session, stdio inside the container."""
    return ["setsid", "sh", "-c", 'exec </dev/null >>"$0" 2>&1; exec "$@"', f"{LOG_DIR}/{name}.log", *argv]


def counter_command(name: str, mib: int, work_file: str, period: float = 0.2, dirty_kib_s: int = 0) -> list[str]:
    """The counter workload as a migratable command (``python3 -c``: nothing to install).

    ``dirty_kib_s``: KiB of its memory written per second (one byte per page; at least one
    page per tick)."""
    if not 0 <= mib <= 4096 or period <= 0 or not 0 <= dirty_kib_s <= 1 << 20:
        raise ValueError("mib in 0..4096, period > 0, dirty_kib_s in 0..1048576")
    return migratable_command(name, ["python3", "-c", COUNTER, str(mib), work_file, str(period),
                                     str(dirty_kib_s << 10)])  # fmt: skip


def echo_command(name: str, port: int) -> list[str]:
    """A line-echo TCP server as a migratable command (a server with established connections)."""
    if not 1024 <= port <= 65535:
        raise ValueError("port in 1024..65535")
    return migratable_command(name, ["python3", "-c", ECHO, str(port)])


def parse_counter(text: str) -> list[tuple[int, float]]:
    """``n timestamp`` lines of a counter's work file (partial lines ignored)."""
    out = []
    lines = text.split("\n")
    for line in lines[:-1]:  # the last one is empty, or a line still being written
        parts = line.split()
        if len(parts) == 2:
            try:
                out.append((int(parts[0]), float(parts[1])))
            except ValueError:
                continue
    return out
