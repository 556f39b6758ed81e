"""The memory controller: collectors → ESX policy → symbiotic balloon, once per period.

Collect: per VM, the balloon target and guest meminfo/PSI (the daemon's snapshot), the
working set from the agent's ``wss-sample`` (fast/slow averages), and how much of the QEMU
process's memory KSM has merged (``/proc/PID/ksm_merging_pages``), which gives the unshared
fraction u. Decide: :func:`symbiont.memory.policy.decide`. Act: before a balloon inflates,
the guest frees the memory its own way (``balloon-prepare``: clean page cache first, then
containers by shares); then :meth:`Daemon.set_memory` moves the balloon, which saves the
original target so that it is restored when the VM is unregistered or the daemon stops.

Off unless ``memory.enabled`` (config) or ``PUT /v1/memory/policy {"enabled": true}``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from symbiont.agentlink import AgentOpError, AgentUnavailable
from symbiont.host.ksm import KSM_DIR, PAGE_SIZE, RUN_MERGE, process_merging_pages
from symbiont.memory.floor import observed_reserve_mib, vm_floor
from symbiont.memory.policy import (
    ActiveEstimate,
    Decision,
    HostMemory,
    VmMemory,
    active_fraction,
    decide,
    rho,
    under_pressure,
)

if TYPE_CHECKING:
    from symbiont.daemon import Daemon

log = logging.getLogger(__name__)
MIB = 1 << 20


@dataclass
class VmMemoryState:
    # Averages of the working set in MiB (not of a fraction of MemTotal, which shrinks with the
    # balloon): f is taken against the allocation at decision time (:func:`active_fraction`).
    estimate: ActiveEstimate = field(default_factory=lambda: ActiveEstimate(upper=math.inf))
    kernel_reserve_mib: float | None = None  # boot − MemTotal at rest, from the first sample
    last_wss: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)  # last decision and its inputs
    unshared_fraction: float = 1.0
    pressure: bool = False


@dataclass
class MemoryState:
    enabled: bool
    vms: dict[str, VmMemoryState] = field(default_factory=dict)
    periods: int = 0
    last_period_at: float = 0.0
    last_host: dict[str, Any] = field(default_factory=dict)

    def vm(self, name: str) -> VmMemoryState:
        return self.vms.setdefault(name, VmMemoryState())


def host_budget_mib(daemon: Daemon) -> float:
    m = daemon.cfg.memory
    if m.budget_mib:
        return float(m.budget_mib)
    return psutil.virtual_memory().total / MIB - m.reserve_mib


def unshared_from(merged_pages: int | None, rss_bytes: int | None, ksm_running: bool) -> float:
    """u = 1 − merged / resident, or 1.0 (all of it reclaimable) when the reading cannot be
    trusted: KSM not merging (``run`` ≠ 1: the per-process counter is no longer maintained, and
    pages the guest freed or rewrote since stay counted) or more merged than resident (a stale
    counter: 130.6 MiB "merged" of 112.2 MiB resident was seen after KSM was switched off)."""
    if not ksm_running or merged_pages is None or rss_bytes is None or rss_bytes <= 0:
        return 1.0
    merged = merged_pages * PAGE_SIZE
    if merged > rss_bytes:
        return 1.0
    return min(1.0, max(0.05, 1.0 - merged / rss_bytes))


def ksm_running() -> bool:
    try:
        return int((KSM_DIR / "run").read_text().strip()) == RUN_MERGE
    except (OSError, ValueError):
        return False


def unshared_fraction(pid: int | None) -> float:
    """1 − (KSM-merged pages of the QEMU process / its resident pages); 1.0 when unknown."""
    if pid is None:
        return 1.0
    pages = process_merging_pages(pid)
    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 1.0
    return unshared_from(pages, rss, ksm_running())


async def start(daemon: Daemon) -> None:
    daemon.memory = MemoryState(enabled=daemon.cfg.memory.enabled)  # type: ignore[attr-defined]
    daemon.hooks.append(period)


async def stop(daemon: Daemon) -> None:
    """Nothing of its own to restore: the balloons it moved are knobs the daemon restores."""


def observe(daemon: Daemon, name: str, st: VmMemoryState) -> VmMemory | None:
    """Build the policy's view of one VM from the daemon's latest snapshot."""
    rec = daemon.store.get_vm(name)
    snap = daemon.latest.get(name, {})
    lv = snap.get("libvirt", {})
    if rec is None or lv.get("state") != "running":
        return None
    cfg = daemon.cfg.memory
    pol = rec.policy.get("memory", {})
    link = daemon.links.get(name)
    mi = snap.get("agent", {}).get("meminfo", {})
    psi = snap.get("agent", {}).get("psi", {}).get("memory", {}).get("some_avg10")
    max_boot = float(lv.get("max_memory_mib") or 0)
    if max_boot <= 0:
        return None
    allocated = float(_current_target(daemon, name, lv))
    used = (mi.get("MemTotal", 0) - mi.get("MemAvailable", 0)) / MIB if mi else allocated
    if st.kernel_reserve_mib is None:
        st.kernel_reserve_mib = observed_reserve_mib(snap)
    st.pressure = under_pressure(mi, psi, cfg.psi_threshold, cfg.min_available_fraction) if mi else False
    st.unshared_fraction = _unshared(daemon, name, lv.get("qemu_pid"))
    return VmMemory(
        name=name,
        shares=float(pol.get("shares") or 1000),
        allocated_mib=allocated,
        active_fraction=active_fraction(st.estimate.known, allocated),
        min_mib=float(pol.get("min_mib") or 64),
        max_mib=float(min(pol.get("max_mib") or max_boot, max_boot)),
        tax_rate=float(pol["tax_rate"]) if pol.get("tax_rate") is not None else cfg.tax_rate,
        used_mib=used,
        pressure=st.pressure,
        unshared_fraction=st.unshared_fraction,
        cooperative=bool(link and link.cooperative),
        reserve_mib=st.kernel_reserve_mib,
        boot_mib=max_boot,
    )


def _unshared(daemon: Daemon, name: str, pid: int | None) -> float:
    """u from the dedup part's accounting of the VM's guest RAM when it has one, else from
    the QEMU process's KSM counter."""
    try:
        from symbiont.dedup.controller import sharing

        info = sharing(daemon, name)
    except Exception:  # the dedup part may not run in this daemon
        info = None
    if info and isinstance(info.get("unshared_fraction"), (int, float)):
        return min(1.0, max(0.05, float(info["unshared_fraction"])))
    return unshared_fraction(pid)


