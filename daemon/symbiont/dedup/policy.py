"""KSM tuning policies: pure functions of what was observed, each decision explained.

Three policies drive the same knobs (``run``, ``pages_to_scan``, ``sleep_millisecs``):

``stock``
    The kernel's defaults (100 pages every 20 ms), KSM simply on.

``ksmtuned``
    A faithful port of ksmtuned's ``adjust()`` loop (the shell script shipped with qemu-kvm /
    ksmtuned packages; defaults from ``/etc/ksmtuned.conf``). Every monitor interval: if the
    memory committed to QEMU processes plus a threshold fits in RAM and free memory is above the
    threshold, KSM is stopped; otherwise it runs, and ``pages_to_scan`` is raised by
    ``KSM_NPAGES_BOOST`` (+300) while free memory is below the threshold, else lowered by
    ``KSM_NPAGES_DECAY`` (-50), within [64, 1250]; ``sleep_millisecs`` is 10 ms scaled by
    16 GiB / RAM. It is *blind*: it never looks at how much there is to merge.

``advisor``
    The kernel's own KSM advisor (Linux 6.8+, ``advisor_mode=scan-time``): ksmd rescales
    ``pages_to_scan`` itself after every full scan so that a scan takes
    ``advisor_target_scan_time`` seconds, within [``advisor_min_pages_to_scan``,
    ``advisor_max_pages_to_scan``] and under ``advisor_max_cpu`` percent of a CPU. It is the
    baseline every user now has for free; like ksmtuned it does not know how much there is to
    merge, only how long a scan takes. Parameters default to the kernel's defaults.

``hint``
    Catalyst's idea (seeds/000): the hashing engine estimates the sharing potential, so the
    scanner runs fast while much is left to merge and backs off to a trickle once the merged
    pages have reached the potential (or when there is little potential to begin with), which is
    where out-of-band deduplication otherwise wastes its CPU.

    ``remaining`` = frames still saveable (engine: pages of a duplicate class that are not yet on a
    shared frame, minus what KSM merged since that scan). Urgency
    ``u = clamp(remaining / (high_gain * mergeable), 0, 1)``; a full pass should take
    ``target_pass_s`` at ``u = 1``. With ``remaining`` below ``max(min_remaining, low_fraction *
    potential)`` the policy idles (``idle_pages`` every ``idle_sleep_ms``), still catching new
    sharing slowly until the next estimate. When a tenant boundary cannot be enforced it stops KSM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

POLICIES = ("off", "stock", "ksmtuned", "hint", "fixed", "advisor")

STOCK_PAGES_TO_SCAN = 100
STOCK_SLEEP_MS = 20


@dataclass(frozen=True)
class AdvisorParams:
    """The KSM advisor's knobs (sysfs names without ``advisor_``); defaults are the kernel's."""

    target_scan_time: int = 200  # seconds a full scan should take
    max_cpu: int = 70  # percent of one CPU ksmd may use
    min_pages_to_scan: int = 500
    max_pages_to_scan: int = 30000

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                raise ValueError(f"{f.name}: must be a whole number, got {v!r}")
        if not 1 <= self.target_scan_time <= 86400:
            raise ValueError("target_scan_time: must be between 1 and 86400 s")
        if not 1 <= self.max_cpu <= 100:
            raise ValueError("max_cpu: must be between 1 and 100 (percent)")
        if not 1 <= self.min_pages_to_scan <= self.max_pages_to_scan <= 1_000_000:
            raise ValueError("min_pages_to_scan <= max_pages_to_scan, both between 1 and 1000000")

    def knobs(self) -> dict[str, int]:
        """sysfs name -> value, in the order they are written (advisor_mode after them)."""
        # max before min: the kernel refuses a min above the current max and vice versa
        return {"advisor_target_scan_time": int(self.target_scan_time), "advisor_max_cpu": int(self.max_cpu),
                "advisor_max_pages_to_scan": int(self.max_pages_to_scan),
                "advisor_min_pages_to_scan": int(self.min_pages_to_scan)}  # fmt: skip


@dataclass(frozen=True)
class KsmSettings:
    """The knobs a policy sets. With ``advisor`` set, the kernel's advisor owns ``pages_to_scan``
    (the value here is then not written)."""

    run: int = 1
    pages_to_scan: int = STOCK_PAGES_TO_SCAN
    sleep_millisecs: int = STOCK_SLEEP_MS
    advisor: AdvisorParams | None = None

    @property
    def pages_per_second(self) -> float:
        """Scan rate ignoring ksmd's own run time: pages_to_scan per (sleep) period."""
        if self.run != 1:
            return 0.0
        return self.pages_to_scan * 1000.0 / max(self.sleep_millisecs, 1)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.advisor is None:
            del d["advisor"]
        return d


