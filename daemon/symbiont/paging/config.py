"""Config section ``paging:`` of the paging part (discovered by :mod:`symbiont.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from symbiont.config import check as _check


@dataclass
class PagingConfig:
    """Host paging (part 'paging'): the daemon's zram swap tier, page-out, park and wake."""

    enabled: bool = False  # create the swap tier at start (else page-out/park answer 409)
    zram_size_mib: int = 4096  # the tier's disksize: swap slots (uncompressed); at most 2 x the host's memory
    zram_mem_limit_mib: int = 0  # zram's mem_limit: RAM the compressed pages may take; <= half the host's memory;
    # 0: min(zram_size_mib, half the host's memory)
    compressor: str = "lzo-rle"  # zram comp_algorithm (this kernel's list: /sys/block/zram*/comp_algorithm)
    swap_priority: int = 100  # swapon priority: above any other swap, so page-outs land in RAM
    margin_mib: int = 64  # a page-out leaves the guest's working set + this resident
    park_observe_s: float = 3.0  # while parking: how long the paged-out VM runs to show its idle working set
    include_code_cache: bool = True  # park also pages out TCG's translation cache (reported apart)
    include_qemu_heap: bool = True  # park also pages out QEMU's own private anonymous memory (heap, stacks)
    auto_pageout: bool = False  # each period, page out what ballooning left above memory's budget (profile overcommit)
    prefetch: str = "touch"  # wake's prefetch: touch (fault in and map) or willneed (into the swap cache)
    idle_park: bool = False  # park a VM that looked idle for idle_after_s (profile overcommit); needs the tier
    idle_after_s: float = 60.0  # how long a VM must look idle (vCPU, tap traffic, agent requests) to be parked
    idle_cpu_pct: float = 2.0  # idle: its vCPU time stays below this, in % of one core, in every period

    def validate(self, key: str) -> None:
        from symbiont.host import zram

        _check(self.compressor in zram.compressors(), f"{key}.compressor",
               f"{self.compressor!r} is not offered by this kernel's zram (offered: {', '.join(zram.compressors())})")
        _check(self.zram_size_mib >= 16, f"{key}.zram_size_mib", "must be at least 16 MiB")
        _check(self.zram_mem_limit_mib == 0 or self.zram_mem_limit_mib >= 16, f"{key}.zram_mem_limit_mib",
               "must be 0 (derived) or at least 16 MiB")
        if self.enabled:
            import psutil

            total = psutil.virtual_memory().total >> 20
            # A slot costs ~0.4 % of its size even empty (zram's table entry, the swap map), and
            # a same-filled (zero) page costs no RAM: a disksize above the RAM limit is how
            # zero-filled guest pages stay swappable. Twice the host's memory bounds the table
            # (119 MiB of MemAvailable for 24 GiB, measured) and a typo.
            _check(self.zram_size_mib <= 2 * total, f"{key}.zram_size_mib",
                   f"{self.zram_size_mib} MiB exceeds twice this host's memory ({2 * total} MiB): it is the "
                   "tier's swap slots (uncompressed size); the RAM the tier may use is zram_mem_limit_mib")
            _check(self.zram_mem_limit_mib <= total // 2, f"{key}.zram_mem_limit_mib",
                   f"{self.zram_mem_limit_mib} MiB exceeds half of this host's memory ({total // 2} MiB): zram "
                   "keeps the swapped pages in RAM, and pages that do not compress would take their full size, "
                   "leaving too little for the VMs the tier is meant to make room for")
        _check(-1 <= self.swap_priority <= 32767, f"{key}.swap_priority", "must be between -1 and 32767")
        _check(0 <= self.margin_mib <= 1 << 20, f"{key}.margin_mib", "must be between 0 and 1048576")
        _check(0.0 <= self.park_observe_s <= 60.0, f"{key}.park_observe_s", "must be between 0 and 60 seconds")
        _check(1.0 <= self.idle_after_s <= 365 * 86400.0, f"{key}.idle_after_s",
               "must be between 1 second and a year")
        _check(0.0 < self.idle_cpu_pct <= 100.0, f"{key}.idle_cpu_pct", "must be above 0 and at most 100 (% of one core)")
        _check(self.prefetch in ("touch", "willneed"), f"{key}.prefetch", "must be touch or willneed")

    def mem_limit_bytes(self, mem_total_bytes: int) -> int:
        """zram's ``mem_limit``: the key, or (0) the tier's size capped at half the host's memory."""
        if self.zram_mem_limit_mib:
            return self.zram_mem_limit_mib << 20
        return min(self.zram_size_mib << 20, (mem_total_bytes // 2) >> 20 << 20)


CONFIG = PagingConfig
