"""Cache-size policies (pure): how many 1 MiB blocks each VM's elastic SSD gets.

Two policies from SymFlex:

* :func:`share_allocation` — *share-based cache allocation*: the pool (or the part of it the
  operator hands out) is split in proportion to each VM's weight, after every VM got its
  minimum, never above a VM's maximum (its registered ``size``, or less) — weighted max-min
  fairness by water-filling, with largest-remainder rounding to whole blocks.
* :func:`throughput_proportional` — *cache allocation with proportionate throughput*: the
  sizes are moved, a step per period, so that the VMs' measured throughputs approach a target
  ratio (e.g. 1:1:1 — equal throughput whatever the workloads' cache appetite): a VM whose
  share of the total throughput is below its target share gets blocks from those above theirs.

Every function returns its decision together with the inputs that explain it; nothing here
does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class PolicyError(ValueError):
    """The inputs cannot be satisfied (e.g. the minimums exceed the capacity)."""


@dataclass(frozen=True)
class Demand:
    """One VM's cache as a policy sees it (all in blocks)."""

    vm: str
    weight: float = 1.0
    min_blocks: int = 0
    max_blocks: int = 0  # the VM's registered size, or a lower cap

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise PolicyError(f"{self.vm}: weight must be positive")
        if not 0 <= self.min_blocks <= self.max_blocks:
            raise PolicyError(f"{self.vm}: need 0 <= min ({self.min_blocks}) <= max ({self.max_blocks})")


def _round_preserving(values: Mapping[str, float], total: int, lo: Mapping[str, int], hi: Mapping[str, int]) -> dict[str, int]:
    """Round to integers summing to ``total`` (largest remainder), each within [lo, hi]."""
    out = {k: max(lo[k], min(hi[k], int(v))) for k, v in values.items()}
    left = total - sum(out.values())
    order = sorted(values, key=lambda k: (-(values[k] - int(values[k])), k))
    while left > 0:
        moved = False
        for k in order:
            if left and out[k] < hi[k]:
                out[k] += 1
                left -= 1
                moved = True
        if not moved:
            break
    while left < 0:
        moved = False
        for k in reversed(order):
            if left and out[k] > lo[k]:
                out[k] -= 1
                left += 1
                moved = True
        if not moved:
            break
    return out


def share_allocation(capacity: int, demands: list[Demand]) -> dict[str, int]:
    """Blocks per VM: minimums first, the rest in proportion to weight, capped at each maximum.

    The result sums to ``min(capacity, Σ max)``. Raises PolicyError when the minimums alone
    exceed the capacity.
    """
    if capacity < 0:
        raise PolicyError("capacity must not be negative")
    names = [d.vm for d in demands]
    if len(set(names)) != len(names):
        raise PolicyError("duplicate VM in demands")
    if not demands:
        return {}
    lo = {d.vm: d.min_blocks for d in demands}
    hi = {d.vm: d.max_blocks for d in demands}
    if sum(lo.values()) > capacity:
        raise PolicyError(f"minimums ({sum(lo.values())} blocks) exceed the capacity ({capacity})")
    total = min(capacity, sum(hi.values()))
    alloc = {d.vm: float(d.min_blocks) for d in demands}
    active = {d.vm: d for d in demands if d.max_blocks > d.min_blocks}
    left = float(total - sum(lo.values()))
    # Water-filling: hand out what is left in proportion to weight; a VM that reaches its
    # maximum drops out and its surplus goes round again.
    while left > 1e-9 and active:
        wsum = sum(d.weight for d in active.values())
        capped = []
        for vm, d in active.items():
            give = left * d.weight / wsum
            if alloc[vm] + give >= d.max_blocks:
                capped.append(vm)
        if not capped:
            for vm, d in active.items():
                alloc[vm] += left * d.weight / wsum
            left = 0.0
            break
        for vm in capped:
            left -= hi[vm] - alloc[vm]
            alloc[vm] = float(hi[vm])
            del active[vm]
    return _round_preserving(alloc, total, lo, hi)


