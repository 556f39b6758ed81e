"""The cpu part: vCPU scaling, containers' CPU ratios, nesting-aware ballooning, QEMU CPU shares.

* **vCPU scaling** (:meth:`CpuPart.scale`) — the daemon's only vCPU implementation; the core's
  ``PUT /v1/vms/{n}/vcpus`` is an alias of ``PUT /v1/cpu/vms/{n}/vcpus``. Up: libvirt hot-plugs
  (``setVcpusFlags``, live) what the VM lacks, the agent onlines (waiting for the ACPI hot-plug
  to reach the guest). Down: the agent offlines first; libvirt is asked to unplug only when
  told (``libvirt_unplug``): under TCG that unplug regularly exceeds libvirt's fixed 5 s
  ("vcpu unplug request timed out") and libvirt's live count goes stale, so a timeout is
  accepted: the guest-side offline is what takes the CPUs away from the workload. Without a
  cooperative agent only a hot-plug is possible. Table ``cpu_vcpus`` keeps all three views —
  requested, libvirt's, the guest's online CPUs (and QEMU's own, ``query-cpus-fast``, when
  libvirt's went stale). libvirt's count is the ledger's ``vcpus`` knob.
* **Ratios** are kept by the agent itself (its ``cpu.online`` re-applies the containers' CPU
  plan); each period the part asks for a rebalance whenever it sees the guest's online CPUs
  change by other means, and refreshes no-reclaim containers' protection.
* **Nesting-aware balloon** (:meth:`CpuPart.balloon`): before inflating, the agent reclaims
  from containers in proportion to their shares (never from no-reclaim ones), then the memory
  part's balloon lever moves; the hold is the ledger's ``cpu_reclaim_hold`` knob, lifted on
  deflation, VM removal and stop. Baseline: the balloon alone.
* **QEMU CPU shares**: each VM's QEMU cgroup gets ``cpu_shares`` = ``cpu.weight`` × 1024 / 100
  from its registration, through libvirt's schedinfo (cgroup v1 here, v2 alike); the ledger's
  ``cpu_qemu_shares`` knob saves the original and restores it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from symbiont import metrics as m
from symbiont.cpu import policy
from symbiont.errors import Conflict, DaemonError, Invalid, NotFound, Unavailable
from symbiont.host.port import DomainInfo, HostError
from symbiont.knobs import KnobKind
from symbiont.part import NoConfig, Part, Period

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cpu_vcpus (
    vm TEXT PRIMARY KEY,
    requested INTEGER NOT NULL,
    libvirt INTEGER,
    guest_online INTEGER,
    qemu INTEGER,
    unplug_timeouts INTEGER NOT NULL DEFAULT 0,
    last_step TEXT NOT NULL DEFAULT '{}',
    updated_at REAL NOT NULL
)
"""
VCPUS = "vcpus"  # libvirt's live vCPU count
SHARES = "cpu_qemu_shares"  # the QEMU cgroup's cpu_shares (libvirt schedinfo)
HOLD = "cpu_reclaim_hold"  # the agent's reclamation hold (memory.high) on a VM's containers
DEFAULT_SHARES = 1024


def _int_list(v: Any, limit: int = 4096) -> list[int]:
    if not isinstance(v, list):
        return []
    return sorted({c for c in v[:limit] if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < limit})


def qemu_shares(vm_weight: int | None) -> int:
    """libvirt ``cpu_shares`` for a VM's QEMU from its registration's ``cpu.weight`` (100 ↔ 1024)."""
    return policy.qemu_cpu_weight(vm_weight) * DEFAULT_SHARES // 100


@dataclass
class CpuObservation:
    online: dict[str, tuple[int, ...]]  # per cooperative VM: the guest's online CPUs
    libvirt: dict[str, int | None]
    shares: dict[str, int]  # per running VM: the cpu_shares its registration asks for


