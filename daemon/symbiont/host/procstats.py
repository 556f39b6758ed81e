"""Host statistics: psutil for CPU/memory/processes, /proc/pressure for PSI."""

from __future__ import annotations

from pathlib import Path

import psutil


def read_psi(resource: str, root: Path = Path("/proc/pressure")) -> dict[str, float]:
    """PSI of one resource as ``{"some_avg10": .., "some_total_us": .., "full_...": ..}``."""
    out: dict[str, float] = {}
    try:
        text = (root / resource).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        kind, *fields = line.split()
        for f in fields:
            k, _, v = f.partition("=")
            out[f"{kind}_{k}" + ("_us" if k == "total" else "")] = float(v)
    return out


def host_sample() -> dict:
    """One sample of host-wide state for the control loop."""
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpus": psutil.cpu_count(),
        "loadavg": list(psutil.getloadavg()),
        "mem_total": vm.total,
        "mem_available": vm.available,
        "mem_used": vm.used,
        "swap_used": sw.used,
        "psi": {r: read_psi(r) for r in ("cpu", "memory", "io")},
    }


class ProcessCpu:
    """CPU % of a set of processes between successive calls (psutil keeps the previous times)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def percent(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # prime
                return None
            return proc.cpu_percent(None)
        except psutil.Error:
            self._procs.pop(pid, None)
            return None

    def rss(self, pid: int | None) -> int | None:
        if pid is None:
            return None
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