def _current_target(daemon: Daemon, name: str, lv: dict[str, Any]) -> int:
    """The balloon target the daemon last set, else libvirt's current memory."""
    for k in daemon.store.knobs(name):
        if k["knob"] == "balloon_mib":
            return int(k["current"])
    return int(lv.get("memory_mib") or 0)


def record_reserves(daemon: Daemon, state: MemoryState) -> None:
    """Each VM's kernel reserve (boot − MemTotal), from the first sample after registration at
    which the balloon is at rest; forget VMs no longer registered (a new registration of the
    same name may be another guest)."""
    for name in [n for n in state.vms if n not in daemon.links]:
        del state.vms[name]
    for name in list(daemon.links):
        st = state.vm(name)
        if st.kernel_reserve_mib is None:
            st.kernel_reserve_mib = observed_reserve_mib(daemon.latest.get(name, {}))


async def sample_working_sets(daemon: Daemon, state: MemoryState) -> None:
    async def one(name: str) -> None:
        link = daemon.links.get(name)
        if link is None or not link.cooperative or "wss-sample" not in link.caps:
            return
        try:
            res, _ = await link.request("wss-sample", {"reset": True})
        except (AgentUnavailable, AgentOpError) as exc:
            log.debug("vm %s: wss-sample failed: %s", name, exc)
            return
        st = state.vm(name)
        ref = res.get("referenced_bytes") if isinstance(res, dict) else None
        if isinstance(ref, (int, float)) and not isinstance(ref, bool) and math.isfinite(ref) and ref >= 0 \
                and res.get("interval_s"):
            boot = (daemon.latest.get(name, {}).get("libvirt") or {}).get("max_memory_mib")
            top = float(boot) if isinstance(boot, (int, float)) and boot > 0 else math.inf
            st.estimate.update(min(float(ref) / MIB, top))  # the guest is untrusted: bounded
            st.last_wss = {k: res.get(k) for k in ("referenced_bytes", "resident_bytes", "interval_s")}

    await asyncio.gather(*(one(n) for n in list(daemon.links)))


