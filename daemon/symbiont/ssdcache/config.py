"""Config section ``ssdcache:`` of the ssdcache part (discovered by :mod:`symbiont.config`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from symbiont.config import _check


@dataclass
class SsdCacheConfig:
    """Elastic SSD caches (part 'ssdcache'); the pool itself is created through the API."""

    runtime_dir: str = ""  # NBD sockets; empty: /run/symbiont/ssdcache/<hash of state_dir>
    release_timeout_s: float = 3.0  # how long a guest may take to choose blocks to give back
    pool_dir: str = ""  # the only folder pool files may be in; empty: <state_dir>/ssdcache-pools
    # Block devices the API may turn into a pool (paths or globs, e.g. /dev/nvme1n1); empty: none.
    # A device is refused anyway while it or a partition is mounted, held or swap.
    allowed_devices: list[str] = field(default_factory=list)
    max_caches: int = 64  # registered caches at most
    size_overcommit: float = 4.0  # the caches' sizes may total at most this × the pool
    reserve_free_mib: int = 1024  # a new pool file must fit in the free space and leave this much

    def validate(self, key: str) -> None:
        _check(not self.runtime_dir or os.path.isabs(self.runtime_dir), f"{key}.runtime_dir",
               "must be an absolute path (or empty for the default)")
        _check(0.1 <= self.release_timeout_s <= 600, f"{key}.release_timeout_s", "must be between 0.1 and 600")
        _check(not self.pool_dir or os.path.isabs(self.pool_dir), f"{key}.pool_dir",
               "must be an absolute path (or empty for the default)")
        _check(not self.pool_dir or self.pool_dir.rstrip("/") != "", f"{key}.pool_dir", "must not be /")
        _check(isinstance(self.allowed_devices, list)
               and all(isinstance(d, str) and d.startswith("/dev/") for d in self.allowed_devices),
               f"{key}.allowed_devices", "must be a list of /dev/ paths or globs")
        _check(1 <= self.max_caches <= 4096, f"{key}.max_caches", "must be between 1 and 4096")
        _check(1.0 <= self.size_overcommit <= 64.0, f"{key}.size_overcommit", "must be between 1 and 64")
        _check(0 <= self.reserve_free_mib <= 1 << 24, f"{key}.reserve_free_mib", "must be between 0 and 16777216")


CONFIG = SsdCacheConfig
