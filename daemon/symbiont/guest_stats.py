"""Validation of what a guest reports: the guest is untrusted.

Only known sections and numeric values pass, each within what the domain can physically
have: sizes are non-negative and at most the domain's memory (or ``MAX_BYTES``), PSI
averages are percentages, CPU ids are below the domain's vCPU count. A value outside its
range is *dropped*, not clamped: the daemon stores, serves, exports and acts on the
sanitised copy only, and a missing value is something its policies already handle, while a
clamped lie would look plausible.
"""

from __future__ import annotations

import math
from typing import Any

MAX_KEYS = 256
MAX_CPUS = 4096
MAX_BYTES = 1 << 50  # 1 PiB: above any meminfo field of any guest (VmallocTotal is 32 TiB)
MAX_COUNTER = 1 << 63
MAX_LOAD = 1e6
# meminfo fields that are parts of the guest's RAM: each is at most MemTotal.
PART_OF_RAM = ("MemFree", "MemAvailable", "Buffers", "Cached", "Active", "Inactive", "AnonPages", "Shmem")


def _num(v: Any, lo: float = 0, hi: float = MAX_COUNTER) -> float | int | None:
    """``v`` when it is a finite number in ``[lo, hi]``, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if not lo <= v <= hi:
        return None
    return v


def _numeric_map(d: Any, hi: float = MAX_COUNTER, max_keys: int = MAX_KEYS) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    if not isinstance(d, dict):
        return out
    for k, v in list(d.items())[:max_keys]:
        n = _num(v, 0, hi)
        if isinstance(k, str) and len(k) <= 64 and n is not None:
            out[k] = n
    return out


def _meminfo(d: Any, max_mem_bytes: int | None) -> dict[str, float | int]:
    mi = _numeric_map(d, MAX_BYTES)
    limit = min(max_mem_bytes, MAX_BYTES) if max_mem_bytes else MAX_BYTES
    if "MemTotal" in mi and mi["MemTotal"] > limit:
        del mi["MemTotal"]  # more RAM than the domain has: nothing derived from it is true
    total = mi.get("MemTotal")
    for key in PART_OF_RAM:
        if key in mi and (total is None or mi[key] > total):
            del mi[key]  # a part of RAM without (or above) the whole is unusable
    if "SwapFree" in mi and mi["SwapFree"] > mi.get("SwapTotal", -1):
        del mi["SwapFree"]
    return mi


def _psi(d: Any) -> dict[str, float | int]:
    out = _numeric_map(d, MAX_COUNTER, 16)
    # some_avg10, full_avg300...: percentages of wall time; *_total_us: counters.
    return {k: v for k, v in out.items() if "_avg" not in k or v <= 100}


def _cpu_list(v: Any, max_vcpus: int) -> list[int]:
    if not isinstance(v, list):
        return []
    return sorted({c for c in v[:MAX_CPUS] if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < max_vcpus})


def sanitize(stats: Any, max_mem_bytes: int | None = None, max_vcpus: int | None = None) -> dict[str, Any]:
    """Keep the parts of an agent ``stats`` answer the daemon understands, within bounds.

    ``max_mem_bytes`` and ``max_vcpus`` are the domain's maximum memory and vCPU count when
    known (libvirt's view): a guest cannot have more.
    """
    if not isinstance(stats, dict):
        raise ValueError("stats answer is not an object")
    ncpu = min(max_vcpus, MAX_CPUS) if max_vcpus and max_vcpus > 0 else MAX_CPUS
    cpus = stats.get("cpus") if isinstance(stats.get("cpus"), dict) else {}
    psi = stats.get("psi") if isinstance(stats.get("psi"), dict) else {}
    load = stats.get("loadavg")
    online = _cpu_list(cpus.get("online"), ncpu)
    loadavg = [_num(x, 0, MAX_LOAD) for x in (load if isinstance(load, list) else [])[:3]]
    return {
        "uptime_s": _num(stats.get("uptime_s"), 0, 1e10),
        "loadavg": loadavg if None not in loadavg else [],  # positional: all three or none
        "meminfo": _meminfo(stats.get("meminfo"), max_mem_bytes),
        "vmstat": _numeric_map(stats.get("vmstat")),
        "psi": {r: _psi(psi.get(r)) for r in ("cpu", "memory", "io")},
        "cpus": {"online": online, "present": _cpu_list(cpus.get("present"), ncpu), "count_online": len(online)},
        "cpu_times": _numeric_map(stats.get("cpu_times"), MAX_COUNTER, 16),
    }
