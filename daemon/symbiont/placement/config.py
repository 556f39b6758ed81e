"""Config section ``placement:`` of the placement part (discovered by :mod:`symbiont.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from symbiont.config import ConfigError, _check


@dataclass
class PlacementConfig:
    """Cluster placement (part 'placement'): this host's id, the hosts plans may move VMs between."""

    host_id: str = ""  # this daemon's host in plans; empty: the hosts entry with our libvirt_uri, else hostname
    hosts: list[dict[str, Any]] = field(default_factory=list)  # [{id, libvirt_uri, daemon, migrate_uri}]
    overcommit: dict[str, float] = field(default_factory=dict)  # per resource (cpu, mem) for live inventories
    migrate_unsafe: bool = False  # VIR_MIGRATE_UNSAFE: disks are shared, but not on a file system libvirt knows
    history_samples: int = 60  # samples per VM fed to the hotspot and idle detectors

    def validate(self, key: str) -> None:
        from symbiont.placement.execute import parse_hosts

        try:
            parse_hosts(self.hosts, f"{key}.hosts")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check(isinstance(self.overcommit, dict), f"{key}.overcommit", "must be a mapping resource: ratio")
        for r, v in self.overcommit.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100
            _check(ok, f"{key}.overcommit.{r}", f"must be a ratio in (0, 100], got {v!r}")
        _check(1 <= self.history_samples <= 10_000, f"{key}.history_samples", "must be between 1 and 10000")


CONFIG = PlacementConfig