@dataclass(frozen=True)
class Decision:
    """A policy's output: the settings and why (logged with its inputs)."""

    settings: KsmSettings
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "reason": self.reason, "inputs": self.inputs,
                "detail": self.detail}  # fmt: skip


def stock() -> Decision:
    return Decision(KsmSettings(1, STOCK_PAGES_TO_SCAN, STOCK_SLEEP_MS), "stock kernel defaults")


def advisor(p: AdvisorParams | None = None) -> Decision:
    """The kernel's scan-time advisor with ``p`` (default: the kernel's defaults)."""
    p = p or AdvisorParams()
    return Decision(KsmSettings(1, STOCK_PAGES_TO_SCAN, STOCK_SLEEP_MS, advisor=p),
                    "the kernel's KSM advisor (scan-time) sizes pages_to_scan", detail={"advisor": asdict(p)})


def fixed(pages_to_scan: int, sleep_millisecs: int, run: int = 1) -> Decision:
    if pages_to_scan < 1 or sleep_millisecs < 1 or run not in (0, 1):
        raise ValueError("fixed: pages_to_scan >= 1, sleep_millisecs >= 1, run 0 or 1")
    return Decision(KsmSettings(run, pages_to_scan, sleep_millisecs), "fixed by the operator")


# -- ksmtuned -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KsmtunedParams:
    """``/etc/ksmtuned.conf`` (defaults as shipped)."""

    monitor_interval_s: float = 60.0
    sleep_msec: int = 10
    npages_boost: int = 300
    npages_decay: int = -50
    npages_min: int = 64
    npages_max: int = 1250
    thres_coef: int = 20  # percent of RAM
    thres_const_kib: int = 2048 * 1024


@dataclass(frozen=True)
class KsmtunedInputs:
    total_kib: int  # MemTotal
    free_kib: int  # MemFree + Buffers + Cached (ksmtuned's "free")
    committed_kib: int  # sum of RSS of the QEMU processes
    npages: int  # the script's npages (starts at 0; the previous decision's ``detail["npages"]``)


