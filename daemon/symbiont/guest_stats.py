"""Validation of what a guest reports: the guest is untrusted.

Only known sections and numeric values pass; sizes are bounded; anything else is dropped.
The daemon stores and acts on the sanitised copy only.
"""

from __future__ import annotations

import math
from typing import Any

MAX_KEYS = 256
MAX_CPUS = 4096


def _num(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, int) and not -(2**63) <= v < 2**63:
        return None
    return v


def _numeric_map(d: Any, max_keys: int = MAX_KEYS) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    if not isinstance(d, dict):
        return out
    for k, v in list(d.items())[:max_keys]:
        n = _num(v)
        if isinstance(k, str) and len(k) <= 64 and n is not None:
            out[k] = n
    return out


def _cpu_list(v: Any) -> list[int]:
    if not isinstance(v, list):
        return []
    return sorted({c for c in v[:MAX_CPUS] if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_CPUS})


def sanitize(stats: Any) -> dict[str, Any]:
    """Keep the parts of an agent ``stats`` answer the daemon understands."""
    if not isinstance(stats, dict):
        raise ValueError("stats answer is not an object")
    cpus = stats.get("cpus") if isinstance(stats.get("cpus"), dict) else {}
    psi = stats.get("psi") if isinstance(stats.get("psi"), dict) else {}
    load = stats.get("loadavg")
    online = _cpu_list(cpus.get("online"))
    return {
        "uptime_s": _num(stats.get("uptime_s")),
        "loadavg": [x for x in (load if isinstance(load, list) else [])[:3] if _num(x) is not None],
        "meminfo": _numeric_map(stats.get("meminfo")),
        "vmstat": _numeric_map(stats.get("vmstat")),
        "psi": {r: _numeric_map(psi.get(r), 16) for r in ("cpu", "memory", "io")},
        "cpus": {"online": online, "present": _cpu_list(cpus.get("present")), "count_online": len(online)},
        "cpu_times": _numeric_map(stats.get("cpu_times"), 16),
    }
