"""Profiles: named sets of config defaults that turn several parts on together (like tuned's
profiles). A profile is data: the keys it sets, applied *before* the user's own keys (the
user's keys win). ``profile: overcommit`` in the config, or ``symbiontd --profile overcommit``
(which overrides the config's), is all a user writes; ``symbiontd --print-default-config
--profile overcommit`` prints the result.

``overcommit`` follows the order of seeds/002 (ESX): sharing first (dedup: hint-driven KSM),
then ballooning (memory: the ESX policy under one host memory budget, derived from the host's
memory), then host paging (paging: a zram tier sized from the host's memory, slots for all of
it and RAM for a quarter, paging out only what the balloon could not reclaim within the
budget; the paging part requires memory and runs after it each period), and idle VMs parked
(paged out and paused) until a request wakes them (``paging.idle_park``, docs/paging.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from symbiont.config import ConfigError, merge_dicts


@dataclass(frozen=True)
class HostShare:
    """A size in MiB, a share of this host's memory, computed when the profile is applied."""

    fraction: float
    min_mib: int = 16

    def mib(self, mem_total_bytes: int) -> int:
        return max(self.min_mib, int(mem_total_bytes * self.fraction) >> 20)


@dataclass(frozen=True)
class Profile:
    doc: str
    defaults: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "overcommit": Profile(
        doc="every memory lever under one budget: KSM hints, then ballooning, then host paging",
        defaults={
            "dedup": {"policy": "hint"},
            "memory": {"enabled": True, "budget_mib": 0},  # 0: host MemTotal − memory.reserve_mib
            # idle_cpu_pct 5: an idle TCG guest polled every period uses 2.7 % (peak 3.5 %) of a core
            # (docs/paging.md), so the part's default of 2 would never park one here.
            "paging": {"enabled": True, "auto_pageout": True, "idle_park": True, "idle_cpu_pct": 5.0,
                       # Slots apart from RAM: ~half of what the tier stores at density is zero-filled
                       # 4 KiB subpages of THP-backed guest RAM (no RAM, one slot each; docs/paging.md).
                       "zram_size_mib": HostShare(1.0), "zram_mem_limit_mib": HostShare(0.25)},
        },
    ),
}


def _host_mem_total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _resolve(value: Any, mem_total: int) -> Any:
    if isinstance(value, HostShare):
        return value.mib(mem_total)
    if isinstance(value, dict):
        return {k: _resolve(v, mem_total) for k, v in value.items()}
    return value


def defaults(name: str, mem_total_bytes: int | None = None) -> dict[str, Any]:
    """The config keys profile ``name`` sets, sizes resolved against the host's memory."""
    prof = PROFILES.get(name)
    if prof is None:
        raise ConfigError(f"profile: no profile {name!r} (known: {', '.join(sorted(PROFILES))})")
    return _resolve(prof.defaults, mem_total_bytes if mem_total_bytes is not None else _host_mem_total())


def apply(data: dict[str, Any], mem_total_bytes: int | None = None) -> dict[str, Any]:
    """The config data with its profile's defaults under it (the user's keys win)."""
    name = data.get("profile")
    if name in (None, ""):
        return data
    if not isinstance(name, str):
        raise ConfigError(f"profile: must be a profile name (known: {', '.join(sorted(PROFILES))})")
    return merge_dicts(defaults(name, mem_total_bytes), data)