def ksmtuned_step(obs: KsmtunedInputs, p: KsmtunedParams = KsmtunedParams()) -> Decision:
    """One ``adjust()`` of ksmtuned."""
    if obs.total_kib <= 0:
        raise ValueError("total_kib must be positive")
    thres = obs.total_kib * p.thres_coef // 100
    if p.thres_const_kib > thres:
        thres = p.thres_const_kib
    sleep = max(1, p.sleep_msec * 16 * 1024 * 1024 // obs.total_kib)
    inputs = asdict(obs)
    detail = {"thres_kib": thres, "sleep_ms": sleep}
    if obs.committed_kib + thres < obs.total_kib and obs.free_kib > thres:
        # KSMCTL stop: only run=0 is written; the script's npages is unchanged.
        shown = min(max(obs.npages, p.npages_min), p.npages_max)
        return Decision(KsmSettings(0, shown, sleep), "committed + thres < total and free > thres: stop ksm",
                        inputs, detail | {"npages": obs.npages})  # fmt: skip
    if obs.free_kib < thres:
        npages, why = obs.npages + p.npages_boost, f"free {obs.free_kib} < thres {thres}: boost"
    else:
        npages, why = obs.npages + p.npages_decay, f"free {obs.free_kib} >= thres {thres}: decay"
    npages = min(max(npages, p.npages_min), p.npages_max)
    return Decision(KsmSettings(1, npages, sleep), why, inputs, detail | {"npages": npages})


# -- hint-driven ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HintParams:
    target_pass_s: float = 2.0  # a full pass over mergeable memory at full urgency
    high_gain: float = 0.05  # remaining/mergeable at which the scanner runs flat out
    low_fraction: float = 0.02  # idle once remaining < this fraction of the potential
    min_remaining: int = 16  # ... or fewer than this many pages
    fast_sleep_ms: int = 20
    min_pages: int = 100
    max_pages: int = 20000
    idle_pages: int = 64
    idle_sleep_ms: int = 1000
    unknown: KsmSettings = KsmSettings(1, STOCK_PAGES_TO_SCAN, STOCK_SLEEP_MS)

    def __post_init__(self) -> None:
        if not (self.target_pass_s > 0 and 0 < self.high_gain <= 1 and 0 <= self.low_fraction < 1):
            raise ValueError("hint: target_pass_s > 0, 0 < high_gain <= 1, 0 <= low_fraction < 1")
        if not (1 <= self.min_pages <= self.max_pages and self.idle_pages >= 1):
            raise ValueError("hint: 1 <= min_pages <= max_pages and idle_pages >= 1")
        if self.fast_sleep_ms < 1 or self.idle_sleep_ms < 1 or self.min_remaining < 0:
            raise ValueError("hint: sleeps >= 1 ms and min_remaining >= 0")


@dataclass(frozen=True)
class HintInputs:
    potential: int | None  # frames saveable at full merge among eligible VMs (None: no estimate yet)
    remaining: int | None  # frames still to merge now (None: unknown → potential - merged)
    mergeable: int  # resident mergeable pages ksmd has to walk per pass
    merged: int = 0  # frames already saved (pages_sharing attributable to the eligible VMs)
    blocked: str = ""  # non-empty: a tenant boundary KSM would violate (why)


def hint_step(obs: HintInputs, p: HintParams = HintParams()) -> Decision:
    """Scan fast while the estimated potential is not reached, trickle otherwise."""
    inputs = asdict(obs)
    if obs.blocked:
        return Decision(KsmSettings(0, p.idle_pages, p.idle_sleep_ms), f"blocked: {obs.blocked}", inputs)
    if obs.potential is None:
        return Decision(p.unknown, "no estimate yet: stock rate", inputs)
    potential = max(0, obs.potential)
    remaining = obs.remaining if obs.remaining is not None else potential - max(0, obs.merged)
    remaining = max(0, min(remaining, potential))
    idle_below = max(p.min_remaining, math.ceil(p.low_fraction * potential))
    detail: dict[str, Any] = {"remaining": remaining, "idle_below": idle_below}
    if remaining < idle_below or obs.mergeable <= 0:
        return Decision(KsmSettings(1, p.idle_pages, p.idle_sleep_ms),
                        f"remaining {remaining} < {idle_below}: potential reached or low, back off",
                        inputs, detail)  # fmt: skip
    urgency = min(1.0, remaining / (p.high_gain * obs.mergeable))
    fast = math.ceil(obs.mergeable * p.fast_sleep_ms / 1000.0 / p.target_pass_s)
    fast = min(max(fast, p.min_pages), p.max_pages)
    pages = round(p.min_pages + urgency * (fast - p.min_pages))
    pages = min(max(pages, p.min_pages), p.max_pages)
    detail |= {"urgency": round(urgency, 4), "fast_pages": fast}
    return Decision(KsmSettings(1, pages, p.fast_sleep_ms),
                    f"remaining {remaining} of {potential}: urgency {urgency:.2f}", inputs, detail)  # fmt: skip


def remaining_now(remaining_at_scan: int | None, sharing_at_scan: int, sharing_now: int) -> int | None:
    """Frames still to merge, extrapolated from the last scan by what KSM merged since."""
    if remaining_at_scan is None:
        return None
    return max(0, remaining_at_scan - max(0, sharing_now - sharing_at_scan))


def params_from(d: dict[str, Any] | None, cls: type) -> Any:
    """Build a params dataclass from a (validated elsewhere) dict, ignoring unknown keys."""
    base = cls()
    if not d:
        return base
    known = {k: v for k, v in d.items() if k in base.__dataclass_fields__ and k != "unknown"}
    return replace(base, **known)


__all__ = [
    "POLICIES",
    "AdvisorParams",
    "Decision",
    "HintInputs",
    "HintParams",
    "KsmSettings",
    "KsmtunedInputs",
    "KsmtunedParams",
    "advisor",
    "fixed",
    "hint_step",
    "ksmtuned_step",
    "params_from",
    "remaining_now",
    "stock",
]
