"""The dedup part inside the daemon: observe KSM, scan guest RAM, tune KSM when asked to.

Nothing is tuned unless asked (opt-in): the policy is ``off`` until either

* the API sets one (``PUT /v1/dedup/policy``; persisted in sqlite, so a restarted daemon resumes
  it), or
* a registered VM asks for one in its registration: ``extra: {dedup: {policy: hint}}`` (the API's
  setting wins; among VMs, the first by name).

While ``off`` the part only *reads*: KSM counters, ksmd's CPU, each VM's merged pages, whether
its RAM is mergeable. Per-VM options, in the registration's ``extra.dedup``:

``cross_vm`` (default true)
    false: the VM opts out of cross-VM sharing (see :mod:`symbiont.dedup.tenancy` for what is
    enforced and how);
``scan`` (default true)
    whether the hashing engine reads this VM's RAM for the sharing estimate;
``policy`` (optional)
    one of ``stock``, ``ksmtuned``, ``hint``, ``fixed``, ``advisor``, ``off``: requests a host-wide policy.

Every knob change is saved first (:class:`~.ksm_controller.KsmController`) and restored when the
policy goes back to ``off``, when the daemon stops, and at the next start after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from symbiont.dedup import metrics, tenancy
from symbiont.dedup.backends import BACKENDS, PAGE_SIZE, BackendError, HashBackend, select_backend
from symbiont.dedup.engine import Engine, EngineError, ScanReport
from symbiont.dedup.ksm_controller import KsmController, Sample, SqliteKnobStore
from symbiont.dedup.memsource import (
    PM_PFN_MASK,
    PM_PRESENT,
    Mapping,
    ProcessMemorySource,
    find_guest_ram,
    host_mergeable_pages,
    read_pagemap,
    read_smaps,
    zero_pfns,
)
from symbiont.dedup.policy import (
    POLICIES,
    AdvisorParams,
    Decision,
    HintInputs,
    HintParams,
    KsmtunedInputs,
    KsmtunedParams,
    advisor,
    fixed,
    hint_step,
    ksmtuned_step,
    params_from,
    remaining_now,
    stock,
)
from symbiont.host.ksm import Ksm, KsmError, process_ksm_stat

log = logging.getLogger(__name__)

SETTINGS_SCHEMA = "CREATE TABLE IF NOT EXISTS dedup_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
PART = "dedup"
QEMU_NAME = re.compile(r"^qemu(-(kvm|system-.+)|:.{1,11})$")  # ksmtuned's pgrep pattern


class ModeError(ValueError):
    """An invalid policy request (the message names the field)."""


@dataclass
class Mode:
    """The host-wide KSM policy and its parameters."""

    policy: str = "off"
    source: str = "default"  # api | registration:<vm> | default
    pages_to_scan: int | None = None  # fixed
    sleep_millisecs: int | None = None  # fixed
    max_page_sharing: int | None = None  # set while active, restored after
    use_zero_pages: int | None = None
    hint: dict[str, Any] = field(default_factory=dict)
    ksmtuned: dict[str, Any] = field(default_factory=dict)
    advisor: dict[str, Any] = field(default_factory=dict)  # AdvisorParams overrides (policy advisor)
    backend: str = "auto"
    gpu_type: str = "A100"
    scan_interval_s: float = 30.0
    unmerge_on_stop: bool = False

    def validate(self) -> Mode:
        if self.policy not in POLICIES:
            raise ModeError(f"policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.policy == "fixed" and (self.pages_to_scan is None or self.sleep_millisecs is None):
            raise ModeError("policy fixed needs pages_to_scan and sleep_millisecs")
        if self.pages_to_scan is not None and not 1 <= self.pages_to_scan <= 1_000_000:
            raise ModeError("pages_to_scan: must be between 1 and 1000000")
        if self.sleep_millisecs is not None and not 1 <= self.sleep_millisecs <= 600_000:
            raise ModeError("sleep_millisecs: must be between 1 and 600000")
        if self.max_page_sharing is not None and not 2 <= self.max_page_sharing <= 1 << 20:
            raise ModeError("max_page_sharing: must be between 2 and 1048576")
        if self.use_zero_pages not in (None, 0, 1):
            raise ModeError("use_zero_pages: must be 0 or 1")
        if self.backend not in BACKENDS and self.backend not in ("sim", "simulated"):
            raise ModeError(f"backend: must be one of {', '.join(BACKENDS)}")
        if not 1.0 <= self.scan_interval_s <= 86400:
            raise ModeError("scan_interval_s: must be between 1 and 86400")
        for name, cls, d in (("hint", HintParams, self.hint), ("ksmtuned", KsmtunedParams, self.ksmtuned),
                             ("advisor", AdvisorParams, self.advisor)):  # fmt: skip
            unknown = set(d) - {f.name for f in fields(cls)} - {"unknown"}
            if unknown:
                raise ModeError(f"{name}: unknown parameter(s) {', '.join(sorted(unknown))}")
            try:
                params_from(d, cls)
            except (TypeError, ValueError) as exc:
                raise ModeError(f"{name}: {exc}") from None
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mode:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModeError(f"unknown field(s): {', '.join(sorted(unknown))}")
        return cls(**d).validate()


@dataclass(frozen=True)
class VmSettings:
    """A VM's dedup options from its registration (``policy["extra"]["dedup"]``)."""

    cross_vm: bool = True
    scan: bool = True
    policy: str | None = None
    errors: tuple[str, ...] = ()


