"""Controller of the CPU-and-nesting part: vCPU scaling, containers' ratios, reclamation, QEMU weights.

* **vCPU scaling** (:meth:`CpuController.scale`). Up: libvirt hot-plugs (``setVcpusFlags``,
  live) what the VM lacks, the agent onlines. Down: the agent offlines first, then libvirt is
  asked to unplug; under TCG that unplug regularly exceeds libvirt's fixed 5 s ("vcpu unplug
  request timed out") and libvirt's live count goes stale and later unplugs fail, so a
  timeout is accepted: the guest-side offline is what takes the CPUs away from the
  workload. The daemon's record (table ``cpu_vcpus``) keeps all three views — what was
  requested, what libvirt says, what the guest has online — and which of them is stale.
* **Ratios** are kept by the agent itself (its ``online-cpus`` re-applies the containers' CPU
  plan); the periodic hook also asks for a rebalance whenever it sees the guest's online CPUs
  change by other means (a udev-onlined hot-plug, ``symbiont vm vcpus``).
* **Nesting-aware balloon** (:meth:`CpuController.balloon`): before inflating, the agent
  reclaims from containers in proportion to their shares (never from no-reclaim ones), then
  the daemon moves the balloon; deflating lifts the agent's hold again. Baseline: the stock
  balloon, ``daemon.set_memory`` alone.
* **QEMU cgroup weights** on a cgroup v2 host: each VM's QEMU group gets ``cpu.weight`` from
  its registration (``cpu.weight``); originals are saved first and restored on stop. On a
  host whose cgroup v2 mount has no ``cpu`` controller (this lab's hybrid host) it reports
  why it does nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from typing import Any

from symbiont.agentlink import AgentLink, AgentOpError, AgentUnavailable
from symbiont.cpu import policy
from symbiont.daemon import Conflict, Daemon, DaemonError, Invalid, NotFound, Unavailable
from symbiont.host.libvirt_host import LibvirtError
from symbiont_agent.containers_cgroup import Cgroup, CgroupError, cgroup2_mount, cgroup_of_pid

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
);
CREATE TABLE IF NOT EXISTS cpu_qemu_knobs (
    vm TEXT NOT NULL,
    path TEXT NOT NULL,
    file TEXT NOT NULL,
    original TEXT NOT NULL,
    current TEXT NOT NULL,
    changed_at REAL NOT NULL,
    PRIMARY KEY (vm, file)
);
CREATE TABLE IF NOT EXISTS cpu_reclaim_holds (
    vm TEXT PRIMARY KEY,
    since REAL NOT NULL,
    detail TEXT NOT NULL
);
"""

_ERROR_STATUS = {"NoSuchContainer": NotFound, "InvalidSpec": Invalid, "Conflict": Conflict, "ValueError": Invalid}


def agent_error(vm: str, exc: Exception) -> DaemonError:
    """Map an agent's ``TypeName: message`` answer to the API's 4xx/5xx."""
    text = str(exc)
    kind, _, rest = text.partition(": ")
    cls = _ERROR_STATUS.get(kind)
    if cls is not None:
        return cls(f"{vm}: {rest}")
    if isinstance(exc, AgentUnavailable):
        return Unavailable(f"{vm}: agent unavailable: {text}")
    if "does not support" in text:
        return Conflict(f"{text} (an agent without container support: rebuild the image)")
    return Unavailable(f"{vm}: agent error: {text}")


def _int_list(v: Any, limit: int = 4096) -> list[int]:
    if not isinstance(v, list):
        return []
    return sorted({c for c in v[:limit] if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < limit})


