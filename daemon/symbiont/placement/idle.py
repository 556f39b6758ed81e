"""Idle-VM consolidation (seeds/004, "Page out idle VMs"): detect idleness, shrink an idle VM to
its minimal working set, park it on a designated idle host, and bring it back when it wakes.

Why: testbeds and clouds keep many VMs that sit idle for long stretches. An idle Linux VM touches
only a few MiB (seeds/004 measured 1.8 MB for an idle VM, 3.2 MB for an idle ssh session, 31.6 MB
while receiving an scp), so its allocation can shrink to its working set plus a margin, and it
can move to a dense "idle host" so that its regular host serves active VMs or powers down.

Idleness (the seed's heuristic, "the VM doesn't use its scheduling quantum entirely"): CPU
utilisation of its allocation below ``cpu_threshold`` in every one of the last ``window``
samples, and an estimated working set at most ``wss_max_mib``. Waking: the newest CPU sample at or
above ``wake_cpu``, or any pending activity event (e.g. a packet for it, which the seed's
"timely response" serves by swapping in the predicted working set before delivery).

Samples: the CPU samples and working set are those the VM's current host took since the VM
arrived there. The host daemon's inventory cuts its stored history at the VM's registration on
that host (:meth:`symbiont.placement.part.PlacementPart.inventory`): a move unregisters the VM
at the source and registers it at the destination, so the registration time is exactly "since it
(re)arrived", on the same clock as the samples. The controller's journal would be the other
candidate, but it knows only the moves it made itself and runs on another host's clock. Without
the cut, a woken VM moved home was idle again at once on the samples from before it was parked.

A shrink smaller than ``min_shrink_mib`` is not planned for a VM that stays where it is: a parked
VM whose working set drifts by a MiB was shrunk 130 -> 129 MiB round after round (a balloon step
and a journal entry each time, for nothing). A VM that moves to the idle host still gets its
shrink, however small: the shrunk size that its move carries is what parks it (the destination
records its home and full size).

All sizes are MiB. The plan is a list of actions for the controller (balloon to a size, migrate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from symbiont.memory.floor import DEFAULT_RESERVE_MIB, guest_floor
from symbiont.placement.model import fmt


@dataclass(frozen=True)
class IdleConfig:
    cpu_threshold: float = 0.05
    window: int = 12
    wss_max_mib: float = 64.0
    margin: float = 0.25
    min_mem_mib: float = 64.0
    wake_cpu: float = 0.20
    # Wake on the newest ``wake_samples`` CPU samples all at or above ``wake_cpu``: one sample can
    # be noise (an idle TCG guest on a saturated host showed 0.23 and was moved home for nothing).
    wake_samples: int = 1
    min_shrink_mib: float = 8.0  # smallest shrink worth a balloon step for a VM that stays put

    def __post_init__(self) -> None:
        if not 0 < self.cpu_threshold < 1:
            raise ValueError(f"cpu_threshold must be in (0, 1), got {self.cpu_threshold}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.margin < 0 or self.wss_max_mib <= 0 or self.min_mem_mib <= 0:
            raise ValueError("margin must be >= 0, wss_max_mib and min_mem_mib > 0")
        if not (math.isfinite(self.min_shrink_mib) and self.min_shrink_mib >= 0):
            raise ValueError(f"min_shrink_mib must be a number >= 0, got {self.min_shrink_mib}")
        if self.wake_samples < 1:
            raise ValueError(f"wake_samples must be at least 1, got {self.wake_samples}")
        if not self.cpu_threshold <= self.wake_cpu <= 1:
            raise ValueError("wake_cpu must be in [cpu_threshold, 1] (otherwise a VM wakes while idle)")


@dataclass(frozen=True)
class VMActivity:
    """What the daemon knows about a VM: where it runs, its memory, CPU samples (fraction of its
    allocation, oldest first), working-set estimate, and its full-size memory and home host
    (``home_mem_mib``/``home``; default: the current ones) to restore on wake-up."""

    id: str
    host: str
    mem_mib: float
    cpu: Sequence[float]
    wss_mib: float
    home: str | None = None
    home_mem_mib: float | None = None
    events: int = 0
    min_mib: float | None = None  # the VM's own floor (its registration's memory.min_mib)
    reserve_mib: float | None = None  # its guest kernel's reserve (boot − MemTotal), if measured
    floor_mib: float | None = None  # its daemon's guest floor (symbiont.memory.floor), if known

    def __post_init__(self) -> None:
        if self.mem_mib <= 0 or self.wss_mib < 0:
            raise ValueError(f"{self.id}: mem_mib must be > 0 and wss_mib >= 0")
        if any(not (0 <= c <= 1.0 + 1e-9) for c in self.cpu):
            raise ValueError(f"{self.id}: CPU samples must be fractions in [0, 1]")


@dataclass(frozen=True)
class Action:
    """One step for the controller: ``shrink``/``grow`` (balloon to ``mem_to``), ``move`` (migrate
    ``src`` -> ``dst``), or ``stay`` (idle, but no room on the idle host; informational)."""

    kind: str
    vm: str
    reason: str
    src: str | None = None
    dst: str | None = None
    mem_from: float | None = None
    mem_to: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def idle_run(cpu: Sequence[float], threshold: float) -> int:
    """Length of the newest run of samples below ``threshold`` (how long the VM has been idle)."""
    arr = np.asarray(cpu, dtype=float)
    above = np.flatnonzero(arr >= threshold)
    return int(arr.size if above.size == 0 else arr.size - 1 - above[-1])


def is_idle(vm: VMActivity, cfg: IdleConfig) -> tuple[bool, str]:
    """(idle?, why) by the CPU-window and working-set rule in the module docstring."""
    if len(vm.cpu) < cfg.window:
        return False, f"only {len(vm.cpu)} of {cfg.window} CPU samples"
    run = idle_run(vm.cpu, cfg.cpu_threshold)
    if run < cfg.window:
        return False, f"CPU at or above {fmt(cfg.cpu_threshold)} within the last {cfg.window} samples"
    if vm.wss_mib > cfg.wss_max_mib:
        return False, f"working set {fmt(vm.wss_mib)} MiB above {fmt(cfg.wss_max_mib)} MiB"
    if vm.events:
        return False, f"{vm.events} pending activity events"
    return True, (f"CPU below {fmt(cfg.cpu_threshold)} for {run} samples, working set {fmt(vm.wss_mib)} MiB")


def target_mem(vm: VMActivity, cfg: IdleConfig) -> float:
    """Shrunk balloon target: the guest kernel's reserve + working set × (1 + margin), rounded
    up to a MiB — the working set is guest memory in use, counted against MemTotal, which is
    already net of the reserve the balloon target includes — and never below ``min_mem_mib``,
    the VM's own floor or its guest floor (:func:`symbiont.memory.floor.guest_floor`: reserve
    + used + watermark margin, the measured absolute floor), nor above the current allocation."""
    reserve = vm.reserve_mib if vm.reserve_mib is not None else DEFAULT_RESERVE_MIB
    boot = vm.home_mem_mib if vm.home_mem_mib is not None else vm.mem_mib
    safe = guest_floor(boot, reserve, vm.wss_mib, vm.min_mib).floor_mib
    floor = max(cfg.min_mem_mib, vm.min_mib or 0.0, vm.floor_mib or 0.0, safe)
    return float(min(vm.mem_mib, max(floor, math.ceil(reserve + vm.wss_mib * (1 + cfg.margin)))))


def consolidation_plan(
    vms: Sequence[VMActivity],
    idle_host: str,
    idle_host_free_mib: float,
    cfg: IdleConfig | None = None,
) -> list[Action]:
    """Shrink every idle VM to its working set and move as many as fit to ``idle_host``.

    VMs idle longest go first (most likely to stay idle); ties by smaller target, then id. A VM
    that does not fit on the idle host is still shrunk where it is (the memory is freed anyway).
    A VM that stays where it is is shrunk only by at least ``min_shrink_mib``.
    """
    cfg = cfg or IdleConfig()
    if idle_host_free_mib < 0:
        raise ValueError("idle_host_free_mib must be >= 0")
    _unique(vms)
    cands = []
    for vm in vms:
        ok, why = is_idle(vm, cfg)
        if ok:
            cands.append((vm, why))
    cands.sort(key=lambda c: (-idle_run(c[0].cpu, cfg.cpu_threshold), target_mem(c[0], cfg), c[0].id))
    free = float(idle_host_free_mib)
    actions: list[Action] = []
    for vm, why in cands:
        tgt = target_mem(vm, cfg)
        moves = vm.host != idle_host and tgt <= free + 1e-9
        if tgt < vm.mem_mib and (moves or vm.mem_mib - tgt >= cfg.min_shrink_mib - 1e-9):
            actions.append(
                Action("shrink", vm.id, f"idle: {why}", src=vm.host, mem_from=vm.mem_mib, mem_to=tgt)
            )
        if vm.host == idle_host:
            continue
        if moves:
            free -= tgt
            actions.append(
                Action(
                    "move",
                    vm.id,
                    f"idle: consolidate on {idle_host} ({fmt(free)} MiB left there)",
                    src=vm.host,
                    dst=idle_host,
                    mem_to=tgt,
                )
            )
        else:
            actions.append(
                Action(
                    "stay",
                    vm.id,
                    f"idle host {idle_host} full: needs {fmt(tgt)} MiB, {fmt(free)} free",
                    src=vm.host,
                )
            )
    return actions


def wake_plan(
    vms: Sequence[VMActivity],
    idle_host: str,
    free_mib: Mapping[str, float],
    cfg: IdleConfig | None = None,
) -> list[Action]:
    """For VMs on ``idle_host`` that show activity: grow back to full size and move to a host with
    room — home if it has room, else the host whose free memory fits it most tightly (best fit on
    memory). ``free_mib`` is the free memory of each regular host (after overcommit)."""
    cfg = cfg or IdleConfig()
    _unique(vms)
    free = {h: float(v) for h, v in free_mib.items()}
    actions: list[Action] = []
    for vm in sorted(vms, key=lambda v: v.id):
        if vm.host != idle_host:
            continue
        recent = list(vm.cpu[-cfg.wake_samples :])
        if vm.events:
            why = f"{vm.events} activity events"
        elif len(recent) >= cfg.wake_samples and min(recent) >= cfg.wake_cpu:
            why = f"CPU {fmt(recent[-1])} >= {fmt(cfg.wake_cpu)}" + (
                f" in the last {cfg.wake_samples} samples" if cfg.wake_samples > 1 else ""
            )
        else:
            continue
        full = vm.home_mem_mib if vm.home_mem_mib is not None else vm.mem_mib
        home = vm.home
        if home is not None and home not in free:
            raise ValueError(f"{vm.id}: unknown home host {home!r}")
        if home is not None and free[home] >= full - 1e-9:
            dst: str | None = home
        else:
            fitting = [(f - full, h) for h, f in free.items() if f >= full - 1e-9]
            dst = min(fitting)[1] if fitting else None
        if dst is None:
            actions.append(
                Action(
                    "grow",
                    vm.id,
                    f"awake ({why}); no host has {fmt(full)} MiB free, grow in place on {idle_host}",
                    src=idle_host,
                    mem_from=vm.mem_mib,
                    mem_to=full,
                )
            )
            continue
        free[dst] -= full
        actions.append(Action("move", vm.id, f"awake ({why}); back to {dst}", src=idle_host, dst=dst))
        if full > vm.mem_mib:
            actions.append(
                Action(
                    "grow",
                    vm.id,
                    f"awake: restore full size on {dst}",
                    src=dst,
                    mem_from=vm.mem_mib,
                    mem_to=full,
                )
            )
    return actions


def _unique(vms: Sequence[VMActivity]) -> None:
    seen: set[str] = set()
    for v in vms:
        if v.id in seen:
            raise ValueError(f"VM {v.id!r} listed twice")
        seen.add(v.id)