def vm_settings(policy: dict[str, Any] | None) -> VmSettings:
    """Parse and validate a registration's dedup options; bad values are ignored and reported."""
    raw = ((policy or {}).get("extra") or {}).get(PART)
    if raw is None:
        return VmSettings()
    if not isinstance(raw, dict):
        return VmSettings(errors=(f"extra.dedup must be a mapping, got {type(raw).__name__}",))
    errors: list[str] = []
    out: dict[str, Any] = {}
    for key, val in raw.items():
        if key in ("cross_vm", "scan"):
            if isinstance(val, bool):
                out[key] = val
            else:
                errors.append(f"extra.dedup.{key} must be true or false")
        elif key == "policy":
            if val in POLICIES:
                out[key] = val
            else:
                errors.append(f"extra.dedup.policy must be one of {', '.join(POLICIES)}")
        else:
            errors.append(f"extra.dedup.{key}: unknown option")
    return VmSettings(**out, errors=tuple(errors))


def _meminfo_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[k] = int(parts[0])
    return out


def qemu_committed_kib() -> int:
    """ksmtuned's committed memory: the summed RSS of every QEMU process on the host."""
    total = 0
    for p in psutil.process_iter(["name", "memory_info"]):
        try:
            if QEMU_NAME.match(p.info["name"] or "") and p.info["memory_info"] is not None:
                total += p.info["memory_info"].rss // 1024
        except psutil.Error:
            continue
    return total


