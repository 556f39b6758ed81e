"""Guest statistics read from /proc and /sys: what only the guest can see."""

from __future__ import annotations

import os
import time

# vmstat counters the host policies use (paging, reclaim, refaults, balloon).
VMSTAT_KEYS = (
    "pgpgin", "pgpgout", "pswpin", "pswpout", "pgfault", "pgmajfault",
    "pgscan_kswapd", "pgscan_direct", "pgsteal_kswapd", "pgsteal_direct",
    "workingset_refault_anon", "workingset_refault_file", "workingset_activate_anon",
    "workingset_activate_file", "oom_kill", "balloon_inflate", "balloon_deflate",
    "nr_free_pages", "nr_inactive_anon", "nr_active_anon", "nr_inactive_file", "nr_active_file",
)


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes (kB values multiplied out)."""
    out: dict[str, int] = {}
    with open(path) as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if not parts:
                continue
            value = int(parts[0])
            if len(parts) > 1 and parts[1] == "kB":
                value *= 1024
            out[key.strip()] = value
    return out


def read_vmstat(path: str = "/proc/vmstat", keys: tuple[str, ...] = VMSTAT_KEYS) -> dict[str, int]:
    wanted = set(keys)
    out: dict[str, int] = {}
    with open(path) as fh:
        for line in fh:
            name, _, value = line.partition(" ")
            if name in wanted:
                out[name] = int(value)
    return out


def read_psi(resource: str, root: str = "/proc/pressure") -> dict[str, float]:
    """PSI of one resource: some_avg10, some_avg60, some_total_us, full_* where present."""
    out: dict[str, float] = {}
    try:
        with open(os.path.join(root, resource)) as fh:
            for line in fh:
                kind, *fields = line.split()
                for f in fields:
                    k, _, v = f.partition("=")
                    key = f"{kind}_{k}" + ("_us" if k == "total" else "")
                    out[key] = float(v)
    except OSError:
        pass
    return out


def parse_cpu_list(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]"""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            cpus.extend(range(int(a), int(b) + 1))
        else:
            cpus.append(int(part))
    return cpus


def cpu_lists(root: str = "/sys/devices/system/cpu") -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name in ("online", "present", "possible", "offline"):
        try:
            with open(os.path.join(root, name)) as fh:
                out[name] = parse_cpu_list(fh.read())
        except OSError:
            out[name] = []
    return out


def cpu_times() -> dict[str, int]:
    """Aggregate /proc/stat cpu line in USER_HZ ticks."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    with open("/proc/stat") as fh:
        first = fh.readline().split()
    return {n: int(v) for n, v in zip(names, first[1:], strict=False)}


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def collect() -> dict:
    """Everything the daemon's control loop asks for each period."""
    with open("/proc/loadavg") as fh:
        load = [float(x) for x in fh.read().split()[:3]]
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    cpus = cpu_lists()
    return {
        "time": time.time(),
        "uptime_s": uptime,
        "loadavg": load,
        "meminfo": read_meminfo(),
        "vmstat": read_vmstat(),
        "psi": {r: read_psi(r) for r in ("cpu", "memory", "io")},
        "cpus": {"online": cpus["online"], "present": cpus["present"], "count_online": len(cpus["online"])},
        "cpu_times": cpu_times(),
    }