class CpuPart(Part):
    name = "cpu"
    config = NoConfig
    requires = ("memory",)  # the nesting-aware balloon ends in memory's balloon lever

    def __init__(self, ctx: Any, cfg: Any) -> None:
        super().__init__(ctx, cfg)
        self.last_online: dict[str, tuple[int, ...]] = {}
        self.qemu_status: dict[str, str] = {}
        self.scale_locks: dict[str, asyncio.Lock] = {}
        ctx.store.ensure_schema(SCHEMA)
        host = ctx.host
        knobs = ctx.knobs
        knobs.register(KnobKind(VCPUS, self.name, read=lambda vm, _k: host.info(vm).vcpus, write=self._write_vcpus))
        knobs.register(KnobKind(SHARES, self.name, read=lambda vm, _k: host.schedinfo(vm)["cpu_shares"],
                                write=lambda vm, _k, v: host.set_schedinfo(vm, {"cpu_shares": int(v)})))
        knobs.register(KnobKind(HOLD, self.name, read=lambda _vm, _k: "none", write=self._write_hold))

    async def start(self) -> None:
        # Older daemons kept the holds and the (cgroup v2) QEMU weights in tables of their own.
        self.ctx.knobs.import_legacy("cpu_reclaim_holds", HOLD, self.name,
                                     lambda r: (r["vm"], "", "none", "held"), drop=True)
        self.ctx.knobs.import_legacy("cpu_qemu_knobs", "qemu_cgroup_file", self.name,
                                     lambda r: (r["vm"], f"{r['path']}/{r['file']}", r["original"], r["current"]),
                                     drop=True)
        host = self.ctx.host
        self.ctx.knobs.register(KnobKind("qemu_cgroup_file", self.name, read=lambda _vm, k: host.read_cgroup(k),
                                         write=lambda _vm, k, v: host.write_cgroup(k, str(v))))

    # -- agent requests ---------------------------------------------------------------------
    async def agent(self, vm: str, op: str, args: dict[str, Any] | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """One agent operation on a registered VM (the gateway maps errors to 4xx/5xx)."""
        self.ctx.vm(vm)
        result, _ = await self.ctx.agents.call(vm, op, args or {}, timeout=timeout)
        if not isinstance(result, dict):
            raise Unavailable(f"{vm}: agent answered {op} with a {type(result).__name__}, not an object")
        return result

    async def _info(self, vm: str) -> DomainInfo:
        try:
            return await self.ctx.blocking(self.ctx.host.info, vm)
        except HostError as exc:
            raise NotFound(f"libvirt domain {vm!r} is gone: {exc}") from None
        except TimeoutError:
            raise Unavailable("libvirt did not answer in time") from None

    # -- knob writers (the ledger restores through these) ----------------------------------------
    async def _write_vcpus(self, vm: str, _key: str, count: Any) -> None:
        row = self.ctx.knobs.get(vm, VCPUS)
        if row is not None and int(count) < int(row["current"]):
            # Back down by offlining in the guest; without an agent the hot-plugged vCPUs stay:
            # an unplug under TCG would leave libvirt stale.
            if not self.ctx.agent(vm).cooperative:
                raise Unavailable("no cooperative agent to offline the added vCPUs")
            await self.agent(vm, "cpu.online", {"target": int(count)}, timeout=30.0)
        else:
            await self.ctx.blocking(self.ctx.host.set_vcpus, vm, int(count))

    async def _write_hold(self, vm: str, _key: str, value: Any) -> None:
        if value == "none" and self.ctx.agents.supports(vm, "cpu.container-release"):
            await self.agent(vm, "cpu.container-release")

    # -- vCPU scaling ---------------------------------------------------------------------
    async def scale(self, vm: str, count: int, libvirt_unplug: bool = False, reason: str = "api") -> dict[str, Any]:
        """Scale ``vm`` to ``count`` vCPUs; returns timings and every view of the result.

        ``ratios_in_force_s`` is from the call to the moment the agent reported the
        containers' CPU plan for the new CPUs applied.
        """
        lock = self.scale_locks.setdefault(vm, asyncio.Lock())
        async with lock:
            return await self._scale(vm, count, libvirt_unplug, reason)

    async def _scale(self, vm: str, count: int, libvirt_unplug: bool, reason: str) -> dict[str, Any]:
        t0 = time.monotonic()
        pol = self.ctx.vm(vm).policy
        info = await self._info(vm)
        cpu = pol.get("cpu", {})
        lo = int(cpu.get("min_vcpus") or 1)
        hi = min(int(cpu.get("max_vcpus") or info.max_vcpus), info.max_vcpus)
        if not lo <= count <= hi:
            raise Invalid(f"vcpus {count} outside this VM's range {lo}..{hi}")
        if info.state != "running":
            raise Conflict(f"VM {vm!r} is {info.state}; vCPU scaling needs a running VM")
        if not self.ctx.agent(vm).cooperative:
            return await self._hotplug_only(vm, count, info, reason)
        stats = await self.agent(vm, "core.stats")
        online_before = _int_list((stats.get("cpus") or {}).get("online"))
        step = policy.plan_scale(len(online_before), info.vcpus, count, hi, lo, libvirt_unplug)
        timings: dict[str, float] = {}
        guest: dict[str, Any] = {}
        libvirt_outcome = "not needed"
        if step.direction == "down":
            t = time.monotonic()
            guest = await self.agent(vm, "cpu.online", {"target": count}, timeout=30.0)
            timings["guest_offline_s"] = time.monotonic() - t
            timings["ratios_in_force_s"] = time.monotonic() - t0
            if step.libvirt:
                t = time.monotonic()
                libvirt_outcome = await self._libvirt_set(vm, count, info.vcpus)
                timings["libvirt_s"] = time.monotonic() - t
            else:
                libvirt_outcome = "skipped: offlined in the guest only"
        elif step.direction == "up":
            if step.libvirt:
                t = time.monotonic()
                libvirt_outcome = await self._libvirt_set(vm, count, info.vcpus)
                timings["libvirt_s"] = time.monotonic() - t
                if libvirt_outcome.startswith("error"):
                    raise Unavailable(f"{vm}: hot-plug to {count} vCPUs failed: {libvirt_outcome}")
            t = time.monotonic()
            guest = await self._online_until(vm, count)
            timings["guest_online_s"] = time.monotonic() - t
            timings["ratios_in_force_s"] = time.monotonic() - t0
        online = _int_list(guest.get("online")) if guest else online_before
        lv = (await self._info(vm)).vcpus
        stale = libvirt_outcome.startswith("timeout")
        qemu = await asyncio.to_thread(self.qemu_vcpus, vm) if stale else None
        record = self._save_record(vm, count, lv, len(online), qemu, int(stale),
                                   {"direction": step.direction, "libvirt": libvirt_outcome, "at": time.time()})
        timings["total_s"] = time.monotonic() - t0
        if step.direction != "none" and len(online) != count:
            raise Unavailable(f"{vm}: asked for {count} vCPUs but the guest has {len(online)} online: {online}")
        mechanism = ("none" if step.direction == "none" else "guest-offline" if step.direction == "down"
                     and not step.libvirt else "hotplug" if step.direction == "up" and step.libvirt
                     else "guest-online" if step.direction == "up" else "unplug")
        out: dict[str, Any] = {
            "vm": vm, "step": step.as_dict(), "reason": reason, "mechanism": mechanism, "vcpus": count,
            "before": {"guest_online": len(online_before), "libvirt": info.vcpus},
            "after": {"guest_online": len(online), "online": online, "libvirt": lv, "qemu": qemu},
            "libvirt": libvirt_outcome, "guest": guest or None,
            "containers": guest.get("containers") if guest else None,
            "timings": {k: round(v, 4) for k, v in timings.items()}, "record": record,
        }
        self.last_online[vm] = tuple(online)
        m.actions_total.labels("cpu", "vcpus").inc()
        self.ctx.decisions.log("scale", vm, {"count": count, "step": step.as_dict(), "reason": reason},
                               {"libvirt": libvirt_outcome, "online": online, "libvirt_live": lv,
                                "mechanism": mechanism, "timings": out["timings"]})
        log.info("vm %s: vCPUs -> %d (%s): guest online %s, libvirt %d (%s), ratios in force after %.3f s",
                 vm, count, mechanism, online, lv, libvirt_outcome, timings.get("ratios_in_force_s", 0.0))
        self.ctx.wake()
        return out

    async def _hotplug_only(self, vm: str, count: int, info: DomainInfo, reason: str) -> dict[str, Any]:
        """No cooperative agent: libvirt can add vCPUs (the guest's udev onlines them), nothing else."""
        if count < info.vcpus:
            raise Conflict(f"VM {vm!r} has no cooperative agent to offline vCPUs, and libvirt's unplug is not "
                           "used (it goes stale under TCG)")
        mechanism = "none"
        if count > info.vcpus:
            outcome = await self._libvirt_set(vm, count, info.vcpus)
            if outcome.startswith("error"):
                raise Unavailable(f"{vm}: hot-plug to {count} vCPUs failed: {outcome}")
            mechanism = "hotplug"
        self.ctx.decisions.log("scale", vm, {"count": count, "reason": reason, "agent": "not cooperative"},
                               {"mechanism": mechanism})
        self.ctx.wake()
        return {"vm": vm, "vcpus": count, "mechanism": mechanism, "guest": None, "reason": reason,
                "before": {"guest_online": None, "libvirt": info.vcpus},
                "after": {"guest_online": None, "online": [], "libvirt": count, "qemu": None}}

    def qemu_vcpus(self, vm: str) -> int | None:
        """QEMU's own vCPU count (query-cpus-fast): the truth when libvirt's went stale."""
        try:
            cpus = self.ctx.host.qmp(vm, "query-cpus-fast")
            return len(cpus) if isinstance(cpus, list) else None
        except HostError as exc:  # best effort: a view, never a reason to fail the step
            log.debug("vm %s: query-cpus-fast failed: %s", vm, exc)
            return None

    async def _libvirt_set(self, vm: str, count: int, plugged: int) -> str:
        try:
            await self.ctx.knobs.turn(self.name, vm, VCPUS, "", count, original=plugged)
            return "ok"
        except HostError as exc:
            text = str(exc)
            if "timed out" in text.lower():
                # libvirt may have unplugged some of them: the ledger keeps the change recorded.
                self.ctx.knobs.record(self.name, vm, VCPUS, "", plugged, count)
                return f"timeout (accepted: the guest has offlined the CPUs): {text}"
            return f"error: {text}"
        except TimeoutError:
            return "error: libvirt did not answer in time"

    async def _online_until(self, vm: str, count: int, timeout: float = 20.0) -> dict[str, Any]:
        """Online CPUs up to ``count``; after a hot-plug, wait until the new CPUs are present."""
        deadline = time.monotonic() + timeout
        while True:
            if await self._present(vm) >= count:
                res = await self.agent(vm, "cpu.online", {"target": count}, timeout=30.0)
                if len(_int_list(res.get("online"))) >= count:
                    return res
            if time.monotonic() > deadline:
                return await self.agent(vm, "cpu.online", {}, timeout=30.0)
            await asyncio.sleep(0.25)  # the ACPI hot-plug has not reached the guest yet

    async def _present(self, vm: str) -> int:
        stats = await self.agent(vm, "core.stats")
        return len(_int_list((stats.get("cpus") or {}).get("present")))

    def _save_record(self, vm: str, requested: int, lv: int, online: int, qemu: int | None, timeouts: int,
                     step: dict[str, Any]) -> dict[str, Any]:
        with self.ctx.store.transaction() as db:
            db.execute(
                "INSERT INTO cpu_vcpus (vm, requested, libvirt, guest_online, qemu, unplug_timeouts, last_step, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vm) DO UPDATE SET "
                "requested = excluded.requested, libvirt = excluded.libvirt, guest_online = excluded.guest_online, "
                "qemu = COALESCE(excluded.qemu, qemu), unplug_timeouts = unplug_timeouts + excluded.unplug_timeouts, "
                "last_step = excluded.last_step, updated_at = excluded.updated_at",
                (vm, requested, lv, online, qemu, timeouts, json.dumps(step), time.time()),
            )
        return self.record(vm) or {}

    def record(self, vm: str) -> dict[str, Any] | None:
        """The daemon's record of a VM's vCPUs: requested, libvirt's, the guest's, QEMU's."""
        rows = self.ctx.store.query("SELECT * FROM cpu_vcpus WHERE vm = ?", (vm,))
        if not rows:
            return None
        r = rows[0]
        return {
            "requested": r["requested"], "libvirt": r["libvirt"], "guest_online": r["guest_online"],
            "qemu": r["qemu"], "effective": r["guest_online"],
            "offlined_in_guest": max(0, (r["libvirt"] or 0) - (r["guest_online"] or 0)),
            "libvirt_stale": r["qemu"] is not None and r["qemu"] != r["libvirt"],
            "unplug_timeouts": r["unplug_timeouts"], "last_step": json.loads(r["last_step"]),
            "updated_at": r["updated_at"],
        }

    async def vcpus_view(self, vm: str) -> dict[str, Any]:
        """Every view of a VM's vCPUs: libvirt's live count, the guest's online CPUs, the record.

        ``effective`` is what the guest's workload can run on: the guest's online CPUs.
        """
        self.ctx.vm(vm)
        info = await self._info(vm)
        online = _int_list(self.ctx.latest(vm).get("agent", {}).get("cpus", {}).get("online"))
        if self.ctx.agent(vm).ready:
            try:
                online = _int_list(((await self.agent(vm, "core.stats")).get("cpus") or {}).get("online")) or online
            except DaemonError:
                pass
        return {
            "vm": vm, "libvirt": info.vcpus, "max": info.max_vcpus, "guest_online": len(online) or None,
            "online": online, "effective": len(online) or info.vcpus,
            "offlined_in_guest": max(0, info.vcpus - len(online)) if online else None, "record": self.record(vm),
        }

    # -- nesting-aware balloon ----------------------------------------------------------------
    async def balloon(self, vm: str, target_mib: int, nesting_aware: bool = True, use_free: bool = True,
                      reason: str = "api") -> dict[str, Any]:
        pol = self.ctx.vm(vm).policy
        info = await self._info(vm)
        before = info.memory_kib // 1024
        # The VM's range is checked before any guest is asked to give anything up.
        mem = pol.get("memory", {})
        lo = int(mem.get("min_mib") or 64)
        hi = min(int(mem.get("max_mib") or info.max_memory_kib // 1024), info.max_memory_kib // 1024)
        if not lo <= target_mib <= hi:
            raise Invalid(f"target_mib {target_mib} outside this VM's range {lo}..{hi} MiB")
        if info.state != "running":
            raise Conflict(f"VM {vm!r} is {info.state}; the balloon needs a running VM")
        out: dict[str, Any] = {"vm": vm, "before_mib": before, "target_mib": target_mib, "nesting_aware": nesting_aware}
        t0 = time.monotonic()
        if nesting_aware and target_mib < before:
            if not self.ctx.agents.supports(vm, "cpu.container-reclaim"):
                raise Conflict(f"{vm}: the agent cannot reclaim from containers (no cpu.container-reclaim)")
            want = (before - target_mib) << 20
            self.ctx.knobs.record(self.name, vm, HOLD, "", "none", "held")  # before the hold exists
            out["reclaim"] = await self.agent(vm, "cpu.container-reclaim", {"bytes": want, "use_free": use_free},
                                              timeout=60.0)
        out["reclaim_s"] = round(time.monotonic() - t0, 4)
        out["balloon"] = await self.ctx.peer("memory").set_balloon(vm, target_mib, reason=f"cpu/{reason}")
        if target_mib >= before:
            out["release"] = await self.release(vm)
        self.ctx.decisions.log("nesting-aware-balloon" if nesting_aware else "balloon", vm,
                               {"target_mib": target_mib, "before_mib": before, "use_free": use_free},
                               {"freed": (out.get("reclaim") or {}).get("freed"), "reclaim_s": out["reclaim_s"]})
        return out

    async def release(self, vm: str) -> dict[str, Any] | None:
        """Lift the agent's reclamation hold (memory.high) on ``vm``'s containers."""
        if not self.ctx.agents.supports(vm, "cpu.container-release"):
            return None
        res = await self.agent(vm, "cpu.container-release")
        self.ctx.knobs.forget(vm, HOLD)
        return res

    # -- the period ----------------------------------------------------------------------------
    async def observe(self, period: Period) -> CpuObservation:
        online: dict[str, tuple[int, ...]] = {}
        lvs: dict[str, int | None] = {}
        shares: dict[str, int] = {}
        for rec in self.ctx.vms():
            snap = self.ctx.latest(rec.name)
            lv = snap.get("libvirt", {})
            if lv.get("state") == "running":
                shares[rec.name] = qemu_shares((rec.policy.get("cpu") or {}).get("weight"))
            on = tuple(_int_list(snap.get("agent", {}).get("cpus", {}).get("online")))
            if on and self.ctx.agent(rec.name).cooperative:
                online[rec.name] = on
                lvs[rec.name] = lv.get("vcpus")
        return CpuObservation(online, lvs, shares)

    def decide(self, obs: CpuObservation) -> CpuObservation:
        return obs  # the agent keeps the ratios; the shares are the registration's

    async def act(self, obs: CpuObservation) -> None:
        for vm, online in obs.online.items():
            prev = self.last_online.get(vm)
            self.last_online[vm] = online
            if self.record(vm) is not None:
                with self.ctx.store.transaction() as db:
                    db.execute("UPDATE cpu_vcpus SET guest_online = ?, libvirt = COALESCE(?, libvirt), "
                               "updated_at = ? WHERE vm = ?", (len(online), obs.libvirt.get(vm), time.time(), vm))
            if self.ctx.agents.supports(vm, "cpu.container-protect"):
                try:
                    await self.agent(vm, "cpu.container-protect")
                except DaemonError as exc:
                    log.debug("vm %s: container-protect failed: %s", vm, exc)
            if prev is not None and prev != online and self.ctx.agents.supports(vm, "cpu.container-rebalance"):
                try:
                    res = await self.agent(vm, "cpu.container-rebalance", {"reason": "cpus"})
                    self.ctx.decisions.log("rebalance", vm, {"online_before": list(prev), "online": list(online)},
                                           {"applied": res.get("applied"), "seconds": res.get("seconds")})
                except DaemonError as exc:
                    log.warning("vm %s: rebalance after CPU change failed: %s", vm, exc)
        await self.apply_qemu_shares(obs.shares)

    async def apply_qemu_shares(self, want: dict[str, int]) -> dict[str, str]:
        """Each running VM's QEMU cgroup ``cpu_shares`` from its registration, through the ledger."""
        for vm, shares in want.items():
            current = self.ctx.knobs.current(vm, SHARES)
            try:
                if current is None:
                    have = int((await self.ctx.blocking(self.ctx.host.schedinfo, vm))["cpu_shares"])
                    if have != shares:
                        await self.ctx.knobs.turn(self.name, vm, SHARES, "", shares, original=have)
                elif int(current) != shares:
                    await self.ctx.knobs.turn(self.name, vm, SHARES, "", shares)
                self.qemu_status[vm] = f"cpu_shares {shares} (libvirt schedinfo)"
            except (HostError, KeyError, TimeoutError) as exc:
                self.qemu_status[vm] = f"error: {exc}"
        return dict(self.qemu_status)

    async def vm_removed(self, vm: str) -> None:
        """The ledger restored its vCPUs, shares and hold; forget the rest."""
        self.last_online.pop(vm, None)
        self.qemu_status.pop(vm, None)
        self.scale_locks.pop(vm, None)
        with self.ctx.store.transaction() as db:
            db.execute("DELETE FROM cpu_vcpus WHERE vm = ?", (vm,))

    async def stop(self) -> None:
        """Online again the CPUs scaling offlined in guests (libvirt's own count and the holds
        and shares are the ledger's, restored after this)."""
        for r in self.ctx.store.query("SELECT vm, libvirt, guest_online FROM cpu_vcpus"):
            if not self.ctx.agent(r["vm"]).cooperative or (r["guest_online"] or 0) >= (r["libvirt"] or 0):
                continue
            try:
                res = await self.agent(r["vm"], "cpu.online", {}, timeout=30.0)
                log.info("vm %s: onlined the CPUs offlined by scaling: %s", r["vm"], res.get("online"))
                with self.ctx.store.transaction() as db:
                    db.execute("DELETE FROM cpu_vcpus WHERE vm = ?", (r["vm"],))
            except DaemonError as exc:
                log.warning("vm %s: could not online the offlined CPUs: %s", r["vm"], exc)

    def status(self) -> dict[str, Any]:
        return {"qemu": dict(self.qemu_status)}