class DedupService:
    """One per daemon (see :mod:`symbiont.dedup.controller`)."""

    def __init__(self, daemon: Any, ksm: Ksm | None = None) -> None:
        self.daemon = daemon
        self.ksm = ksm or Ksm()
        self.available = self.ksm.available()
        daemon.store.ensure_schema(SETTINGS_SCHEMA)
        self.ctl = KsmController(self.ksm, SqliteKnobStore(daemon.store))
        self.api_mode: Mode | None = self._load_mode()
        self.report: ScanReport | None = None
        self.report_meta: dict[str, Any] = {}
        self.vms: dict[str, dict[str, Any]] = {}
        self.verdicts: list[tenancy.Verdict] = []
        self.blocked = ""
        self.sample: Sample | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=720)
        self.last: Decision | None = None
        self.last_mode: Mode = Mode()
        self.ksmtuned_npages = 0
        self.ksmtuned_at = 0.0
        self.unmerged_for: set[str] = set()
        self.mode_notes: list[str] = []
        self._scan_task: asyncio.Task[Any] | None = None
        self._scan_lock = threading.Lock()
        self._backend: HashBackend | None = None
        self._backend_key: tuple[str, str] | None = None
        self.errors: deque[str] = deque(maxlen=20)
        self._exported: set[str] = set()
        self.host_mergeable = 0
        self._maps: dict[int, tuple[float, Mapping | None]] = {}

    # -- persistence of the API's mode --------------------------------------------------------
    def _load_mode(self) -> Mode | None:
        rows = self.daemon.store.query("SELECT value FROM dedup_settings WHERE key = 'mode'")
        if not rows:
            return None
        try:
            return Mode.from_dict(json.loads(rows[0]["value"]))
        except (ModeError, TypeError, ValueError) as exc:
            log.warning("dedup: ignoring the saved policy: %s", exc)
            return None

    def _save_mode(self, mode: Mode | None) -> None:
        with self.daemon.store.transaction() as db:
            if mode is None:
                db.execute("DELETE FROM dedup_settings WHERE key = 'mode'")
            else:
                db.execute("INSERT INTO dedup_settings (key, value) VALUES ('mode', ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (json.dumps(mode.as_dict()),))  # fmt: skip

    def _log(self, action: str, vm: str | None, inputs: dict[str, Any], outcome: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.daemon.store.log_decision(PART, action, vm, inputs, outcome)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.available:
            log.info("dedup: KSM not available on this kernel; observing nothing")
            return
        if self.ctl.changed:  # a previous run died without restoring
            originals = dict(self.ctl.originals)
            res = await asyncio.to_thread(self.ctl.restore)
            self._log("restore", None, {"reason": "left over from a previous run", "originals": originals}, res)
            log.warning("dedup: restored KSM settings left by a previous run: %s", res)

    async def stop(self) -> None:
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(BaseException):
                await self._scan_task
        if self.available and self.ctl.changed:
            await self._restore("daemon stopping", unmerge=self.effective_mode().unmerge_on_stop)

    def _refresh_settings(self) -> None:
        """Re-read the tunables after a change, so that status and /metrics show the new values."""
        if self.sample is not None:
            self.sample.settings = self.ksm.settings()
            self._export_metrics()

    async def _restore(self, reason: str, unmerge: bool = False) -> dict[str, Any]:
        originals = dict(self.ctl.originals)
        self.ctl.unmerge_on_restore = unmerge
        res = await asyncio.to_thread(self.ctl.restore)
        with contextlib.suppress(KsmError):
            await asyncio.to_thread(self._refresh_settings)
        self._log("restore", None, {"reason": reason, "originals": originals, "unmerge": unmerge}, res)
        self.last = None
        self.ksmtuned_npages = 0
        self.ksmtuned_at = 0.0
        return res

    # -- the mode -------------------------------------------------------------------------------
    def effective_mode(self) -> Mode:
        notes: list[str] = []
        if self.api_mode is not None:
            self.mode_notes = notes
            return self.api_mode
        chosen: Mode | None = None
        for rec in self.daemon.store.list_vms():
            s = vm_settings(rec.policy)
            if s.policy is None:
                continue
            if chosen is None:
                chosen = Mode(policy=s.policy, source=f"registration:{rec.name}")
            elif s.policy != chosen.policy:
                notes.append(f"{rec.name} asks for {s.policy}; {chosen.source} wins")
        self.mode_notes = notes
        return chosen or Mode()

    async def set_mode(self, mode: Mode) -> dict[str, Any]:
        mode.source = "api"
        mode.validate()
        previous = self.effective_mode()
        self._save_mode(mode)
        self.api_mode = mode
        self._log("policy", None, {"mode": mode.as_dict(), "previous": previous.as_dict()}, {"ok": True})
        if previous.policy != mode.policy:
            self.last = None
            self.ksmtuned_at = 0.0
        await self.tick()
        return self.status()

    async def clear_mode(self, restore: bool = True) -> dict[str, Any]:
        """Forget the API's policy (registrations may still ask for one); restore KSM."""
        previous = self.effective_mode()
        self._save_mode(None)
        self.api_mode = None
        self._log("policy", None, {"mode": None, "previous": previous.as_dict()}, {"ok": True})
        if restore and self.ctl.changed and self.effective_mode().policy == "off":
            await self._restore("policy cleared", unmerge=previous.unmerge_on_stop)
        await self.tick()
        return self.status()

    # -- observation ----------------------------------------------------------------------------
    def _qemu_pid(self, name: str) -> int | None:
        lv = self.daemon.latest.get(name, {}).get("libvirt", {})
        pid = lv.get("qemu_pid")
        if pid:
            return int(pid)
        with contextlib.suppress(Exception):
            return self.daemon.libvirt.qemu_pid(name)
        return None

    def _ram_bytes(self, name: str) -> int | None:
        lv = self.daemon.latest.get(name, {}).get("libvirt", {})
        mib = lv.get("max_memory_mib")
        if mib:
            return int(mib) << 20
        with contextlib.suppress(Exception):
            return self.daemon.libvirt.info(name).max_memory_kib * 1024
        return None

    def _guest_ram(self, pid: int, ram: int | None) -> Mapping | None:
        """The guest-RAM mapping of a QEMU process; smaps (tens of ms) is re-read every 30 s only."""
        hit = self._maps.get(pid)
        now = time.monotonic()
        if hit is not None and now - hit[0] < 30.0:
            return hit[1]
        m = find_guest_ram(read_smaps(pid), ram)
        self._maps = {k: v for k, v in self._maps.items() if now - v[0] < 300.0}
        self._maps[pid] = (now, m)
        return m

    def observe(self) -> Sample:
        """Read KSM and every registered VM (blocking: run in a thread)."""
        sample = self.ctl.sample()
        vms: dict[str, dict[str, Any]] = {}
        for rec in self.daemon.store.list_vms():
            s = vm_settings(rec.policy)
            pid = self._qemu_pid(rec.name)
            ram = self._ram_bytes(rec.name)
            v: dict[str, Any] = {
                "name": rec.name, "pid": pid, "running": pid is not None, "ram_bytes": ram,
                "cross_vm": s.cross_vm, "scan": s.scan, "policy_request": s.policy, "errors": list(s.errors),
                "mergeable": None, "guest_rss_bytes": None, "shared_bytes": None, "unshared_bytes": None,
                "unshared_fraction": None, "ksm": None,
            }  # fmt: skip
            if pid is not None:
                try:
                    m = self._guest_ram(pid, ram)
                    if m is not None:
                        v["mergeable"] = m.mergeable
                        v["guest_ram"] = {"start": f"0x{m.start:x}", "size": m.size}
                        # resident and really backed (not the shared zero page): pagemap, ~1 ms per 256 MiB
                        pm = read_pagemap(pid, m.start, m.end)
                        on = (pm & PM_PRESENT) != 0
                        zp = zero_pfns()
                        if zp.shape[0]:
                            on &= ~np.isin(pm & PM_PFN_MASK, zp)
                        v["guest_rss_bytes"] = int(on.sum()) * PAGE_SIZE
                except EngineError as exc:
                    v["errors"].append(str(exc))
                    v["running"] = False
                st = process_ksm_stat(pid)
                if st is not None:
                    v["ksm"] = st
                    shared = int(st.get("ksm_merging_pages", 0)) * PAGE_SIZE
                    v["shared_bytes"] = shared
                    if v["guest_rss_bytes"] is not None:
                        rss = v["guest_rss_bytes"]
                        v["unshared_bytes"] = max(rss - shared, 0)
                        v["unshared_fraction"] = round(v["unshared_bytes"] / rss, 6) if rss else 1.0
            vms[rec.name] = v
        self._attach_estimates(vms)
        self.vms = vms
        self.sample = sample
        self.history.append({"t": sample.t, "pages_sharing": sample.stats.pages_sharing,
                             "pages_shared": sample.stats.pages_shared, "ksmd_cpu_s": sample.ksmd_cpu_s,
                             "run": sample.settings.get("run"), "pages_to_scan": sample.settings.get("pages_to_scan"),
                             "sleep_millisecs": sample.settings.get("sleep_millisecs")})  # fmt: skip
        self._export_metrics()
        return sample

    def _attach_estimates(self, vms: dict[str, dict[str, Any]]) -> None:
        rep = self.report
        for name, v in vms.items():
            v["estimate"] = None
            if rep is not None and name in rep.names:
                v["estimate"] = rep.source(name).as_dict() | {"scanned_at": rep.started_at}

    def _export_metrics(self) -> None:
        s = self.sample
        if s is not None:
            for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans"):
                metrics.KSM_PAGES.labels(k).set(getattr(s.stats, k))
            metrics.KSM_SAVED.set(s.stats.saved_bytes)
            if s.ksmd_cpu_s is not None:
                metrics.KSMD_CPU.set(s.ksmd_cpu_s)
            for k, val in s.settings.items():
                if isinstance(val, int):
                    metrics.KSM_SETTING.labels(k).set(val)
        for name, v in self.vms.items():
            if v["shared_bytes"] is not None:
                metrics.VM_SHARED.labels(name).set(v["shared_bytes"])
            if v["unshared_bytes"] is not None:
                metrics.VM_UNSHARED.labels(name).set(v["unshared_bytes"])
                metrics.VM_UNSHARED_FRACTION.labels(name).set(v["unshared_fraction"])
            if v["mergeable"] is not None:
                metrics.VM_MERGEABLE.labels(name).set(1 if v["mergeable"] else 0)
            if v.get("estimate"):
                metrics.VM_POTENTIAL.labels(name).set(v["estimate"]["potential_bytes"])
        bad = {x.vm for x in self.verdicts if x.status in ("violated", "unknown")}
        for name in self.vms:
            metrics.VM_TENANT_VIOLATION.labels(name).set(1 if name in bad else 0)
        for stale in set(self._exported) - set(self.vms):
            metrics.forget_vm(stale)
        self._exported = set(self.vms)

    # -- scanning -------------------------------------------------------------------------------
    def backend(self, name: str = "auto", gpu_type: str = "A100") -> HashBackend:
        key = (name, gpu_type)
        if self._backend is None or self._backend_key != key:
            self._backend = select_backend(name, gpu_type)
            self._backend_key = key
        return self._backend

    def scan(self, names: list[str] | None = None, backend: str | None = None) -> ScanReport:
        """Hash the RAM of the given (default: every running, ``scan``-enabled) VM; blocking."""
        mode = self.effective_mode()
        vms = self.vms or {}
        if names is None:
            names = [n for n, v in vms.items() if v["running"] and v["scan"]]
        sources: list[ProcessMemorySource] = []
        with self._scan_lock:
            try:
                for n in names:
                    v = vms.get(n)
                    if v is None or not v["running"] or v["pid"] is None:
                        raise EngineError(f"VM {n!r} is not registered and running")
                    sources.append(ProcessMemorySource.guest_ram(n, v["pid"], v["ram_bytes"]))
                be = self.backend(backend or mode.backend, mode.gpu_type)
                be.reset_stats()
                before = self.ksm.stats().pages_sharing if self.available else 0
                merging_before = {n: int((vms[n].get("ksm") or {}).get("ksm_merging_pages", 0)) for n in names}
                t0 = time.perf_counter()
                rep = Engine(be).scan(sources)
                dt = time.perf_counter() - t0
            finally:
                for s in sources:
                    s.close()
        self.report = rep
        self.report_meta = {"at": rep.started_at, "pages_sharing_at_scan": before, "vms": names,
                            "read_errors": sum(s.read_errors for s in sources),
                            "zero_mapped_pages": {s.name: s.zero_mapped_pages for s in sources},
                            "merging_pages_at_scan": merging_before,
                            "host_mergeable_pages": host_mergeable_pages()}  # fmt: skip
        metrics.SCAN_SECONDS.observe(dt)
        metrics.SCAN_SAVEABLE.labels("total").set(rep.saveable * PAGE_SIZE)
        metrics.SCAN_SAVEABLE.labels("intra").set(rep.intra_saveable * PAGE_SIZE)
        metrics.SCAN_SAVEABLE.labels("cross").set(rep.cross_saveable * PAGE_SIZE)
        self._attach_estimates(self.vms)
        summary = {k: v for k, v in rep.as_dict(regions=0).items() if k not in ("sources", "regions", "backend")}
        self._log("scan", None, {"vms": names, "backend": be.name}, summary)
        return rep

    def _scan_due(self, mode: Mode) -> bool:
        if self._scan_task is not None and not self._scan_task.done():
            return False
        wanted = sorted(n for n, v in self.vms.items() if v["running"] and v["scan"])
        if not wanted:
            return False
        if self.report is None or sorted(self.report_meta.get("vms", [])) != wanted:
            return True
        return time.time() - self.report_meta.get("at", 0) >= mode.scan_interval_s

    async def _background_scan(self) -> None:
        try:
            await asyncio.to_thread(self.scan)
        except (EngineError, BackendError, KsmError, OSError) as exc:
            self.errors.append(f"scan: {exc}")
            log.warning("dedup: scan failed: %s", exc)

    # -- the control step -----------------------------------------------------------------------
    async def tick(self) -> None:
        if not self.available:
            return
        try:
            sample = await asyncio.to_thread(self.observe)
        except KsmError as exc:
            self.errors.append(str(exc))
            return
        mode = self.effective_mode()
        self.last_mode = mode
        for p in POLICIES:
            metrics.POLICY.labels(p).set(1 if p == mode.policy else 0)
        states = [tenancy.TenantState(n, v["cross_vm"], bool(v["running"]), v["mergeable"],
                                      int((v["ksm"] or {}).get("ksm_merging_pages", 0)))
                  for n, v in self.vms.items()]  # fmt: skip
        self.verdicts, blocked, unmerge = tenancy.check(states)
        if blocked != self.blocked:
            self._log("tenant", None, {"verdicts": [v.as_dict() for v in self.verdicts]},
                      {"blocked": blocked, "policy": mode.policy})  # fmt: skip
        self.blocked = blocked
        if mode.policy == "off":
            if self.ctl.changed:
                await self._restore("policy off", unmerge=mode.unmerge_on_stop)
            return
        if mode.policy == "hint":
            if self._scan_due(mode):
                self._scan_task = asyncio.get_running_loop().create_task(self._background_scan(), name="dedup-scan")
            # ksmd walks every mergeable page on the host (other VMs too): size the pass on that
            self.host_mergeable = await asyncio.to_thread(host_mergeable_pages)
        decision = self.decide(mode, sample, blocked)
        try:
            changed = await asyncio.to_thread(self._apply, mode, decision)
            if unmerge and blocked:
                offenders = sorted(x.vm for x in self.verdicts if x.status in ("violated", "unknown"))
                key = ",".join(offenders)
                if key not in self.unmerged_for:
                    await asyncio.to_thread(self.ctl.unmerge)
                    self.unmerged_for.add(key)
                    changed["run"] = ("unmerge", 2)
                    self._log("unmerge", None, {"reason": blocked, "vms": offenders}, {"ok": True})
            elif not blocked:
                self.unmerged_for.clear()
        except KsmError as exc:
            self.errors.append(str(exc))
            self._log("ksm-apply", None, decision.as_dict(), {"error": str(exc)})
            return
        if changed:
            await asyncio.to_thread(self._refresh_settings)
        if changed or self.last is None or self.last.reason != decision.reason:
            self._log("ksm-apply", None, {"policy": mode.policy, "source": mode.source, **decision.as_dict()},
                      {"changed": {k: list(v) for k, v in changed.items()}})  # fmt: skip
        self.last = decision

    def _apply(self, mode: Mode, d: Decision) -> dict[str, tuple[Any, Any]]:
        changed: dict[str, tuple[Any, Any]] = {}
        for knob in ("use_zero_pages", "max_page_sharing"):
            want = getattr(mode, knob)
            if want is not None and self.ksm.has(knob):
                before = self.ksm.read(knob)
                if self.ctl.set(knob, want, unmerge=knob == "max_page_sharing"):
                    changed[knob] = (before, want)
        changed |= self.ctl.apply(d.settings)
        return changed

    def decide(self, mode: Mode, sample: Sample, blocked: str) -> Decision:
        """The policy's decision for this period (pure given the service's observations)."""
        if blocked:
            return hint_step(HintInputs(None, None, 0, blocked=blocked))
        if mode.policy == "stock":
            return stock()
        if mode.policy == "fixed":
            return fixed(int(mode.pages_to_scan or 100), int(mode.sleep_millisecs or 20))
        if mode.policy == "advisor":
            return advisor(params_from(mode.advisor, AdvisorParams))
        if mode.policy == "ksmtuned":
            p: KsmtunedParams = params_from(mode.ksmtuned, KsmtunedParams)
            now = time.monotonic()
            if self.last is not None and self.ksmtuned_at and now - self.ksmtuned_at < p.monitor_interval_s:
                return self.last
            mi = _meminfo_kib()
            obs = KsmtunedInputs(mi.get("MemTotal", 0), mi.get("MemFree", 0) + mi.get("Buffers", 0) + mi.get("Cached", 0),
                                 qemu_committed_kib(), self.ksmtuned_npages)  # fmt: skip
            d = ksmtuned_step(obs, p)
            self.ksmtuned_npages = int(d.detail.get("npages", self.ksmtuned_npages))
            self.ksmtuned_at = now
            return d
        # hint
        hp: HintParams = params_from(mode.hint, HintParams)
        return hint_step(self.hint_inputs(sample), hp)

    def hint_inputs(self, sample: Sample) -> HintInputs:
        rep = self.report
        if rep is None:
            return HintInputs(None, None, 0, sample.stats.pages_sharing)
        eligible = [n for n, v in self.vms.items()
                    if n in rep.names and v["running"] and v["cross_vm"] and v["mergeable"]]  # fmt: skip
        potential = rep.saveable_for(eligible)
        at_scan = rep.remaining_for(eligible)
        # Progress since the scan from the eligible VMs' own merged pages (host-wide pages_sharing
        # would count other VMs being merged too): a merged page saves saveable/dup_pages frames.
        before = self.report_meta.get("merging_pages_at_scan", {})
        merged_since = sum(int((self.vms[n].get("ksm") or {}).get("ksm_merging_pages", 0)) - int(before.get(n, 0))
                           for n in eligible)  # fmt: skip
        dup = sum(rep.source(n).dup_pages for n in eligible)
        progress = int(round(max(0, merged_since) * potential / dup)) if dup else 0
        remaining = remaining_now(at_scan, 0, progress)
        # ksmd walks every mergeable page on the host, not only the eligible VMs'
        mergeable = max(sum(rep.source(n).pages for n in eligible), self.host_mergeable)
        return HintInputs(potential, remaining, mergeable, sample.stats.pages_sharing)

    # -- views ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        mode = self.effective_mode()
        s = self.sample
        return {
            "available": self.available,
            "policy": mode.as_dict(),
            "notes": self.mode_notes,
            "active": mode.policy != "off",
            "blocked": self.blocked,
            "tenants": [v.as_dict() for v in self.verdicts],
            "ksm": None if s is None else {**s.stats.as_dict(), "saved_bytes": s.stats.saved_bytes,
                                           "ksmd_cpu_s": s.ksmd_cpu_s, "settings": s.settings},  # fmt: skip
            "originals": dict(self.ctl.originals),
            "decision": None if self.last is None else self.last.as_dict(),
            "scan": None if self.report is None else {
                **{k: v for k, v in self.report.as_dict(regions=0).items() if k != "regions"},
                "meta": self.report_meta,
            },
            "errors": list(self.errors),
        }  # fmt: skip

    def vm_view(self, name: str) -> dict[str, Any] | None:
        return self.vms.get(name)


def vm_sharing(service: DedupService | None, name: str) -> dict[str, Any] | None:
    """What the memory part needs for sharing-aware ballooning: the VM's KSM-shared and unshared
    resident guest RAM and the unshared fraction (``None`` if unknown)."""
    if service is None:
        return None
    v = service.vms.get(name)
    if v is None or v["unshared_fraction"] is None:
        return None
    est = v.get("estimate") or {}
    return {
        "shared_bytes": v["shared_bytes"], "unshared_bytes": v["unshared_bytes"],
        "unshared_fraction": v["unshared_fraction"], "guest_rss_bytes": v["guest_rss_bytes"],
        "potential_bytes": est.get("potential_bytes"), "mergeable": v["mergeable"],
    }  # fmt: skip


__all__ = ["DedupService", "Mode", "ModeError", "VmSettings", "qemu_committed_kib", "vm_settings", "vm_sharing"]
