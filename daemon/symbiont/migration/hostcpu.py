"""Host CPU used during a migration: each VM's QEMU process and the daemon.

Portkey's table compares the CPU the source and destination machines spend while a
container migrates; here the "machines" are the two QEMU processes (all their threads: vCPUs
and I/O) and the relay is the daemon itself, so the meter reads exactly those processes,
through the host port (``qemu_pid``, ``process_cpu_seconds``): this module reads no /proc.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from symbiont.host.port import HostError, HostPort


@dataclass
class CpuMeter:
    """Start, then :meth:`read`: CPU seconds and % of one core for each named process."""

    host: HostPort
    pids: dict[str, int | None]
    start_wall: float = 0.0
    start: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def for_migration(cls, host: HostPort, source: str, dest: str) -> CpuMeter:
        return cls(host, {"source_qemu": _pid(host, source), "dest_qemu": _pid(host, dest),
                          "daemon": os.getpid()}).begin()  # fmt: skip

    def _secs(self, pid: int | None) -> float | None:
        if not pid:
            return None
        try:
            return self.host.process_cpu_seconds(pid)
        except HostError:
            return None

    def begin(self) -> CpuMeter:
        self.start_wall = time.monotonic()
        self.start = {k: self._secs(p) for k, p in self.pids.items()}
        return self

    def read(self) -> dict[str, float | None]:
        wall = max(1e-9, time.monotonic() - self.start_wall)
        out: dict[str, float | None] = {"wall_s": round(wall, 4)}
        for k, p in self.pids.items():
            now = self._secs(p)
            s0 = self.start.get(k)
            secs = None if now is None or s0 is None else max(0.0, now - s0)
            out[f"{k}_cpu_s"] = None if secs is None else round(secs, 4)
            out[f"{k}_cpu_pct"] = None if secs is None else round(100.0 * secs / wall, 2)
        return out


def _pid(host: HostPort, vm: str) -> int | None:
    """The QEMU process of a running domain (None when it is not running or unknown)."""
    try:
        return host.qemu_pid(vm)
    except HostError:
        return None
