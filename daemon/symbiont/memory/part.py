"""The memory part: collectors → ESX policy → symbiotic balloon, once per period.

observe: per VM, the balloon target (the ledger's, else libvirt's) and guest meminfo/PSI (the
core's snapshot), the working set from the agent's ``memory.wss-sample`` (fast/slow
averages), and how much of the QEMU process's memory is shared — from the dedup part's
accounting of the guest's RAM where it has one (``requires = ("dedup",)``), else from KSM's
per-process counter — which gives the unshared fraction u.
decide: :func:`plan` — :func:`symbiont.memory.policy.decide` and the churn filter; pure.
act: before a balloon inflates the guest frees the memory its own way
(``memory.balloon-prepare``: clean page cache first, then containers by shares); then
:meth:`MemoryPart.set_balloon` moves the balloon through the knob ledger (kind
``balloon_mib``), which saved the original target so that it is restored when the VM is
unregistered or the daemon stops.

The policy runs only when ``memory.enabled`` (config) or after ``PUT /v1/memory/policy
{"enabled": true}``; the balloon lever itself (``PUT /v1/vms/{n}/memory``) is always here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from symbiont import metrics as m
from symbiont.errors import Conflict, DaemonError, Invalid, NotFound, Unavailable
from symbiont.host.ksm import PAGE_SIZE
from symbiont.host.port import HostError
from symbiont.knobs import KnobKind
from symbiont.memory.config import MemoryConfig
from symbiont.memory.floor import GuestFloor, enforce_floor, floor_of, observed_reserve_mib
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
from symbiont.part import Part, Period

log = logging.getLogger(__name__)
MIB = 1 << 20
BALLOON = "balloon_mib"  # the knob kind: a VM's balloon target in MiB


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
    used_mib: float | None = None  # the guest's used memory at the last period (host paging: is it allocating)
    used_rise_mib: float = 0.0  # its rise since the period before


@dataclass
class MemoryState:
    enabled: bool
    vms: dict[str, VmMemoryState] = field(default_factory=dict)
    periods: int = 0
    last_period_at: float = 0.0
    last_host: dict[str, Any] = field(default_factory=dict)

    def vm(self, name: str) -> VmMemoryState:
        return self.vms.setdefault(name, VmMemoryState())


@dataclass
class MemoryObservation:
    """One period's view: each running VM as the policy sees it, and the host's budget."""

    views: list[VmMemory]
    host: HostMemory
    chunk_mib: int


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


@dataclass
class MemoryPlan:
    decisions: list[Decision]  # the policy's target for every VM
    moves: list[Decision]  # those the balloons follow this period


def plan(obs: MemoryObservation) -> MemoryPlan:
    """The period's balloon moves, pure: the ESX policy's decisions less those smaller than
    ``chunk_mib`` (churn), except a move down to the VM's minimum."""
    decisions = decide(obs.views, obs.host)
    return MemoryPlan(decisions, [d for d in decisions if abs(d.delta_mib) >= obs.chunk_mib
                                  or (d.delta_mib != 0 and d.target_mib <= d.inputs["min_mib"])])


