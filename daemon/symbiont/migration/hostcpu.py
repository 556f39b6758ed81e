"""Host CPU used during a migration: each VM's QEMU process and the daemon (psutil).

Portkey's table compares the CPU the source and destination machines spend while a
container migrates; here the "machines" are the two QEMU processes (all their threads: vCPUs
and I/O) and the relay is the daemon itself, so the meter reads exactly those processes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

QEMU_PID_DIR = Path("/run/libvirt/qemu")


def qemu_pid(vm: str, pid_dir: Path = QEMU_PID_DIR) -> int | None:
    """The QEMU process of a running libvirt domain (libvirt writes ``NAME.pid``)."""
    try:
        return int((pid_dir / f"{vm}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except (psutil.Error, OSError):
        return None


@dataclass
class CpuMeter:
    """Start, then :meth:`read`: CPU seconds and % of one core for each named process."""

    pids: dict[str, int | None]
    start_wall: float = 0.0
    start: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def for_migration(cls, source: str, dest: str) -> CpuMeter:
        return cls(
            {"source_qemu": qemu_pid(source), "dest_qemu": qemu_pid(dest), "daemon": os.getpid()}
        ).begin()

    def begin(self) -> CpuMeter:
        self.start_wall = time.monotonic()
        self.start = {k: (_cpu_seconds(p) if p else None) for k, p in self.pids.items()}
        return self

    def read(self) -> dict[str, float | None]:
        wall = max(1e-9, time.monotonic() - self.start_wall)
        out: dict[str, float | None] = {"wall_s": round(wall, 4)}
        for k, p in self.pids.items():
            now = _cpu_seconds(p) if p else None
            s0 = self.start.get(k)
            secs = None if now is None or s0 is None else max(0.0, now - s0)
            out[f"{k}_cpu_s"] = None if secs is None else round(secs, 4)
            out[f"{k}_cpu_pct"] = None if secs is None else round(100.0 * secs / wall, 2)
        return out