async def period(daemon: Daemon) -> None:
    state: MemoryState = daemon.memory  # type: ignore[attr-defined]
    record_reserves(daemon, state)
    await sample_working_sets(daemon, state)
    if not state.enabled:
        return
    cfg = daemon.cfg.memory
    views = [v for n in list(daemon.links) if (v := observe(daemon, n, state.vm(n))) is not None]
    if not views:
        return
    host = HostMemory(
        budget_mib=host_budget_mib(daemon),
        free_target_mib=cfg.free_target_mib,
        max_step_mib=cfg.max_step_mib,
        safety_margin_mib=cfg.safety_margin_mib,
        pressure_grant_mib=cfg.pressure_grant_mib,
    )
    t0 = time.perf_counter()
    decisions = decide(views, host)
    state.periods += 1
    state.last_period_at = time.time()
    state.last_host = {**asdict(host), "policy_ms": round(1000 * (time.perf_counter() - t0), 3),
                       "occupied_mib": round(sum(v.allocated_mib * v.unshared_fraction for v in views), 1)}
    for d in decisions:
        state.vm(d.name).last = {"target_mib": d.target_mib, "before_mib": d.before_mib, "rho": d.rho,
                                 "reason": d.reason, "at": state.last_period_at}
    # Smaller moves than chunk_mib are churn: the balloon waits for a real change.
    moves = [d for d in decisions
             if abs(d.delta_mib) >= cfg.chunk_mib or (d.delta_mib != 0 and d.target_mib <= d.inputs["min_mib"])]
    # Shrinks first (their guests prepare concurrently), grants after: memory given to one VM
    # is never handed out before the VMs paying for it have given it up.
    shrunk = await asyncio.gather(*(apply(daemon, d) for d in moves if d.delta_mib < 0))
    if not all(shrunk):
        log.warning("memory: a balloon inflation failed; grants wait for the next period")
        return
    for d in moves:
        if d.delta_mib > 0:
            await apply(daemon, d)


async def apply(daemon: Daemon, d: Decision) -> bool:
    """Symbiotic ballooning: on inflation the guest frees memory first, then the balloon moves."""
    prepared: Any = None
    link = daemon.links.get(d.name)
    if d.delta_mib < 0 and link is not None and link.cooperative and "balloon-prepare" in link.caps:
        try:
            prepared, _ = await link.request("balloon-prepare", {"release_mib": int(-d.delta_mib)},
                                             timeout=daemon.cfg.memory.prepare_timeout_s)
        except (AgentUnavailable, AgentOpError) as exc:
            prepared = {"error": str(exc)}
    daemon.store.log_decision("memory", "policy", d.name, d.inputs,
                              {"target_mib": d.target_mib, "before_mib": d.before_mib, "rho": d.rho,
                               "reason": d.reason, "prepared": prepared})
    try:
        await daemon.set_memory(d.name, int(d.target_mib), reason=f"policy: {d.reason}")
        return True
    except Exception as exc:  # one VM's failure must not stop the others
        log.warning("vm %s: policy balloon to %d MiB failed: %s", d.name, d.target_mib, exc)
        return False


def view(daemon: Daemon) -> dict[str, Any]:
    """What ``GET /v1/memory`` shows: per VM ρ, f, target and actual, and the host side."""
    state: MemoryState = daemon.memory  # type: ignore[attr-defined]
    out = []
    for rec in daemon.store.list_vms():
        st = state.vm(rec.name)
        v = observe(daemon, rec.name, st)
        snap = daemon.latest.get(rec.name, {}).get("libvirt", {})
        out.append({
            "name": rec.name,
            "shares": v.shares if v else None,
            "tax_rate": v.tax_rate if v else None,
            "min_mib": v.min_mib if v else None,
            "max_mib": v.max_mib if v else None,
            "f": round(v.active_fraction if v else st.estimate.value, 4),
            "wss_mib": None if st.estimate.known is None else round(st.estimate.known, 1),
            "floor": vm_floor(daemon, rec.name, (rec.policy or {}).get("memory")).to_dict(),
            "rho": r if v and math.isfinite(r := rho(v)) else None,
            "target_mib": v.allocated_mib if v else None,
            "actual_mib": (snap.get("memstats_kib", {}).get("actual", 0) // 1024) or None,
            "used_mib": round(v.used_mib, 1) if v else None,
            "pressure": st.pressure,
            "unshared_fraction": round(st.unshared_fraction, 4),
            "wss": st.last_wss,
            "last_decision": st.last,
        })
    return {"enabled": state.enabled, "periods": state.periods, "budget_mib": host_budget_mib(daemon),
            "host": state.last_host, "vms": out}