class CpuController:
    """The part's state for one daemon (one per daemon, see :func:`controller_for`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.last_online: dict[str, tuple[int, ...]] = {}
        self.qemu_status: dict[str, str] = {}
        self.scale_locks: dict[str, asyncio.Lock] = {}
        self._schema = False

    def ensure_schema(self) -> None:
        if not self._schema:
            self.daemon.store.ensure_schema(SCHEMA)
            self._schema = True

    # -- agent requests -------------------------------------------------------------------
    def link(self, vm: str) -> AgentLink:
        self.daemon._require(vm)
        link = self.daemon.links.get(vm)
        if link is None or not link.ready:
            raise Unavailable(f"{vm}: the guest agent is not connected")
        return link

    async def agent(self, vm: str, op: str, args: dict[str, Any] | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        link = self.link(vm)
        try:
            result, _ = await link.request(op, args or {}, timeout=timeout)
        except (AgentOpError, AgentUnavailable) as exc:
            raise agent_error(vm, exc) from None
        if not isinstance(result, dict):
            raise Unavailable(f"{vm}: agent answered {op} with a {type(result).__name__}, not an object")
        return result

    # -- vCPU scaling ---------------------------------------------------------------------
    async def scale(self, vm: str, count: int, libvirt_unplug: bool = False, reason: str = "api") -> dict[str, Any]:
        """Scale ``vm`` to ``count`` vCPUs; returns timings and every view of the result.

        ``ratios_in_force_s`` is from the call to the moment the agent reported the
        containers' CPU plan for the new CPUs applied.
        """
        self.ensure_schema()
        lock = self.scale_locks.setdefault(vm, asyncio.Lock())
        async with lock:
            return await self._scale(vm, count, libvirt_unplug, reason)

    async def _scale(self, vm: str, count: int, libvirt_unplug: bool, reason: str) -> dict[str, Any]:
        d = self.daemon
        t0 = time.monotonic()
        pol = d._require(vm)
        info = await d._info(vm)
        if info.state != "running":
            raise Conflict(f"VM {vm!r} is {info.state}; vCPU scaling needs a running VM")
        cpu = pol.get("cpu", {})
        lo = int(cpu.get("min_vcpus") or 1)
        hi = min(int(cpu.get("max_vcpus") or info.max_vcpus), info.max_vcpus)
        if not lo <= count <= hi:
            raise Invalid(f"vcpus {count} outside this VM's range {lo}..{hi}")
        link = self.link(vm)
        if not link.cooperative:
            raise Unavailable(f"{vm}: the guest agent is not cooperative; scaling needs it to online/offline")
        stats = await self.agent(vm, "stats")
        online_before = _int_list((stats.get("cpus") or {}).get("online"))
        step = policy.plan_scale(len(online_before), info.vcpus, count, hi, lo, libvirt_unplug)
        timings: dict[str, float] = {}
        guest: dict[str, Any] = {}
        libvirt_outcome = "not needed"
        if step.direction == "down":
            t = time.monotonic()
            guest = await self.agent(vm, "online-cpus", {"target": count}, timeout=30.0)
            timings["guest_offline_s"] = time.monotonic() - t
            timings["ratios_in_force_s"] = time.monotonic() - t0
            if step.libvirt:
                d.store.save_knob(vm, "vcpus", info.vcpus, count)
                t = time.monotonic()
                libvirt_outcome = await self._libvirt_set(vm, count)
                timings["libvirt_s"] = time.monotonic() - t
            else:
                libvirt_outcome = "skipped: offlined in the guest only"
        elif step.direction == "up":
            if step.libvirt:
                d.store.save_knob(vm, "vcpus", info.vcpus, count)
                t = time.monotonic()
                libvirt_outcome = await self._libvirt_set(vm, count)
                timings["libvirt_s"] = time.monotonic() - t
                if libvirt_outcome.startswith("error"):
                    raise Unavailable(f"{vm}: hot-plug to {count} vCPUs failed: {libvirt_outcome}")
            t = time.monotonic()
            guest = await self._online_until(vm, count)
            timings["guest_online_s"] = time.monotonic() - t
            timings["ratios_in_force_s"] = time.monotonic() - t0
        online = _int_list(guest.get("online")) if guest else online_before
        lv = (await d._info(vm)).vcpus
        qemu = await asyncio.to_thread(self.qemu_vcpus, vm) if libvirt_outcome.startswith("timeout") else None
        record = self._save_record(vm, count, lv, len(online), qemu, int(libvirt_outcome.startswith("timeout")),
                                   {"direction": step.direction, "libvirt": libvirt_outcome, "at": time.time()})
        timings["total_s"] = time.monotonic() - t0
        if step.direction != "none" and len(online) != count:
            raise Unavailable(f"{vm}: asked for {count} vCPUs but the guest has {len(online)} online: {online}")
        out: dict[str, Any] = {
            "vm": vm, "step": step.as_dict(), "reason": reason,
            "before": {"guest_online": len(online_before), "libvirt": info.vcpus},
            "after": {"guest_online": len(online), "online": online, "libvirt": lv, "qemu": qemu},
            "libvirt": libvirt_outcome, "containers": guest.get("containers") if guest else None,
            "timings": {k: round(v, 4) for k, v in timings.items()}, "record": record,
        }
        self.last_online[vm] = tuple(online)
        d.store.log_decision("cpu", "scale", vm, {"count": count, "step": step.as_dict(), "reason": reason},
                             {"libvirt": libvirt_outcome, "online": online, "libvirt_live": lv,
                              "timings": out["timings"]})
        log.info("vm %s: vCPUs -> %d (%s): guest online %s, libvirt %d (%s), ratios in force after %.3f s",
                 vm, count, step.direction, online, lv, libvirt_outcome, timings.get("ratios_in_force_s", 0.0))
        d._wake.set()
        return out

    def qemu_vcpus(self, vm: str) -> int | None:
        """QEMU's own vCPU count (query-cpus-fast): the truth when libvirt's went stale."""
        try:
            import libvirt_qemu

            reply = libvirt_qemu.qemuMonitorCommand(self.daemon.libvirt.domain(vm),
                                                    '{"execute":"query-cpus-fast"}', 0)
            cpus = json.loads(reply).get("return")
            return len(cpus) if isinstance(cpus, list) else None
        except Exception as exc:  # best effort: a view, never a reason to fail the step
            log.debug("vm %s: query-cpus-fast failed: %s", vm, exc)
            return None

    async def _libvirt_set(self, vm: str, count: int) -> str:
        try:
            await asyncio.to_thread(self.daemon.libvirt.set_vcpus, vm, count)
            return "ok"
        except LibvirtError as exc:
            text = str(exc)
            if "timed out" in text.lower():
                return f"timeout (accepted: the guest has offlined the CPUs): {text}"
            return f"error: {text}"

    async def _online_until(self, vm: str, count: int, timeout: float = 20.0) -> dict[str, Any]:
        """Online CPUs up to ``count``; after a hot-plug, wait until the new CPUs are present."""
        deadline = time.monotonic() + timeout
        while True:
            if await self._present(vm) >= count:
                res = await self.agent(vm, "online-cpus", {"target": count}, timeout=30.0)
                if len(_int_list(res.get("online"))) >= count:
                    return res
            if time.monotonic() > deadline:
                return await self.agent(vm, "online-cpus", {}, timeout=30.0)
            await asyncio.sleep(0.25)  # the ACPI hot-plug has not reached the guest yet

    async def _present(self, vm: str) -> int:
        stats = await self.agent(vm, "stats")
        return len(_int_list((stats.get("cpus") or {}).get("present")))

    def _save_record(self, vm: str, requested: int, lv: int, online: int, qemu: int | None, timeouts: int,
                     step: dict[str, Any]) -> dict[str, Any]:
        with self.daemon.store.transaction() as db:
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
        self.ensure_schema()
        rows = self.daemon.store.query("SELECT * FROM cpu_vcpus WHERE vm = ?", (vm,))
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
        self.ensure_schema()
        info = await self.daemon._info(vm)
        snap = self.daemon.latest.get(vm, {})
        online = _int_list(snap.get("agent", {}).get("cpus", {}).get("online"))
        link = self.daemon.links.get(vm)
        if link is not None and link.ready:
            try:
                online = _int_list(((await self.agent(vm, "stats")).get("cpus") or {}).get("online")) or online
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
        self.ensure_schema()
        d = self.daemon
        pol = d._require(vm)
        info = await d._info(vm)
        before = info.memory_kib // 1024
        # Validate as daemon.set_memory will, before the guest is asked to give anything up.
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
            link = self.link(vm)
            if "ct-reclaim" not in link.caps:
                raise Conflict(f"{vm}: the agent cannot reclaim from containers (no ct-reclaim)")
            want = (before - target_mib) << 20
            out["reclaim"] = await self.agent(vm, "ct-reclaim", {"bytes": want, "use_free": use_free}, timeout=60.0)
            with d.store.transaction() as db:
                db.execute("INSERT INTO cpu_reclaim_holds (vm, since, detail) VALUES (?, ?, ?) "
                           "ON CONFLICT (vm) DO UPDATE SET detail = excluded.detail",
                           (vm, time.time(), json.dumps({"target_mib": target_mib})))
        out["reclaim_s"] = round(time.monotonic() - t0, 4)
        out["balloon"] = await d.set_memory(vm, target_mib, reason=f"cpu/{reason}")
        if target_mib >= before:
            out["release"] = await self.release(vm)
        d.store.log_decision("cpu", "nesting-aware-balloon" if nesting_aware else "balloon", vm,
                             {"target_mib": target_mib, "before_mib": before, "use_free": use_free},
                             {"freed": (out.get("reclaim") or {}).get("freed"), "reclaim_s": out["reclaim_s"]})
        return out

    async def release(self, vm: str) -> dict[str, Any] | None:
        """Lift the agent's reclamation hold (memory.high) on ``vm``'s containers."""
        self.ensure_schema()
        rows = self.daemon.store.query("SELECT vm FROM cpu_reclaim_holds WHERE vm = ?", (vm,))
        link = self.daemon.links.get(vm)
        if link is None or not link.ready or "ct-release" not in link.caps:
            return None
        res = await self.agent(vm, "ct-release")
        if rows:
            with self.daemon.store.transaction() as db:
                db.execute("DELETE FROM cpu_reclaim_holds WHERE vm = ?", (vm,))
        return res

    # -- periodic hook ------------------------------------------------------------------------
    async def hook(self, daemon: Daemon) -> None:
        self.ensure_schema()
        for vm, link in list(daemon.links.items()):
            snap = daemon.latest.get(vm, {})
            online = tuple(_int_list(snap.get("agent", {}).get("cpus", {}).get("online")))
            if not online or not link.cooperative:
                continue
            prev = self.last_online.get(vm)
            self.last_online[vm] = online
            lv = snap.get("libvirt", {}).get("vcpus")
            if self.record(vm) is not None:
                with daemon.store.transaction() as db:
                    db.execute("UPDATE cpu_vcpus SET guest_online = ?, libvirt = COALESCE(?, libvirt), "
                               "updated_at = ? WHERE vm = ?", (len(online), lv, time.time(), vm))
            if "ct-protect" in link.caps:
                try:
                    await self.agent(vm, "ct-protect")
                except DaemonError as exc:
                    log.debug("vm %s: ct-protect failed: %s", vm, exc)
            if prev is not None and prev != online and "ct-rebalance" in link.caps:
                try:
                    res = await self.agent(vm, "ct-rebalance", {"reason": "cpus"})
                    daemon.store.log_decision("cpu", "rebalance", vm, {"online_before": list(prev),
                                                                       "online": list(online)},
                                              {"applied": res.get("applied"), "seconds": res.get("seconds")})
                except DaemonError as exc:
                    log.warning("vm %s: rebalance after CPU change failed: %s", vm, exc)
        await asyncio.to_thread(self.apply_qemu_weights)

    # -- QEMU cgroup weights (cgroup v2 hosts) ---------------------------------------------------
    def qemu_group(self, vm: str) -> tuple[Cgroup | None, str]:
        """The cgroup v2 group of ``vm``'s QEMU, or None and why not."""
        root = cgroup2_mount()
        if root is None:
            return None, "no cgroup v2 file system mounted on this host"
        try:
            controllers = Cgroup(root).controllers()
        except CgroupError as exc:
            return None, str(exc)
        if "cpu" not in controllers:
            return None, f"the cgroup v2 mount {root} has no cpu controller (a hybrid v1/v2 host): nothing to set"
        try:
            pid = self.daemon.libvirt.qemu_pid(vm)
        except DaemonError as exc:
            return None, str(exc)
        if pid is None:
            return None, "QEMU not running"
        g = cgroup_of_pid(pid, root)
        if g is None or not g.exists:
            return None, f"no cgroup v2 group for QEMU pid {pid}"
        if not g.has("cpu.weight"):
            return None, f"{g.path}: the cpu controller is not enabled for this group"
        return g, "ok"

    def apply_qemu_weights(self) -> dict[str, str]:
        for rec in self.daemon.store.list_vms():
            g, why = self.qemu_group(rec.name)
            if g is None:
                self.qemu_status[rec.name] = why
                continue
            want = policy.qemu_cpu_weight((rec.policy.get("cpu") or {}).get("weight"))
            try:
                cur = g.cpu_weight()
                if cur != want:
                    with self.daemon.store.transaction() as db:
                        db.execute("INSERT INTO cpu_qemu_knobs (vm, path, file, original, current, changed_at) "
                                   "VALUES (?, ?, 'cpu.weight', ?, ?, ?) ON CONFLICT (vm, file) DO UPDATE SET "
                                   "current = excluded.current, changed_at = excluded.changed_at",
                                   (rec.name, g.path, str(cur), str(want), time.time()))
                    g.set_cpu_weight(want)
                self.qemu_status[rec.name] = f"cpu.weight {want} on {g.path}"
            except (CgroupError, ValueError) as exc:
                self.qemu_status[rec.name] = f"error: {exc}"
        return dict(self.qemu_status)

    def restore_qemu_weights(self) -> list[str]:
        done = []
        for r in self.daemon.store.query("SELECT * FROM cpu_qemu_knobs"):
            g = Cgroup(r["path"])
            try:
                if g.exists:
                    g.write(r["file"], r["original"])
                done.append(f"{r['vm']}: {r['file']} = {r['original']}")
            except CgroupError as exc:
                log.warning("vm %s: could not restore %s: %s", r["vm"], r["file"], exc)
                continue
            with self.daemon.store.transaction() as db:
                db.execute("DELETE FROM cpu_qemu_knobs WHERE vm = ? AND file = ?", (r["vm"], r["file"]))
        return done

    async def stop(self) -> None:
        """Put back what the part changed: CPUs offlined in guests come back online (libvirt's
        own count is the daemon's ``vcpus`` knob), reclamation holds are lifted, QEMU weights
        restored."""
        self.ensure_schema()
        for r in self.daemon.store.query("SELECT vm, libvirt, guest_online FROM cpu_vcpus"):
            link = self.daemon.links.get(r["vm"])
            if link is None or not link.cooperative or (r["guest_online"] or 0) >= (r["libvirt"] or 0):
                continue
            try:
                res = await self.agent(r["vm"], "online-cpus", {}, timeout=30.0)
                log.info("vm %s: onlined the CPUs offlined by scaling: %s", r["vm"], res.get("online"))
                with self.daemon.store.transaction() as db:
                    db.execute("DELETE FROM cpu_vcpus WHERE vm = ?", (r["vm"],))
            except DaemonError as exc:
                log.warning("vm %s: could not online the offlined CPUs: %s", r["vm"], exc)
        for r in self.daemon.store.query("SELECT vm FROM cpu_reclaim_holds"):
            try:
                await self.release(r["vm"])
            except DaemonError as exc:
                log.warning("vm %s: could not lift the reclamation hold: %s", r["vm"], exc)
        restored = await asyncio.to_thread(self.restore_qemu_weights)
        for line in restored:
            log.info("restored %s", line)


_CONTROLLERS: weakref.WeakKeyDictionary[Any, CpuController] = weakref.WeakKeyDictionary()


def controller_for(daemon: Daemon) -> CpuController:
    ctl = _CONTROLLERS.get(daemon)
    if ctl is None:
        ctl = CpuController(daemon)
        _CONTROLLERS[daemon] = ctl
    return ctl


async def start(daemon: Daemon) -> None:
    ctl = controller_for(daemon)
    ctl.ensure_schema()

    async def hook(d: Daemon) -> None:
        await ctl.hook(d)

    daemon.hooks.append(hook)


async def stop(daemon: Daemon) -> None:
    await controller_for(daemon).stop()
