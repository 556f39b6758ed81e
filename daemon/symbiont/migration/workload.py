"""Containers made to be migrated, and the counter workload the tests and experiments run.

CRIU dumps a container from its init (PID 1 of its PID namespace) and needs that init to
lead its own session and to hold no file descriptors opened outside its mount namespace.
The container part starts commands through ``unshare`` from the agent (session and stdio
outside); :func:`migratable_command` wraps a command so that its init calls ``setsid`` and
re-opens its standard streams inside the container (onto the container's log file).
"""

from __future__ import annotations

LOG_DIR = "/var/log/symbiont-containers"

# One line per tick to its work file through a pipe between two processes; the parent also
# touches ``mib`` MiB of memory (one page per tick), so pre-dumps have dirty pages to track.
COUNTER = r"""
import os, sys, time
mib, path, period = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
os.makedirs(os.path.dirname(path), exist_ok=True)
buf = bytearray(os.urandom(1 << 20)) * mib
r, w = os.pipe()
if os.fork() == 0:
    os.close(w)
    out = open(path, "a")
    for line in os.fdopen(r):
        out.write(line)
        out.flush()
    os._exit(0)
os.close(r)
n = 0
while True:
    n += 1
    os.write(w, b"%d %.3f\n" % (n, time.time()))
    if buf:
        buf[(n * 4096) % len(buf)] = n & 255
    time.sleep(period)
"""


def migratable_command(name: str, argv: list[str]) -> list[str]:
    """``argv`` run as a migratable container init: own session, stdio inside the container."""
    return ["setsid", "sh", "-c", 'exec </dev/null >>"$0" 2>&1; exec "$@"', f"{LOG_DIR}/{name}.log", *argv]


def counter_command(name: str, mib: int, work_file: str, period: float = 0.2) -> list[str]:
    """The counter workload as a migratable command (``python3 -c``: nothing to install)."""
    if not 0 <= mib <= 4096 or period <= 0:
        raise ValueError("mib in 0..4096 and period > 0")
    return migratable_command(name, ["python3", "-c", COUNTER, str(mib), work_file, str(period)])


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
