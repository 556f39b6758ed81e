"""``symbiontd``: the host daemon — a small core that drives the parts, in one asyncio loop.

The core collects host stats (psutil, PSI), libvirt's view of each VM (balloon, vCPUs) and
the guest's view from its agent (meminfo, vmstat, PSI, online CPUs), stores them in sqlite,
and then drives each part (:mod:`symbiont.part`) through its period in dependency order:
observe → decide → act. Parts turn knobs only through the knob ledger
(:mod:`symbiont.knobs`), which saves every original first and restores it when the VM is
unregistered or the daemon stops (``restore_on_exit``). See ``docs/architecture.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from symbiont import __version__, guest_stats
from symbiont import metrics as m
from symbiont.agentlink import AgentLink, AgentOpError, AgentUnavailable
from symbiont.config import Config, ConfigError, load_config
from symbiont.errors import Conflict, DaemonError, Invalid, NotFound, Unavailable
from symbiont.gateway import AgentGateway
from symbiont.host.libvirt_host import LibvirtError
from symbiont.host.port import HostError, HostPort
from symbiont.host.system import SystemHost, quiet_libvirt_errors
from symbiont.knobs import KnobLedger
from symbiont.part import AgentInfo, Part, PartContext, Period, order, run_period
from symbiont.plugins import part_classes
from symbiont.state import StateStore, VmRecord

log = logging.getLogger("symbiontd")

LIBVIRT_TIMEOUT = 30.0  # a libvirt call made while holding Daemon._lock gives up after this long
RESTORE_TIMEOUT = 60.0  # restoring one VM's knobs (libvirt + agent requests) gives up after this


class Daemon:
    """The daemon's state and operations; the API is a thin layer over these methods."""

    def __init__(self, cfg: Config, host: HostPort | None = None) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        self.store = StateStore(cfg.db_path)
        self.host: HostPort = host if host is not None else SystemHost(cfg.libvirt_uri)
        self.knobs = KnobLedger(self.store, on_restore=self._restored)
        self.links: dict[str, AgentLink] = {}
        self.agents = AgentGateway(self.links)
        self.latest: dict[str, dict[str, Any]] = {}  # per VM: last collected snapshot
        self.host_latest: dict[str, Any] = {}
        self.parts: dict[str, Part] = {}  # in dependency order (symbiont.part.order)
        self.loop_iterations = 0
        self.loop_cpu_s = 0.0
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # Per-VM collection tasks: a VM that does not answer holds only its own task (issue 16).
        self._collecting: dict[str, asyncio.Task[dict[str, dict[str, Any]]]] = {}
        self._build_parts()

    # -- the host -------------------------------------------------------------------------
    def _channel_path(self, vm: str) -> str | None:
        try:
            return self.host.channel_path(vm, self.cfg.agent.channel_name)
        except (HostError, DaemonError):
            return None

    # -- what every part's context offers (symbiont.part.Core) ------------------------------
    def registered(self) -> list[VmRecord]:
        return self.store.list_vms()

    def snapshot(self, vm: str) -> dict[str, Any]:
        return self.latest.get(vm, {})

    def host_snapshot(self) -> dict[str, Any]:
        return self.host_latest

    def agent_info(self, vm: str) -> AgentInfo:
        link = self.links.get(vm)
        if link is None:
            return AgentInfo()
        return AgentInfo(link.connected, link.ready, link.cooperative, tuple(link.caps))

    def wake(self) -> None:
        self._wake.set()

    def context(self, name: str, requires: tuple[str, ...] = ()) -> PartContext:
        """The narrow door of part ``name``."""
        return PartContext(name, cfg=self.cfg, store=self.store, knobs=self.knobs, host=self.host,
                           agents=self.agents, core=self, parts=self.parts, requires=requires)

    def _restored(self, vm: str, row: dict[str, Any], reason: str) -> None:
        with contextlib.suppress(Exception):
            self.store.log_decision(row["part"], "restore", vm or None, {"knob": row, "reason": reason}, {"ok": True})

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if isinstance(self.host, SystemHost):
            quiet_libvirt_errors()
        for rec in self.store.list_vms():
            self._start_link(rec.name)
        await self._start_parts()
        # Rows of VMs no longer registered (a kill -9 during an unregistration): restore them now.
        registered = {rec.name for rec in self.store.list_vms()}
        for vm in sorted({r["vm"] for r in self.knobs.rows()} - registered - {""}):
            await self.knobs.restore(vm=vm, reason="left by an earlier run; VM no longer registered")
        m.vms_registered.set(len(self.links))
        self._loop_task = asyncio.get_running_loop().create_task(self._control_loop(), name="control-loop")
        log.info("symbiontd %s started: %d VMs registered, period %.1f s",
                 __version__, len(self.links), self.cfg.control.period_s)

    async def stop(self) -> None:
        self._stop.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in self._collecting.values():
            task.cancel()
        for name, part in reversed(list(self.parts.items())):
            try:
                await part.stop()
            except Exception:
                log.exception("part %s failed to stop cleanly", name)
        if self.cfg.restore_on_exit:
            for name in list(self.links):
                await self._restore_bounded(name, reason="daemon stopping")
            await self.knobs.restore(vm="", reason="daemon stopping")  # host-wide knobs
        for link in list(self.links.values()):
            await link.stop()
        close = getattr(self.host, "close", None)
        if close is not None:
            close()
        self.store.close()
        log.info("symbiontd stopped")

    def _build_parts(self) -> None:
        """Discover the parts (``symbiont.<pkg>.part``) and construct them in ``requires`` order
        (cheap: nothing runs before :meth:`start`). A package without a ``part`` module (the
        CLI-only ``cluster``) is no daemon part."""
        classes = part_classes()
        for name in order(classes):
            cls = classes[name]
            section = getattr(self.cfg, name, None)
            self.parts[name] = cls(self.context(name, cls.requires), section if section is not None else cls.config())

    async def _start_parts(self) -> None:
        for name, part in self.parts.items():
            await part.start()
            log.info("part %s started", name)

    def _start_link(self, name: str) -> AgentLink:
        a = self.cfg.agent
        link = AgentLink(
            name,
            lambda: self._channel_path(name),
            frame_timeout=a.frame_timeout_s,
            request_timeout=self.cfg.control.agent_timeout_s,
            reconnect_max=a.reconnect_max_s,
            max_json=a.max_json_bytes,
            max_binary=a.max_binary_bytes,
            on_event=self._on_event,
            on_state=self._on_agent_state,
        )
        self.links[name] = link
        link.start()
        return link

    def _on_event(self, vm: str, name: str, data: dict[str, Any]) -> None:
        # The link has logged it (rate-limited and truncated: a guest must not fill the log).
        m.agent_events.labels(vm).inc()

    def _on_agent_state(self, vm: str, cooperative: bool, reason: str) -> None:
        m.vm_cooperative.labels(vm).set(1 if cooperative else 0)
        if cooperative:
            m.agent_handshakes.labels(vm).inc(0)
        elif reason.startswith("protocol error"):
            m.agent_protocol_errors.labels(vm).inc()
        with contextlib.suppress(Exception):
            self.store.log_decision("agent", "cooperative" if cooperative else "uncooperative", vm,
                                    {"reason": reason}, {})

    # -- registration ---------------------------------------------------------------------
    async def register(self, name: str, policy: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if self.store.get_vm(name) is not None:
                raise Conflict(f"VM {name!r} is already registered")
            try:
                info = await self._libvirt_bounded(self.host.info, name)
            except LibvirtError as exc:
                raise NotFound(f"no libvirt domain {name!r}: register a VM that exists") from exc
            mem = policy.get("memory", {})
            max_mib = info.max_memory_kib // 1024
            if mem.get("max_mib") is not None and mem["max_mib"] > max_mib:
                raise Invalid(f"memory.max_mib {mem['max_mib']} exceeds the VM's boot memory {max_mib} MiB")
            if mem.get("min_mib") is not None and mem.get("max_mib") is not None and mem["min_mib"] > mem["max_mib"]:
                raise Invalid("memory.min_mib must not exceed memory.max_mib")
            if mem.get("min_mib") is not None and mem["min_mib"] > max_mib:
                raise Invalid(f"memory.min_mib {mem['min_mib']} exceeds the VM's boot memory {max_mib} MiB")
            cpu = policy.get("cpu", {})
            if cpu.get("max_vcpus") is not None and cpu["max_vcpus"] > info.max_vcpus:
                raise Invalid(f"cpu.max_vcpus {cpu['max_vcpus']} exceeds the domain's maximum {info.max_vcpus}")
            if cpu.get("min_vcpus") is not None and cpu["min_vcpus"] > info.max_vcpus:
                raise Invalid(f"cpu.min_vcpus {cpu['min_vcpus']} exceeds the domain's maximum {info.max_vcpus}")
            if (cpu.get("min_vcpus") is not None and cpu.get("max_vcpus") is not None
                    and cpu["min_vcpus"] > cpu["max_vcpus"]):
                raise Invalid("cpu.min_vcpus must not exceed cpu.max_vcpus")
            self.store.add_vm(name, info.uuid, policy)
            self.store.log_decision("core", "register", name, {"policy": policy}, {"uuid": info.uuid})
            self._start_link(name)
            m.vms_registered.set(len(self.links))
        await self._tell_parts("vm_added", name)
        self._wake.set()
        return self.vm_view(name)

    async def _tell_parts(self, event: str, vm: str) -> None:
        """``vm_added`` / ``vm_removed`` to every part, in order; one part's failure is logged."""
        parts = self.parts.items() if event == "vm_added" else reversed(list(self.parts.items()))
        for pname, part in parts:
            try:
                async with asyncio.timeout(RESTORE_TIMEOUT):
                    await getattr(part, event)(vm)
            except Exception:
                log.exception("part %s: %s(%s) failed", pname, event, vm)

    async def unregister(self, name: str) -> None:
        # Everything awaited under the lock is bounded (issue 16, item 2: an unbounded wait
        # here once wedged every later register/unregister and the daemon's shutdown).
        async with self._lock:
            if self.store.get_vm(name) is None:
                raise NotFound(f"VM {name!r} is not registered")
            if self.cfg.restore_on_exit:
                await self._restore_bounded(name, reason="unregistered")
            await self._tell_parts("vm_removed", name)  # after the ledger, while the agent is still reachable
            link = self.links.pop(name, None)
            task = self._collecting.pop(name, None)
            if task is not None:
                task.cancel()
            self.store.remove_vm(name)
            self.latest.pop(name, None)
            self.store.log_decision("core", "unregister", name, {}, {})
            m.forget_vm(name)
            m.vms_registered.set(len(self.links))
        if link is not None:
            await link.stop()  # bounded too, and outside the lock: it only closes a channel

    async def _libvirt_bounded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking libvirt call in a thread, waited for at most LIBVIRT_TIMEOUT."""
        try:
            async with asyncio.timeout(LIBVIRT_TIMEOUT):
                return await asyncio.to_thread(fn, *args)
        except TimeoutError:
            raise Unavailable(f"libvirt did not answer within {LIBVIRT_TIMEOUT:.0f} s") from None
        except HostError as exc:
            if isinstance(exc, LibvirtError):
                raise
            raise LibvirtError(str(exc)) from None

    async def _restore_bounded(self, name: str, reason: str) -> None:
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT):
                await self._restore_knobs(name, reason)
        except TimeoutError:
            log.error("vm %s: restoring its knobs took over %.0f s; gave up (%s)", name, RESTORE_TIMEOUT, reason)

    # -- knobs ----------------------------------------------------------------------------
    async def _restore_knobs(self, name: str, reason: str) -> None:
        await self.knobs.restore(vm=name, reason=reason)

    # -- control loop ---------------------------------------------------------------------
    async def _control_loop(self) -> None:
        last_prune = 0.0
        while not self._stop.is_set():
            t0, c0 = time.monotonic(), time.process_time()
            try:
                await self.collect_once()
                await run_period(self.parts, Period(self.loop_iterations + 1))
                if time.time() - last_prune > 600:
                    self.store.prune(time.time() - self.cfg.control.history_keep_s)
                    last_prune = time.time()
            except Exception:  # the loop must survive anything a period throws
                log.exception("control loop iteration failed")
            dt, dc = time.monotonic() - t0, time.process_time() - c0
            self.loop_iterations += 1
            self.loop_cpu_s += dc
            m.control_loop_seconds.observe(dt)
            m.control_loop_cpu_seconds.inc(dc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, self.cfg.control.period_s - dt)):  # not wait_for: agentlink
                    await self._wake.wait()

    async def collect_once(self) -> None:
        now = time.time()
        host = await asyncio.to_thread(self.host.host_sample)
        self.host_latest = {"ts": now, **host}
        m.host_cpu_percent.set(host["cpu_percent"])
        m.host_mem_available_bytes.set(host["mem_available"])
        m.host_mem_total_bytes.set(host["mem_total"])
        for res, psi in host["psi"].items():
            if "some_avg10" in psi:
                m.host_psi_some_avg10.labels(res).set(psi["some_avg10"])
        rows: list[tuple[float, str | None, str, dict[str, Any]]] = [(now, None, "host", host)]
        # One task per VM, waited for at most 80 % of a period: a VM whose agent or libvirt
        # is slow delays only its own sample (marked stale), never the others' (issue 16).
        started: dict[str, asyncio.Task[dict[str, dict[str, Any]]]] = {}
        loop = asyncio.get_running_loop()
        for name in list(self.links):
            prev = self._collecting.get(name)
            if prev is not None and not prev.done():
                self.latest.setdefault(name, {})["stale"] = True  # still waiting on its last answer
                continue
            started[name] = self._collecting[name] = loop.create_task(self._collect_vm(name), name=f"collect-{name}")
        if started:
            await asyncio.wait(started.values(), timeout=max(0.05, 0.8 * self.cfg.control.period_s))
        for name, task in started.items():
            if task.done():
                rows.extend((now, name, src, data) for src, data in self._collected(name, task).items() if data)
            else:
                self.latest.setdefault(name, {})["stale"] = True
                task.add_done_callback(lambda t, name=name: self._store_late(name, t))
        self.store.add_samples(rows)

    def _collected(self, name: str, task: asyncio.Task[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        if task.cancelled():
            return {}
        exc = task.exception()
        if exc is not None:
            log.warning("vm %s: collection failed: %s", name, exc)
            return {}
        return task.result()

    def _store_late(self, name: str, task: asyncio.Task[dict[str, dict[str, Any]]]) -> None:
        """Store a sample that arrived after its period's deadline (if the VM is still ours)."""
        got = self._collected(name, task)  # retrieved in any case: no "exception never retrieved"
        if name not in self.links or self._stop.is_set():
            return
        now = time.time()
        with contextlib.suppress(Exception):
            self.store.add_samples([(now, name, src, data) for src, data in got.items() if data])

    async def _collect_vm(self, name: str) -> dict[str, dict[str, Any]]:
        snap: dict[str, Any] = {"ts": time.time()}
        out: dict[str, dict[str, Any]] = {}
        prev = self.latest.get(name, {})
        info = None
        try:
            info = await asyncio.to_thread(self.host.info, name)
            lv: dict[str, Any] = {
                "state": info.state, "memory_mib": info.memory_kib // 1024,
                "max_memory_mib": info.max_memory_kib // 1024, "vcpus": info.vcpus, "max_vcpus": info.max_vcpus,
            }
            if info.state == "running":
                pid = self.host.qemu_pid(name)
                lv["qemu_pid"] = pid
                lv["qemu_cpu_percent"] = self.host.process_cpu_percent(pid)
                lv["qemu_rss"] = self.host.process_rss(pid)
                plv = prev.get("libvirt") or {}
                if ("memstats_kib" in plv and plv.get("memory_mib") == lv["memory_mib"]
                        and self._idle_recent(prev.get("memstats_ts"), lv, snap["ts"])):
                    # idle, balloon target unchanged: the last dommemstat stands (QMP wakes QEMU)
                    lv["memstats_kib"], snap["memstats_ts"] = plv["memstats_kib"], prev["memstats_ts"]
                else:
                    lv["memstats_kib"] = await asyncio.to_thread(self.host.memory_stats, name)
                    snap["memstats_ts"] = snap["ts"]
            out["libvirt"] = lv
            snap["libvirt"] = lv
            m.vm_vcpus.labels(name).set(info.vcpus)
            if "actual" in lv.get("memstats_kib", {}):
                m.vm_balloon_actual_bytes.labels(name).set(lv["memstats_kib"]["actual"] * 1024)
            if lv.get("qemu_cpu_percent") is not None:
                m.vm_qemu_cpu_percent.labels(name).set(lv["qemu_cpu_percent"])
        except (HostError, DaemonError) as exc:
            snap["libvirt"] = {"state": "missing", "error": str(exc)}
        link = self.links.get(name)
        # A paused guest (parked by the paging part) cannot answer: asking would only time out.
        if (link is not None and link.ready and snap["libvirt"].get("state") != "paused" and "agent" in prev
                and self._idle_recent(prev.get("agent_ts"), snap["libvirt"], snap["ts"])):
            # Idle and asked less than control.idle_stats_s ago: keep its last sample. Under TCG
            # a stats request costs an idle guest ~0.3 % of a core at a 5 s period (bench_idle_guest).
            snap.update(agent=prev["agent"], agent_ts=prev["agent_ts"])
        elif link is not None and link.ready and snap["libvirt"].get("state") != "paused":
            try:
                raw, _ = await link.request("stats")
                gs = guest_stats.sanitize(
                    raw,
                    max_mem_bytes=info.max_memory_kib * 1024 if info is not None else None,
                    max_vcpus=info.max_vcpus if info is not None else None,
                )
                out["agent"] = gs
                snap["agent"] = gs
                snap["agent_ts"] = snap["ts"]
                mi = gs["meminfo"]
                if "MemTotal" in mi:
                    m.vm_guest_mem_total_bytes.labels(name).set(mi["MemTotal"])
                if "MemAvailable" in mi:
                    m.vm_guest_mem_available_bytes.labels(name).set(mi["MemAvailable"])
                m.vm_guest_online_cpus.labels(name).set(gs["cpus"]["count_online"])
                if "some_avg10" in gs["psi"]["memory"]:
                    m.vm_guest_psi_mem_some_avg10.labels(name).set(gs["psi"]["memory"]["some_avg10"])
            except (AgentUnavailable, AgentOpError, ValueError) as exc:
                snap["agent_error"] = str(exc)
        if name not in self.links:
            return {}  # unregistered while we waited
        m.vm_cooperative.labels(name).set(1 if link is not None and link.cooperative else 0)
        self.latest[name] = snap
        return out

    IDLE_STATS_CPU_PCT = 5.0

    def _idle_recent(self, last_ts: float | None, lv: dict[str, Any], now: float) -> bool:
        """Whether a sample taken at ``last_ts`` may stand for this period (``control.idle_stats_s``):
        the VM's QEMU used under IDLE_STATS_CPU_PCT of a core last period and the sample is younger."""
        keep = self.cfg.control.idle_stats_s
        cpu = lv.get("qemu_cpu_percent")
        return (keep > 0 and last_ts is not None and isinstance(cpu, (int, float))
                and cpu < self.IDLE_STATS_CPU_PCT and now - last_ts < keep)

    # -- views ----------------------------------------------------------------------------
    def vm_view(self, name: str) -> dict[str, Any]:
        rec = self.store.get_vm(name)
        if rec is None:
            raise NotFound(f"VM {name!r} is not registered")
        link = self.links.get(name)
        snap = self.latest.get(name, {})
        lv = snap.get("libvirt", {})
        ag = snap.get("agent", {})
        mi = ag.get("meminfo", {})
        return {
            "name": name,
            "uuid": rec.uuid,
            "policy": rec.policy,
            "registered_at": rec.registered_at,
            "cooperative": bool(link and link.cooperative),
            "agent": {
                "connected": bool(link and link.connected),
                "hello": link.hello if link else None,
                "handshakes": link.stats.handshakes if link else 0,
                "protocol_errors": link.stats.protocol_errors if link else 0,
                "timeouts": link.stats.timeouts if link else 0,
                "last_error": link.stats.last_error if link else "",
                "log_lines_suppressed": link.guest_log.suppressed_total if link else 0,
            },
            "stats_at": snap.get("ts"),
            "stats_stale": bool(snap.get("stale")),
            "state": lv.get("state"),
            "balloon_mib": lv.get("memory_mib"),
            "balloon_actual_mib": (lv.get("memstats_kib", {}).get("actual", 0) // 1024) or None,
            "max_memory_mib": lv.get("max_memory_mib"),
            "vcpus": lv.get("vcpus"),
            "effective_vcpus": ag.get("cpus", {}).get("count_online"),
            "max_vcpus": lv.get("max_vcpus"),
            "qemu_cpu_percent": lv.get("qemu_cpu_percent"),
            "guest": {
                "mem_total_mib": mi["MemTotal"] // (1 << 20) if "MemTotal" in mi else None,
                "mem_available_mib": mi["MemAvailable"] // (1 << 20) if "MemAvailable" in mi else None,
                "online_cpus": ag.get("cpus", {}).get("count_online"),
                "psi_memory_some_avg10": ag.get("psi", {}).get("memory", {}).get("some_avg10"),
                "loadavg": ag.get("loadavg"),
            },
            "knobs": self.store.knobs(name),
        }

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "period_s": self.cfg.control.period_s,
            "loop_iterations": self.loop_iterations,
            "loop_cpu_s": round(self.loop_cpu_s, 4),
            "vms": len(self.links),
            "cooperative": sum(1 for link in self.links.values() if link.cooperative),
            "host": self.host_latest,
            "samples": self.store.count_samples(),
            "parts": {name: self._part_status(part) for name, part in self.parts.items()},
        }

    @staticmethod
    def _part_status(part: Part) -> Any:
        try:
            return part.status()
        except Exception as exc:  # one part's view must not break the status
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon handles signals and cleans up."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


async def serve(cfg: Config, ready: Callable[[Daemon], None] | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT: API on the unix socket, control loop, agents."""
    from symbiont.api import create_app

    daemon = Daemon(cfg)
    sock = Path(cfg.socket)
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.exists() or sock.is_symlink():
        sock.unlink()
    app = create_app(daemon)
    server = _Server(uvicorn.Config(app, uds=str(sock), log_level="warning", access_log=False, lifespan="on"))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await daemon.start()
    api_task = loop.create_task(server.serve(), name="api")
    try:  # whatever fails from here on, the socket goes with the daemon: no stale socket is left
        while not server.started and not api_task.done():
            await asyncio.sleep(0.02)
        if api_task.done():
            api_task.result()
            raise SystemExit("API server failed to start")
        os.chmod(sock, cfg.socket_mode)
        if cfg.socket_group:
            try:
                gid = grp.getgrnam(cfg.socket_group).gr_gid
            except KeyError:
                raise SystemExit(f"socket_group: no group {cfg.socket_group!r} on this host") from None
            os.chown(sock, -1, gid)
        log.info("API listening on %s (mode %04o)", sock, cfg.socket_mode)
        if ready:
            ready(daemon)
        await api_task
    finally:
        if not api_task.done():  # failed while starting: stop serving first
            server.should_exit = True
            with contextlib.suppress(Exception):
                await api_task
        await daemon.stop()
        with contextlib.suppress(OSError):
            sock.unlink()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="symbiontd",
        description="symbiont host daemon: collects host, libvirt and guest-agent stats, serves the "
        "HTTP+JSON API on a unix socket and runs the parts' control policies.",
    )
    ap.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    ap.add_argument("--check-config", action="store_true", help="validate the config and exit")
    ap.add_argument("--print-default-config", action="store_true", help="print the default config and exit")
    ap.add_argument("--profile", help="a named set of defaults (e.g. overcommit); overrides the config's profile")
    args = ap.parse_args(argv)
    if args.print_default_config:
        from symbiont.config import dump_default_config

        try:
            print(dump_default_config(args.profile or ""), end="")
        except ConfigError as exc:
            print(f"symbiontd: config error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    try:
        cfg = load_config(args.config, {"profile": args.profile} if args.profile else None)
    except ConfigError as exc:
        print(f"symbiontd: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.check_config:
        print("config OK")
        return
    logging.basicConfig(
        level=cfg.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    # Run main() from the importable module, not from __main__: otherwise the API module's
    # `from symbiont.daemon import DaemonError` would name a different class than the one
    # this copy raises, and every 4xx would turn into a 500.
    from symbiont.daemon import main as _main

    _main()