def throughput_proportional(
    capacity: int,
    current: Mapping[str, int],
    throughput: Mapping[str, float],
    target_ratio: Mapping[str, float],
    demands: list[Demand],
    gain: float = 0.5,
    max_step: int | None = None,
    state: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """One control step toward throughputs in ``target_ratio``.

    ``error_i = target_share_i − measured_share_i``; each VM's size moves by
    ``gain · scale_i · error_i · capacity`` blocks (at most ``max_step`` per VM), the moves
    are made to sum to zero, sizes are kept within [min, max], and the total stays within
    ``capacity``. ``scale_i`` damps oscillation: it halves each time VM i's error changes sign
    (throughput is very sensitive to size near a working set's knee) and recovers by 25 % per
    step in the same direction. The caller passes back ``why["state"]`` as ``state`` (the
    function itself keeps nothing). Returns the new sizes and an explanation.
    """
    if not 0 < gain <= 1:
        raise PolicyError("gain must be in (0, 1]")
    vms = [d.vm for d in demands]
    for vm in vms:
        if vm not in current or vm not in throughput or vm not in target_ratio:
            raise PolicyError(f"{vm}: needs a current size, a throughput and a target ratio")
        if target_ratio[vm] <= 0:
            raise PolicyError(f"{vm}: target ratio must be positive")
        if throughput[vm] < 0:
            raise PolicyError(f"{vm}: throughput must not be negative")
    lo = {d.vm: d.min_blocks for d in demands}
    hi = {d.vm: d.max_blocks for d in demands}
    tsum = sum(throughput[vm] for vm in vms)
    rsum = sum(target_ratio[vm] for vm in vms)
    target_share = {vm: target_ratio[vm] / rsum for vm in vms}
    if tsum <= 0:
        # Nothing measured yet: no evidence to move on.
        new = {vm: max(lo[vm], min(hi[vm], int(current[vm]))) for vm in vms}
        return new, {"reason": "no throughput measured", "target_share": target_share}
    share = {vm: throughput[vm] / tsum for vm in vms}
    error = {vm: target_share[vm] - share[vm] for vm in vms}
    prev = state or {}
    new_state: dict[str, dict[str, float]] = {}
    for vm in vms:
        sign = (error[vm] > 0) - (error[vm] < 0)
        scale = float(prev.get(vm, {}).get("scale", 1.0))
        psign = int(prev.get(vm, {}).get("sign", 0))
        if sign and psign and sign != psign:
            scale = max(0.05, scale * 0.5)
        elif sign and sign == psign:
            scale = min(1.0, scale * 1.25)
        new_state[vm] = {"scale": scale, "sign": sign or psign}
    step = {vm: gain * new_state[vm]["scale"] * error[vm] * capacity for vm in vms}
    if max_step is not None:
        step = {vm: max(-max_step, min(max_step, s)) for vm, s in step.items()}
    mean = sum(step.values()) / len(vms)
    step = {vm: s - mean for vm, s in step.items()}
    want = {vm: min(hi[vm], max(lo[vm], current[vm] + step[vm])) for vm in vms}
    total = min(capacity, round(sum(want.values())), sum(hi.values()))
    total = max(total, sum(lo.values()))
    if sum(lo.values()) > capacity:
        raise PolicyError("minimums exceed the capacity")
    new = _round_preserving(want, min(total, capacity), lo, hi)
    return new, {
        "measured_share": share, "target_share": target_share, "error": error,
        "step": {vm: round(s, 2) for vm, s in step.items()}, "capacity": capacity, "state": new_state,
    }


def moves(current: Mapping[str, int], target: Mapping[str, int]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split a reallocation into deflations (done first, to free blocks) and inflations."""
    shrink = [(vm, target[vm]) for vm in sorted(target) if target[vm] < current.get(vm, 0)]
    grow = [(vm, target[vm]) for vm in sorted(target) if target[vm] > current.get(vm, 0)]
    return shrink, grow