class MemoryPart(Part):
    name = "memory"
    config = MemoryConfig
    requires = ("dedup",)  # its sharing estimate of this period gives u

    def __init__(self, ctx: Any, cfg: MemoryConfig) -> None:
        super().__init__(ctx, cfg)
        self.state = MemoryState(enabled=cfg.enabled)
        self._decided: list[Decision] = []
        host = ctx.host
        # Registered at construction: the balloon lever serves the API before the loop starts.
        ctx.knobs.register(KnobKind(BALLOON, self.name, read=lambda vm, _k: host.info(vm).memory_kib // 1024,
                                    write=lambda vm, _k, mib: host.set_balloon(vm, int(mib) * 1024)))

    # -- the lever ---------------------------------------------------------------------------
    def floor(self, vm: str) -> GuestFloor:
        """The lowest balloon target ``vm``'s guest survives, and what it is made of."""
        rec = self.ctx.store.get_vm(vm)
        st = self.state.vms.get(vm)
        return floor_of(self.ctx.latest(vm), st.kernel_reserve_mib if st else None,
                        ((rec.policy if rec else {}) or {}).get("memory"))

    async def set_balloon(self, vm: str, target_mib: int, reason: str = "api") -> dict[str, Any]:
        """Move ``vm``'s balloon so the guest has ``target_mib`` MiB: within its policy range
        and never below its guest floor (issue 16 item 12); the original is saved first."""
        mem = self.ctx.vm(vm).policy.get("memory", {})
        try:
            info = await self.ctx.blocking(self.ctx.host.info, vm)
        except HostError as exc:
            raise NotFound(f"libvirt domain {vm!r} is gone: {exc}") from None
        except TimeoutError:
            raise Unavailable("libvirt did not answer in time") from None
        boot = info.max_memory_kib // 1024
        lo = enforce_floor(self.floor(vm), self.ctx.latest(vm), vm, target_mib)  # Invalid with the make-up
        hi = min(int(mem.get("max_mib") or boot), boot)
        if not lo <= target_mib <= hi:
            raise Invalid(f"target_mib {target_mib} outside this VM's range {lo}..{hi} MiB")
        if info.state != "running":
            raise Conflict(f"VM {vm!r} is {info.state}; the balloon needs a running VM")
        before = info.memory_kib // 1024
        try:
            await self.ctx.knobs.turn(self.name, vm, BALLOON, "", target_mib, original=before)
        except HostError as exc:
            raise Unavailable(str(exc)) from None
        m.actions_total.labels("memory", "balloon").inc()
        self.ctx.decisions.log("balloon", vm, {"target_mib": target_mib, "before_mib": before, "range": [lo, hi],
                                               "reason": reason}, {"ok": True})
        log.info("vm %s: balloon %d -> %d MiB (%s)", vm, before, target_mib, reason)
        self.ctx.wake()
        return {"vm": vm, "before_mib": before, "target_mib": target_mib}

    def set_policy(self, changes: dict[str, Any]) -> None:
        """``PUT /v1/memory/policy``: the host side of the policy, for this run of the daemon."""
        for key in ("budget_mib", "free_target_mib", "tax_rate"):
            if key in changes:
                setattr(self.cfg, key, changes[key])
        if "enabled" in changes:
            self.state.enabled = bool(changes["enabled"])
        self.ctx.decisions.log("host-policy", None, changes, {})

    # -- the period ----------------------------------------------------------------------------
    def budget_mib(self) -> float:
        if self.cfg.budget_mib:
            return float(self.cfg.budget_mib)
        return self.ctx.host.mem_total_bytes() / MIB - self.cfg.reserve_mib

    async def observe(self, period: Period) -> MemoryObservation | None:
        names = [rec.name for rec in self.ctx.vms()]
        self.record_reserves(names)
        await self.sample_working_sets(names)
        if not self.state.enabled:
            return None
        views = [v for n in names if (v := await self.view_of(n)) is not None]
        if not views:
            return None
        c = self.cfg
        host = HostMemory(budget_mib=self.budget_mib(), free_target_mib=c.free_target_mib, max_step_mib=c.max_step_mib,
                          safety_margin_mib=c.safety_margin_mib, pressure_grant_mib=c.pressure_grant_mib)
        return MemoryObservation(views, host, c.chunk_mib)

    def decide(self, obs: MemoryObservation | None) -> MemoryPlan | None:
        return plan(obs) if obs is not None else None

    async def act(self, decision: MemoryPlan | None) -> None:
        obs: MemoryObservation | None = self.ctx.period.observations.get(self.name) if self.ctx.period else None
        if decision is None or obs is None:
            return
        moves = decision.moves
        self.state.periods += 1
        self.state.last_period_at = time.time()
        self.state.last_host = {**asdict(obs.host),
                                "occupied_mib": round(sum(v.allocated_mib * v.unshared_fraction for v in obs.views), 1)}
        for v in obs.views:
            st = self.state.vm(v.name)
            st.used_rise_mib = 0.0 if st.used_mib is None else v.used_mib - st.used_mib
            st.used_mib = v.used_mib
        for d in decision.decisions:
            self.state.vm(d.name).last = {"target_mib": d.target_mib, "before_mib": d.before_mib, "rho": d.rho,
                                          "reason": d.reason, "at": self.state.last_period_at}
        # Shrinks first (their guests prepare concurrently), grants after: memory given to one VM
        # is never handed out before the VMs paying for it have given it up.
        shrunk = await asyncio.gather(*(self.apply(d) for d in moves if d.delta_mib < 0))
        if not all(shrunk):
            log.warning("memory: a balloon inflation failed; grants wait for the next period")
            return
        for d in moves:
            if d.delta_mib > 0:
                await self.apply(d)

    async def apply(self, d: Decision) -> bool:
        """Symbiotic ballooning: on inflation the guest frees memory first, then the balloon moves."""
        prepared: Any = None
        if d.delta_mib < 0 and self.ctx.agent(d.name).cooperative and self.ctx.agents.supports(d.name, "memory.balloon-prepare"):
            try:
                prepared, _ = await self.ctx.agents.call(d.name, "memory.balloon-prepare",
                                                         {"release_mib": int(-d.delta_mib)},
                                                         timeout=self.cfg.prepare_timeout_s)
            except DaemonError as exc:
                prepared = {"error": str(exc)}
        self.ctx.decisions.log("policy", d.name, d.inputs, {"target_mib": d.target_mib, "before_mib": d.before_mib,
                                                            "rho": d.rho, "reason": d.reason, "prepared": prepared})
        try:
            await self.set_balloon(d.name, int(d.target_mib), reason=f"policy: {d.reason}")
            return True
        except Exception as exc:  # one VM's failure must not stop the others
            log.warning("vm %s: policy balloon to %d MiB failed: %s", d.name, d.target_mib, exc)
            return False

    # -- observation helpers -------------------------------------------------------------------
    def record_reserves(self, names: list[str]) -> None:
        """Each VM's kernel reserve (boot − MemTotal), from the first sample after registration at
        which the balloon is at rest; forget VMs no longer registered (a new registration of the
        same name may be another guest)."""
        for name in [n for n in self.state.vms if n not in names]:
            del self.state.vms[name]
        for name in names:
            st = self.state.vm(name)
            if st.kernel_reserve_mib is None:
                st.kernel_reserve_mib = observed_reserve_mib(self.ctx.latest(name))

    async def sample_working_sets(self, names: list[str]) -> None:
        async def one(name: str) -> None:
            if not self.ctx.agent(name).cooperative or not self.ctx.agents.supports(name, "memory.wss-sample"):
                return
            if (self.ctx.latest(name).get("libvirt") or {}).get("state") not in (None, "running"):
                return  # paused (parked by the paging part) or down: it cannot answer, asking only times out
            try:
                res, _ = await self.ctx.agents.call(name, "memory.wss-sample", {"reset": True})
            except DaemonError as exc:
                log.debug("vm %s: wss-sample failed: %s", name, exc)
                return
            ref = res.get("referenced_bytes") if isinstance(res, dict) else None
            if isinstance(ref, (int, float)) and not isinstance(ref, bool) and math.isfinite(ref) and ref >= 0 \
                    and res.get("interval_s"):
                boot = (self.ctx.latest(name).get("libvirt") or {}).get("max_memory_mib")
                top = float(boot) if isinstance(boot, (int, float)) and boot > 0 else math.inf
                st = self.state.vm(name)
                st.estimate.update(min(float(ref) / MIB, top))  # the guest is untrusted: bounded
                st.last_wss = {k: res.get(k) for k in ("referenced_bytes", "resident_bytes", "interval_s")}

        await asyncio.gather(*(one(n) for n in names))

    def current_target(self, name: str, lv: dict[str, Any]) -> int:
        """The balloon target the ledger last set, else libvirt's current memory."""
        cur = self.ctx.knobs.current(name, BALLOON)
        return int(cur) if cur is not None else int(lv.get("memory_mib") or 0)

    async def unshared(self, name: str, pid: int | None) -> float:
        """u from the dedup part's accounting of the VM's guest RAM when it has one, else from
        the QEMU process's KSM counter."""
        try:
            info = self.ctx.peer("dedup").sharing(name)
        except Exception:  # the dedup part may not run in this daemon
            info = None
        if info and isinstance(info.get("unshared_fraction"), (int, float)):
            return min(1.0, max(0.05, float(info["unshared_fraction"])))
        if pid is None:
            return 1.0
        h = self.ctx.host
        return unshared_from(h.process_merging_pages(pid), h.process_rss(pid), h.ksm_running())

    async def view_of(self, name: str) -> VmMemory | None:
        """The policy's view of one VM from the core's latest snapshot."""
        rec = self.ctx.store.get_vm(name)
        snap = self.ctx.latest(name)
        lv = snap.get("libvirt", {})
        if rec is None or lv.get("state") != "running":
            return None
        st = self.state.vm(name)
        cfg = self.cfg
        pol = rec.policy.get("memory", {})
        mi = snap.get("agent", {}).get("meminfo", {})
        psi = snap.get("agent", {}).get("psi", {}).get("memory", {}).get("some_avg10")
        max_boot = float(lv.get("max_memory_mib") or 0)
        if max_boot <= 0:
            return None
        allocated = float(self.current_target(name, lv))
        used = (mi.get("MemTotal", 0) - mi.get("MemAvailable", 0)) / MIB if mi else allocated
        if st.kernel_reserve_mib is None:
            st.kernel_reserve_mib = observed_reserve_mib(snap)
        st.pressure = under_pressure(mi, psi, cfg.psi_threshold, cfg.min_available_fraction) if mi else False
        st.unshared_fraction = await self.unshared(name, lv.get("qemu_pid"))
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
            cooperative=self.ctx.agent(name).cooperative,
            reserve_mib=st.kernel_reserve_mib,
            boot_mib=max_boot,
        )

    async def vm_removed(self, vm: str) -> None:
        self.state.vms.pop(vm, None)

    def shortfall_inputs(self, name: str) -> dict[str, Any]:
        """What host paging must know of a VM from this period's balloon decisions (issue 15:
        host paging is the last resort and never takes from a VM being given memory): its
        pressure, whether its target rose, its ρ and u, how much its guest's used memory rose. Decisions older than this period's
        (the VM not decided on this period) count as no growth."""
        st = self.state.vms.get(name)
        if st is None or not self.state.enabled:
            return {}
        last = st.last
        fresh = bool(last) and last.get("at") == self.state.last_period_at
        rho_ = last.get("rho") if fresh else None
        return {"pressure": bool(st.pressure),
                "growing": fresh and float(last.get("target_mib", 0)) > float(last.get("before_mib", 0)),
                "rho": float(rho_) if isinstance(rho_, (int, float)) and math.isfinite(rho_) else None,
                "unshared_fraction": float(st.unshared_fraction),
                "used_rise_mib": float(st.used_rise_mib) if fresh else 0.0}

    # -- what GET /v1/memory shows ---------------------------------------------------------------
    async def view(self) -> dict[str, Any]:
        """Per VM ρ, f, target and actual, and the host side."""
        out = []
        for rec in self.ctx.vms():
            st = self.state.vm(rec.name)
            v = await self.view_of(rec.name)
            snap = self.ctx.latest(rec.name).get("libvirt", {})
            out.append({
                "name": rec.name,
                "shares": v.shares if v else None,
                "tax_rate": v.tax_rate if v else None,
                "min_mib": v.min_mib if v else None,
                "max_mib": v.max_mib if v else None,
                "f": round(v.active_fraction if v else st.estimate.value, 4),
                "wss_mib": None if st.estimate.known is None else round(st.estimate.known, 1),
                "floor": self.floor(rec.name).to_dict(),
                "rho": r if v and math.isfinite(r := rho(v)) else None,
                "target_mib": v.allocated_mib if v else None,
                "actual_mib": (snap.get("memstats_kib", {}).get("actual", 0) // 1024) or None,
                "used_mib": round(v.used_mib, 1) if v else None,
                "pressure": st.pressure,
                "unshared_fraction": round(st.unshared_fraction, 4),
                "wss": st.last_wss,
                "last_decision": st.last,
            })
        return {"enabled": self.state.enabled, "periods": self.state.periods, "budget_mib": self.budget_mib(),
                "host": self.state.last_host, "vms": out}

    def status(self) -> dict[str, Any]:
        return {"enabled": self.state.enabled, "periods": self.state.periods}
