"""The lowest balloon target a guest survives: one floor for every path that sets a balloon.

Why: a balloon target is in terms of the *domain's* memory (boot memory − balloon), but what a
guest reports — MemTotal, MemAvailable — is already net of what its kernel keeps for itself
(kernel code and data, memmap, reserved ranges: ``boot − MemTotal`` at full size, 40-45 MiB
on a 512 MiB lab guest). An idle plan that shrank a 512 MiB guest to 1.25 × its ``used``
(75 MiB) left it 32 MiB of MemTotal for 60 MiB of used memory, and the guest kernel panicked
("System is deadlocked on memory"). So a safe target is

    floor = max(absolute, reserve + used + margin)

* ``reserve``: boot − MemTotal at full balloon. With virtio-balloon *without*
  ``deflate-on-oom`` (our lab domains) the guest driver takes inflated pages out of managed
  memory (``adjust_managed_page_count``), so MemTotal shrinks with the balloon and
  ``actual − MemTotal`` equals the reserve at any balloon size; with ``deflate-on-oom`` MemTotal
  stays put and ``boot − MemTotal`` is the reserve. The daemon records the reserve from the
  first sample after registration at which the balloon is at rest.
* ``used``: MemTotal − MemAvailable, what the guest cannot give up without swap.
* ``margin``: ``WATERMARK_K × min_free_kbytes`` keeps free memory above the kernel's high
  watermark (1.5 × min, where kswapd stops; below min every allocation stalls in direct
  reclaim), plus ``FIXED_MARGIN_MIB`` for what ``used`` does not count but a live guest needs
  resident: the file-backed code of systemd, the agent's interpreter and libraries (counted as
  "available" page cache, yet thrashed to death if reclaimed) and the agent's own transient
  allocations while it serves an op.
* ``absolute``: the smallest target at which the lab guest (Debian bookworm, cloud kernel,
  512 MiB, the agent running) was measured to stay alive with its agent answering, rounded up
  (see docs/memory.md for the measurement).

The functions are pure; the memory part's ``floor(vm)`` applies them to the core's latest snapshot.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

# Measured on the lab guest (docs/memory.md "The guest's floor"): below this the guest dies.
ABSOLUTE_FLOOR_MIB = 128.0
# boot − MemTotal of the lab guest at full size was 43 MiB; assumed when nothing was sampled.
DEFAULT_RESERVE_MIB = 48.0
WATERMARK_K = 2.0
FIXED_MARGIN_MIB = 32.0
MIB = 1 << 20


@dataclass(frozen=True)
class GuestFloor:
    """A floor and what it is made of (MiB), for the reason an API error or a decision gives."""

    floor_mib: int
    reserve_mib: float
    used_mib: float | None
    margin_mib: float
    absolute_mib: float
    boot_mib: float | None = None

    def reason(self) -> str:
        used = "unknown (no guest sample)" if self.used_mib is None else f"{self.used_mib:.0f}"
        cap = f"; capped at boot memory {self.boot_mib:.0f}" if self.boot_mib is not None and \
            self.floor_mib >= self.boot_mib else ""
        return (f"guest floor {self.floor_mib} MiB = max(absolute {self.absolute_mib:.0f}, kernel reserve "
                f"{self.reserve_mib:.0f} + used {used} + margin {self.margin_mib:.0f}){cap}")

    def to_dict(self) -> dict[str, Any]:
        return {"floor_mib": self.floor_mib, "reserve_mib": round(self.reserve_mib, 1),
                "used_mib": None if self.used_mib is None else round(self.used_mib, 1),
                "margin_mib": round(self.margin_mib, 1), "absolute_mib": self.absolute_mib,
                "reason": self.reason()}


MAX_MIB = float(1 << 32)  # 4 PiB: larger (or non-finite) sizes are nonsense, not arithmetic


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return min(float(x), MAX_MIB)


def min_free_kbytes(managed_kib: float) -> int:
    """The kernel's default ``vm.min_free_kbytes`` for this much memory (mm/page_alloc.c:
    ``int_sqrt(lowmem_kbytes * 16)`` clamped to [128, 262144]); the agent does not report it,
    and the default is what our guests run with."""
    return int(min(262144, max(128, math.isqrt(max(0, int(managed_kib)) * 16))))


def kernel_reserve_mib(boot_mib: float, actual_mib: float | None, memtotal_mib: float,
                       deflate_on_oom: bool = False) -> float:
    """What the guest kernel keeps below MemTotal, in [0, boot]: ``actual − MemTotal`` where
    MemTotal shrinks with the balloon (the default), ``boot − MemTotal`` with deflate-on-oom."""
    base = boot_mib if deflate_on_oom or actual_mib is None else actual_mib
    return float(min(max(base - memtotal_mib, 0.0), max(boot_mib, 0.0)))


def margin_mib(memtotal_full_mib: float) -> float:
    """``WATERMARK_K × min_free_kbytes`` (of the guest's memory at full size) + ``FIXED_MARGIN_MIB``."""
    return WATERMARK_K * min_free_kbytes(memtotal_full_mib * 1024) / 1024 + FIXED_MARGIN_MIB


def guest_floor(boot_mib: float | None, reserve_mib: float | None, used_mib: float | None,
                min_mib: float | None = None, absolute_mib: float = ABSOLUTE_FLOOR_MIB) -> GuestFloor:
    """The lowest safe balloon target: ``max(absolute, min_mib, reserve + used + margin)``,
    never above the boot memory (a VM whose needs exceed it is simply not shrunk). Unknown or
    absurd inputs (NaN, negative, above the boot memory) are bounded, never trusted: the guest
    reports ``used``. Pure."""
    return GuestFloor(*_floor(boot_mib, reserve_mib, used_mib, min_mib, absolute_mib))


def floor_mib(boot_mib: float | None, reserve_mib: float | None, used_mib: float | None,
              min_mib: float | None = None) -> int:
    """:func:`guest_floor`'s number alone (the policy calls it for every VM every period)."""
    return _floor(boot_mib, reserve_mib, used_mib, min_mib, ABSOLUTE_FLOOR_MIB)[0]


@functools.lru_cache(maxsize=1024)
def _margin_cached(full_mib: float) -> float:
    return margin_mib(full_mib)


def _floor(boot_mib: float | None, reserve_mib: float | None, used_mib: float | None, min_mib: float | None,
           absolute_mib: float) -> tuple[int, float, float | None, float, float, float | None]:
    boot = _finite(boot_mib)
    boot = boot if boot is not None and boot > 0 else None
    reserve = _finite(reserve_mib)
    reserve = DEFAULT_RESERVE_MIB if reserve is None or reserve < 0 else reserve
    used = _finite(used_mib)
    used = None if used is None else max(0.0, used)
    if boot is not None:
        reserve = min(reserve, boot)
        used = None if used is None else min(used, boot)
    full = (boot if boot is not None else 512.0) - reserve
    margin = _margin_cached(max(full, 0.0))
    need = reserve + (used or 0.0) + margin
    floor = math.ceil(max(absolute_mib, _finite(min_mib) or 0.0, need))
    if boot is not None:
        floor = min(floor, math.floor(boot))
    return int(floor), reserve, used, margin, absolute_mib, boot


def clamp_target(target_mib: float, floor: GuestFloor) -> float:
    """A target raised to the floor (for plans that pick a size; the API refuses instead)."""
    return float(max(target_mib, floor.floor_mib))


# -- the daemon's view -------------------------------------------------------------------------


def observed_reserve_mib(snap: dict[str, Any]) -> float | None:
    """The kernel reserve from one snapshot, or None while the balloon moves (``actual``
    differs from libvirt's target: guest MemTotal and QEMU's ``actual`` are then read at
    different moments of the inflation) or the guest has not reported."""
    lv = snap.get("libvirt") or {}
    mi = (snap.get("agent") or {}).get("meminfo") or {}
    boot = _finite(lv.get("max_memory_mib"))
    total = _finite(mi.get("MemTotal"))
    actual_kib = _finite((lv.get("memstats_kib") or {}).get("actual"))
    target = _finite(lv.get("memory_mib"))
    if boot is None or boot <= 0 or total is None or total <= 0 or actual_kib is None or target is None:
        return None
    actual = actual_kib / 1024
    if abs(actual - target) > 1:
        return None
    return kernel_reserve_mib(boot, actual, total / MIB)


def floor_of(snap: Any, reserve_mib: float | None, mem_policy: dict[str, Any] | None = None) -> GuestFloor:
    """The floor of a VM from the core's latest snapshot and the kernel reserve the memory part
    recorded (:meth:`MemoryPart.record_reserves`), else the one observable now."""
    lv = snap.get("libvirt") or {}
    mi = (snap.get("agent") or {}).get("meminfo") or {}
    reserve = reserve_mib if reserve_mib is not None else observed_reserve_mib(snap)
    total, avail = _finite(mi.get("MemTotal")), _finite(mi.get("MemAvailable"))
    used = (total - avail) / MIB if total is not None and avail is not None else None
    mem = mem_policy or {}
    return guest_floor(_finite(lv.get("max_memory_mib")), reserve, used, _finite(mem.get("min_mib")))


def enforce_floor(fl: GuestFloor, snap: Any, name: str, target_mib: int) -> int:
    """The lower bound every balloon path checks a target against: the VM's guest floor, or
    the target itself when it grows a guest that sits below its floor (a grow never hurts).
    Raises :class:`symbiont.errors.Invalid` with the floor's make-up when a shrink goes below."""
    from symbiont.errors import Invalid

    if target_mib >= fl.floor_mib:
        return fl.floor_mib
    lv = (snap or {}).get("libvirt") or {}
    current = _finite(lv.get("memory_mib"))
    if current is not None and target_mib > current:
        return int(target_mib)
    raise Invalid(f"target_mib {target_mib} below the safe floor of VM {name!r}: {fl.reason()}")
