"""The dedup part: observe KSM, scan guest RAM, tune KSM when asked to.

Nothing is tuned unless asked (opt-in, see :mod:`symbiont.dedup.service` for the policy
sources and the per-VM options). Per period:

* ``observe`` reads KSM (counters, tunables, ksmd's CPU) and every registered VM (merged pages,
  whether its RAM is mergeable, its resident guest RAM) through the host port, the policy in
  force, the tenants' verdicts and, for the policies that need them, ksmtuned's inputs;
* ``decide`` is the policy function of :mod:`symbiont.dedup.policy` (pure);
* ``act`` turns the KSM tunables through the knob ledger (kind ``ksm_tunable``, vm ``''``: one
  host-wide knob per tunable, its original saved in sqlite before the first change) or, when the
  policy is ``off``, restores them through the ledger.

The ledger is the only restore path: the policy going ``off`` (or ``DELETE /v1/dedup/policy``),
the daemon stopping (with ``restore_on_exit``), and the next start after a ``kill -9``. The
kind declares its restore order (:data:`symbiont.host.ksm.TUNABLES`: ``advisor_mode`` before
``pages_to_scan``, ``run`` last) and its writer handles what the kernel refuses on the way back
(see :meth:`DedupPart._write_knob`).

The memory part requires this one: :meth:`DedupPart.sharing` is its sharing estimate of a VM
for this period (observed before memory's own phase, since parts run in dependency order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from symbiont.dedup import metrics, tenancy
from symbiont.dedup.backends import PAGE_SIZE, BackendError, HashBackend, select_backend
from symbiont.dedup.config import CONFIG
from symbiont.dedup.engine import Engine, EngineError, ScanReport
from symbiont.dedup.ksm_controller import Sample
from symbiont.dedup.memsource import ProcessMemorySource
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
from symbiont.dedup.service import SETTINGS_SCHEMA, Mode, ModeError, vm_settings
from symbiont.host.ksm import NEEDS_UNMERGED, RUN_MERGE, RUN_UNMERGE, KsmError, restore_order
from symbiont.host.port import HostError
from symbiont.knobs import KnobKind
from symbiont.part import Part, PartContext, Period

log = logging.getLogger(__name__)

KIND = "ksm_tunable"  # ledger kind: vm '', key = the tunable's name
LEGACY_TABLE = "dedup_ksm_knobs"  # the part's own table of older daemons


@dataclass
class Observation:
    """What one period saw: KSM, the VMs, the policy in force, and the policy's inputs."""

    mode: Mode
    sample: Sample | None  # None: KSM is not available (or could not be read)
    vms: dict[str, dict[str, Any]]
    verdicts: list[tenancy.Verdict] = field(default_factory=list)
    blocked: str = ""
    unmerge: bool = False
    hint: HintInputs | None = None
    ksmtuned: KsmtunedInputs | None = None
    last: Decision | None = None  # the decision in force (ksmtuned keeps it between its intervals)
    ksmtuned_due: bool = True
    changed: bool = False  # the ledger holds changed tunables


@dataclass
class Plan:
    """What ``act`` does: restore (policy off), or apply ``decision``; unmerge for tenancy."""

    mode: Mode
    decision: Decision | None
    restore: bool = False
    unmerge_for: tuple[str, ...] = ()
    blocked: str = ""
    verdicts: list[tenancy.Verdict] = field(default_factory=list)


def decide(obs: Observation) -> Plan:
    """The policy's decision for this period (pure)."""
    mode = obs.mode
    if obs.sample is None:
        return Plan(mode, None)
    if mode.policy == "off":
        return Plan(mode, None, restore=obs.changed, blocked=obs.blocked, verdicts=obs.verdicts)
    offenders = tuple(sorted(x.vm for x in obs.verdicts if x.status in ("violated", "unknown")))
    unmerge_for = offenders if obs.unmerge and obs.blocked else ()
    if obs.blocked:
        d = hint_step(HintInputs(None, None, 0, blocked=obs.blocked))
    elif mode.policy == "stock":
        d = stock()
    elif mode.policy == "fixed":
        d = fixed(int(mode.pages_to_scan or 100), int(mode.sleep_millisecs or 20))
    elif mode.policy == "advisor":
        d = advisor(params_from(mode.advisor, AdvisorParams))
    elif mode.policy == "ksmtuned":
        if not obs.ksmtuned_due and obs.last is not None:
            d = obs.last
        else:
            assert obs.ksmtuned is not None
            d = ksmtuned_step(obs.ksmtuned, params_from(mode.ksmtuned, KsmtunedParams))
    else:  # hint
        assert obs.hint is not None
        d = hint_step(obs.hint, params_from(mode.hint, HintParams))
    return Plan(mode, d, unmerge_for=unmerge_for, blocked=obs.blocked, verdicts=obs.verdicts)


class DedupPart(Part):
    """KSM's observer and (opted into) tuner, and the hashing engine's scans of guest RAM."""

    name = "dedup"
    config = CONFIG  # the policy when neither the API nor a registration asks for one
    # the hashing engine's GPU backends use the gpu part's device models and its CUDA probe
    # (symbiont.gpu.simulated, symbiont.gpu.backend); memory requires this part in turn
    requires = ("gpu",)

    def __init__(self, ctx: PartContext, cfg: Any) -> None:
        super().__init__(ctx, cfg)
        self.host = ctx.host
        self.available = False
        self.api_mode: Mode | None = None
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
        self.host_mergeable = 0
        self.errors: deque[str] = deque(maxlen=20)
        self.unmerge_on_restore = False  # restoring may unmerge to put back max_page_sharing
        self._scan_task: asyncio.Task[Any] | None = None
        self._scan_lock = threading.Lock()
        self._backend: HashBackend | None = None
        self._backend_key: tuple[str, str] | None = None
        self._exported: set[str] = set()
        self._maps: dict[int, tuple[float, dict[str, Any] | None]] = {}
        self._tick_lock = asyncio.Lock()
        # the hashing engine's page source: /proc/PID/mem of the QEMU process (tests give a buffer)
        self.source_of = ProcessMemorySource.guest_ram

    # -- the ledger's kind ------------------------------------------------------------------------
    def _read_knob(self, vm: str, key: str) -> int | str:
        return self.host.ksm_read(key)

    def _write_knob(self, vm: str, key: str, value: int | str) -> None:
        """Write one tunable (a turn, or the ledger restoring it). What the kernel refuses on
        the way back is handled here: ``pages_to_scan`` belongs to the advisor while it is on
        (then nothing is written); ``max_page_sharing`` / ``merge_across_nodes`` are busy while
        pages are merged, and are put back by unmerging only if KSM was off before the part
        touched it (unmerged is then the host's state) or unmerging on restore was asked for."""
        h = self.host
        cur = h.ksm_read(key)
        if cur == value or str(cur) == str(value):
            return
        if key == "pages_to_scan" and h.ksm_has("advisor_mode") and str(h.ksm_read("advisor_mode")) != "none":
            log.info("ksm: pages_to_scan left to the kernel's advisor (original %s)", value)
            return
        try:
            h.ksm_write(key, value)
        except KsmError:
            if key not in NEEDS_UNMERGED or not self._may_unmerge():
                raise
            h.ksm_write("run", RUN_UNMERGE)
            h.ksm_write(key, value)
        log.info("ksm: %s %s -> %s", key, cur, value)

    def _may_unmerge(self) -> bool:
        orig = self.ctx.knobs.get("", KIND, "run")
        run = orig["original"] if orig is not None else self.host.ksm_read("run")
        return self.unmerge_on_restore or run != RUN_MERGE

    def originals(self) -> dict[str, Any]:
        return {r["key"]: r["original"] for r in self.ctx.knobs.rows(vm="", part=self.name) if r["kind"] == KIND}

    async def _turn(self, key: str, value: int | str) -> bool:
        """Set one tunable through the ledger; ``True`` when it changed."""
        cur = await self.ctx.blocking(self.host.ksm_read, key)
        if cur == value or str(cur) == str(value):
            return False
        await self.ctx.knobs.turn(self.name, "", KIND, key, value, original=cur)
        return True

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        store = self.ctx.store
        store.ensure_schema(SETTINGS_SCHEMA)
        self.api_mode = self._load_mode()
        self.ctx.knobs.register(KnobKind(KIND, self.name, self._read_knob, self._write_knob, order=restore_order))

        def convert(r: Any) -> tuple[str, str, Any, Any]:
            return ("", r["knob"], json.loads(r["original"]), json.loads(r["current"]))

        # a read-only mirror made by an earlier daemon is replaced first, then the table moves in
        self.ctx.knobs.import_legacy(LEGACY_TABLE, KIND, self.name, convert, drop=False)
        self.ctx.knobs.import_legacy(LEGACY_TABLE, KIND, self.name, convert, drop=True)
        self.available = await self.ctx.blocking(self.host.ksm_available)
        if not self.available:
            log.info("dedup: KSM not available on this kernel; observing nothing")
            return
        originals = self.originals()
        if originals:  # a previous run died without restoring
            res = await self._restore("left over from a previous run")
            log.warning("dedup: restored KSM settings left by a previous run: %s", res)

    async def stop(self) -> None:
        """End a running scan; with ``unmerge_on_stop`` (and ``restore_on_exit``) leave nothing
        merged. The ledger restores the tunables after this."""
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(BaseException):
                await self._scan_task
        if self.available and self.originals() and getattr(self.ctx.cfg, "restore_on_exit", True):
            self.unmerge_on_restore = self.effective_mode().unmerge_on_stop
            if self.unmerge_on_restore:
                with contextlib.suppress(HostError):
                    await self._unmerge_before_restore()

    async def vm_removed(self, vm: str) -> None:
        self.vms.pop(vm, None)
        metrics.forget_vm(vm)
        self._exported.discard(vm)

    async def _unmerge_before_restore(self) -> None:
        """``run=2`` through the ledger when KSM was off before: it is put back last."""
        orig = self.ctx.knobs.get("", KIND, "run")
        run = orig["original"] if orig is not None else await self.ctx.blocking(self.host.ksm_read, "run")
        if run != RUN_MERGE:
            await self.ctx.knobs.turn(self.name, "", KIND, "run", RUN_UNMERGE)

    async def _restore(self, reason: str, unmerge: bool = False) -> dict[str, Any]:
        """Every changed tunable back, through the ledger's one restore path."""
        originals = self.originals()
        # logged first: the ledger logs each knob it restores after it
        self.ctx.decisions.log("restore", None, {"reason": reason, "originals": originals, "unmerge": unmerge},
                               {"knobs": sorted(originals)})  # fmt: skip
        self.unmerge_on_restore = unmerge
        try:
            if unmerge:
                with contextlib.suppress(HostError):
                    await self._unmerge_before_restore()
            done = await self.ctx.knobs.restore(part=self.name, reason=reason, kinds={KIND})
        finally:
            self.unmerge_on_restore = False
        with contextlib.suppress(HostError):
            await self.ctx.blocking(self._refresh_settings)
        self.last = None
        self.ksmtuned_npages = 0
        self.ksmtuned_at = 0.0
        res: dict[str, Any] = {r["key"]: {"restored": r["original"]} for r in done}
        for key, orig in self.originals().items():
            res[key] = {"error": "not restored (kept for the next try)", "original": orig}
        return res

    # -- the mode -------------------------------------------------------------------------------
    def _load_mode(self) -> Mode | None:
        rows = self.ctx.store.query("SELECT value FROM dedup_settings WHERE key = 'mode'")
        if not rows:
            return None
        try:
            return Mode.from_dict(json.loads(rows[0]["value"]))
        except (ModeError, TypeError, ValueError) as exc:
            log.warning("dedup: ignoring the saved policy: %s", exc)
            return None

    def _save_mode(self, mode: Mode | None) -> None:
        with self.ctx.store.transaction() as db:
            if mode is None:
                db.execute("DELETE FROM dedup_settings WHERE key = 'mode'")
            else:
                db.execute("INSERT INTO dedup_settings (key, value) VALUES ('mode', ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (json.dumps(mode.as_dict()),))  # fmt: skip

    def effective_mode(self) -> Mode:
        notes: list[str] = []
        if self.api_mode is not None:
            self.mode_notes = notes
            return self.api_mode
        chosen: Mode | None = None
        for rec in self.ctx.vms():
            s = vm_settings(rec.policy)
            if s.policy is None:
                continue
            if chosen is None:
                chosen = Mode(policy=s.policy, source=f"registration:{rec.name}")
            elif s.policy != chosen.policy:
                notes.append(f"{rec.name} asks for {s.policy}; {chosen.source} wins")
        self.mode_notes = notes
        if chosen is None and getattr(self.cfg, "policy", "off") != "off":  # the config's (a profile's)
            chosen = Mode(policy=self.cfg.policy, source="config")
        return chosen or Mode()

    async def set_mode(self, mode: Mode) -> dict[str, Any]:
        mode.source = "api"
        mode.validate()
        previous = self.effective_mode()
        self._save_mode(mode)
        self.api_mode = mode
        self.ctx.decisions.log("policy", None, {"mode": mode.as_dict(), "previous": previous.as_dict()}, {"ok": True})
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
        self.ctx.decisions.log("policy", None, {"mode": None, "previous": previous.as_dict()}, {"ok": True})
        if restore and self.originals() and self.effective_mode().policy == "off":
            await self._restore("policy cleared", unmerge=previous.unmerge_on_stop)
        await self.tick()
        return self.status()

    # -- observation ----------------------------------------------------------------------------
    def _qemu_pid(self, name: str) -> int | None:
        pid = self.ctx.latest(name).get("libvirt", {}).get("qemu_pid")
        if pid:
            return int(pid)
        with contextlib.suppress(HostError):
            return self.host.qemu_pid(name)
        return None

    def _ram_bytes(self, name: str) -> int | None:
        mib = self.ctx.latest(name).get("libvirt", {}).get("max_memory_mib")
        if mib:
            return int(mib) << 20
        with contextlib.suppress(HostError):
            return self.host.info(name).max_memory_kib * 1024
        return None

    RESIDENT_PAUSED_S = 60.0  # a paused VM's resident guest RAM is read again after this long

    def _guest_ram(self, pid: int, ram: int | None, paused: bool = False) -> dict[str, Any] | None:
        """The guest-RAM mapping of a QEMU process; smaps (tens of ms) is re-read every 30 s only,
        and not while the VM is paused (the mapping of a process does not move)."""
        hit = self._maps.get(pid)
        now = time.monotonic()
        if hit is not None and (now - hit[0] < 30.0 or (paused and hit[1] is not None)):
            if paused:
                self._maps[pid] = (now, hit[1])  # kept fresh while it stays paused
            return hit[1]
        m = self.host.guest_ram(pid, ram)
        self._maps = {k: v for k, v in self._maps.items() if now - v[0] < 300.0}
        self._maps[pid] = (now, m)
        return m

    def _sample(self) -> Sample:
        h = self.host
        return Sample(time.time(), h.ksm_stats(), h.ksmd_cpu_seconds(), h.ksm_settings())

    def read_world(self) -> Sample:
        """Read KSM and every registered VM through the host port (blocking: run in a thread)."""
        sample = self._sample()
        vms: dict[str, dict[str, Any]] = {}
        for rec in self.ctx.vms():
            s = vm_settings(rec.policy)
            pid = self._qemu_pid(rec.name)
            ram = self._ram_bytes(rec.name)
            # paused (parked by the paging part): its pages do not change, so it is not scanned again
            paused = (self.ctx.latest(rec.name).get("libvirt") or {}).get("state") == "paused"
            v: dict[str, Any] = {
                "name": rec.name, "pid": pid, "running": pid is not None, "paused": paused, "ram_bytes": ram,
                "cross_vm": s.cross_vm, "scan": s.scan, "policy_request": s.policy, "errors": list(s.errors),
                "mergeable": None, "guest_rss_bytes": None, "shared_bytes": None, "unshared_bytes": None,
                "unshared_fraction": None, "ksm": None,
            }  # fmt: skip
            if pid is not None:
                try:
                    m = self._guest_ram(pid, ram, paused)
                    if m is not None:
                        v["mergeable"] = bool(m["mergeable"])
                        v["guest_ram"] = {"start": f"0x{m['start']:x}", "size": m["end"] - m["start"]}
                        # resident and really backed (not the shared zero page): ~1 ms per 256 MiB;
                        # a paused guest faults nothing in: its last figure stands (same process,
                        # read again after RESIDENT_PAUSED_S: KSM or the host may still move pages)
                        prev = self.vms.get(rec.name) or {}
                        now = time.monotonic()
                        if paused and prev.get("paused") and prev.get("pid") == pid \
                                and prev.get("guest_rss_bytes") is not None \
                                and now - prev.get("guest_rss_at", 0.0) < self.RESIDENT_PAUSED_S:
                            v["guest_rss_bytes"], v["guest_rss_at"] = prev["guest_rss_bytes"], prev["guest_rss_at"]
                        else:
                            v["guest_rss_bytes"] = self.host.resident_bytes(pid, m["start"], m["end"])
                            v["guest_rss_at"] = now
                except HostError as exc:
                    v["errors"].append(str(exc))
                    v["running"] = False
                st = self.host.process_ksm_stat(pid)
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

    def _refresh_settings(self) -> None:
        """Re-read the tunables after a change, so that status and /metrics show the new values."""
        if self.sample is not None:
            self.sample.settings = self.host.ksm_settings()
            self._export_metrics()

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
            names = self._scan_wanted()
        sources: list[Any] = []
        with self._scan_lock:
            try:
                for n in names:
                    v = vms.get(n)
                    if v is None or not v["running"] or v["pid"] is None:
                        raise EngineError(f"VM {n!r} is not registered and running")
                    sources.append(self.source_of(n, v["pid"], v["ram_bytes"]))
                be = self.backend(backend or mode.backend, mode.gpu_type)
                be.reset_stats()
                before = self.host.ksm_stats().pages_sharing if self.available else 0
                merging_before = {n: int((vms[n].get("ksm") or {}).get("ksm_merging_pages", 0)) for n in names}
                t0 = time.perf_counter()
                rep = Engine(be).scan(sources)
                dt = time.perf_counter() - t0
            finally:
                for s in sources:
                    s.close()
        self.report = rep
        self.report_meta = {"at": rep.started_at, "pages_sharing_at_scan": before, "vms": names,
                            "read_errors": sum(getattr(s, "read_errors", 0) for s in sources),
                            "zero_mapped_pages": {s.name: getattr(s, "zero_mapped_pages", 0) for s in sources},
                            "merging_pages_at_scan": merging_before,
                            "host_mergeable_pages": self.host.host_mergeable_pages()}  # fmt: skip
        metrics.SCAN_SECONDS.observe(dt)
        metrics.SCAN_SAVEABLE.labels("total").set(rep.saveable * PAGE_SIZE)
        metrics.SCAN_SAVEABLE.labels("intra").set(rep.intra_saveable * PAGE_SIZE)
        metrics.SCAN_SAVEABLE.labels("cross").set(rep.cross_saveable * PAGE_SIZE)
        self._attach_estimates(self.vms)
        summary = {k: v for k, v in rep.as_dict(regions=0).items() if k not in ("sources", "regions", "backend")}
        self.ctx.decisions.log("scan", None, {"vms": names, "backend": be.name}, summary)
        return rep

    def _scan_wanted(self) -> list[str]:
        """The VMs a scan hashes: running, ``scan`` on, and not paused — a parked VM's pages do
        not change (and what its park left resident is mostly KSM-merged already), so hashing it
        again each scan_interval_s cost ~40 ms of CPU per parked VM per period (issue 15 run)."""
        return sorted(n for n, v in (self.vms or {}).items() if v["running"] and v["scan"] and not v.get("paused"))

    def _scan_due(self, mode: Mode) -> bool:
        if self._scan_task is not None and not self._scan_task.done():
            return False
        wanted = set(self._scan_wanted())
        if not wanted:
            return False
        scanned = set(self.report_meta.get("vms", [])) if self.report is not None else None
        # a VM that parked since stays in the report (its pages are as they were): no rescan for it
        paused = {n for n, v in self.vms.items() if v.get("paused")}
        if scanned is None or wanted - scanned or scanned - wanted - paused:
            return True
        return time.time() - self.report_meta.get("at", 0) >= mode.scan_interval_s

    async def _background_scan(self) -> None:
        try:
            await asyncio.to_thread(self.scan)
        except (EngineError, BackendError, HostError, OSError) as exc:
            self.errors.append(f"scan: {exc}")
            log.warning("dedup: scan failed: %s", exc)

    # -- the period -------------------------------------------------------------------------------
    async def observe(self, period: Period) -> Observation:
        mode = self.effective_mode()
        self.last_mode = mode
        if not self.available:
            return Observation(mode, None, {})
        try:
            sample = await self.ctx.blocking(self.read_world)
        except HostError as exc:
            self.errors.append(str(exc))
            return Observation(mode, None, self.vms)
        for p in POLICIES:
            metrics.POLICY.labels(p).set(1 if p == mode.policy else 0)
        states = [tenancy.TenantState(n, v["cross_vm"], bool(v["running"]), v["mergeable"],
                                      int((v["ksm"] or {}).get("ksm_merging_pages", 0)))
                  for n, v in self.vms.items()]  # fmt: skip
        verdicts, blocked, unmerge = tenancy.check(states)
        obs = Observation(mode, sample, self.vms, verdicts, blocked, unmerge, last=self.last,
                          changed=bool(self.originals()))
        if mode.policy == "hint":
            if self._scan_due(mode):
                self._scan_task = asyncio.get_running_loop().create_task(self._background_scan(), name="dedup-scan")
            # ksmd walks every mergeable page on the host (other VMs too): size the pass on that
            self.host_mergeable = await self.ctx.blocking(self.host.host_mergeable_pages)
            obs.hint = self.hint_inputs(sample)
        elif mode.policy == "ksmtuned":
            p: KsmtunedParams = params_from(mode.ksmtuned, KsmtunedParams)
            now = time.monotonic()
            obs.ksmtuned_due = not (self.last is not None and self.ksmtuned_at
                                    and now - self.ksmtuned_at < p.monitor_interval_s)
            if obs.ksmtuned_due:
                mi = await self.ctx.blocking(self.host.meminfo_kib)
                committed = await self.ctx.blocking(self.host.qemu_committed_kib)
                obs.ksmtuned = KsmtunedInputs(mi.get("MemTotal", 0),
                                              mi.get("MemFree", 0) + mi.get("Buffers", 0) + mi.get("Cached", 0),
                                              committed, self.ksmtuned_npages)  # fmt: skip
        return obs

    def decide(self, obs: Observation) -> Plan:
        return decide(obs)

    async def act(self, plan: Plan) -> None:
        if self.sample is None or not self.available:
            return
        mode = plan.mode
        self.verdicts = plan.verdicts
        if plan.blocked != self.blocked:
            self.ctx.decisions.log("tenant", None, {"verdicts": [v.as_dict() for v in self.verdicts]},
                                   {"blocked": plan.blocked, "policy": mode.policy})  # fmt: skip
        self.blocked = plan.blocked
        if plan.decision is None:
            if plan.restore:
                await self._restore("policy off", unmerge=mode.unmerge_on_stop)
            return
        d = plan.decision
        if mode.policy == "ksmtuned" and d is not self.last:
            self.ksmtuned_npages = int(d.detail.get("npages", self.ksmtuned_npages))
            self.ksmtuned_at = time.monotonic()
        try:
            changed = await self._apply(mode, d)
            if plan.unmerge_for:
                key = ",".join(plan.unmerge_for)
                if key not in self.unmerged_for:
                    await self.ctx.knobs.turn(self.name, "", KIND, "run", RUN_UNMERGE)
                    self.unmerged_for.add(key)
                    changed["run"] = ("unmerge", RUN_UNMERGE)
                    self.ctx.decisions.log("unmerge", None, {"reason": plan.blocked, "vms": list(plan.unmerge_for)},
                                           {"ok": True})  # fmt: skip
            elif not plan.blocked:
                self.unmerged_for.clear()
        except HostError as exc:
            self.errors.append(str(exc))
            self.ctx.decisions.log("ksm-apply", None, d.as_dict(), {"error": str(exc)})
            return
        if changed:
            with contextlib.suppress(HostError):
                await self.ctx.blocking(self._refresh_settings)
        if changed or self.last is None or self.last.reason != d.reason:
            self.ctx.decisions.log("ksm-apply", None, {"policy": mode.policy, "source": mode.source, **d.as_dict()},
                                   {"changed": {k: list(v) for k, v in changed.items()}})  # fmt: skip
        self.last = d

    async def _apply(self, mode: Mode, d: Decision) -> dict[str, tuple[Any, Any]]:
        """Write the settings that differ through the ledger (scan parameters first, then ``run``).

        With ``d.settings.advisor`` the advisor's knobs are written and ``advisor_mode`` set to
        ``scan-time``; ``pages_to_scan`` is then the kernel's. Without it an advisor left on is
        turned off first (the kernel refuses ``pages_to_scan`` while it is on)."""
        h = self.host
        s = d.settings
        steps: list[tuple[str, int | str]] = []
        for knob in ("use_zero_pages", "max_page_sharing"):
            want = getattr(mode, knob)
            if want is not None and await self.ctx.blocking(h.ksm_has, knob):
                steps.append((knob, want))
        has_advisor = await self.ctx.blocking(h.ksm_has, "advisor_mode")
        if s.advisor is not None:
            if not has_advisor:
                raise KsmError("this kernel has no KSM advisor (advisor_mode: Linux 6.8+)")
            steps += [*s.advisor.knobs().items(), ("advisor_mode", "scan-time")]
        else:
            if has_advisor:
                steps.append(("advisor_mode", "none"))
            steps.append(("pages_to_scan", s.pages_to_scan))
        steps += [("sleep_millisecs", s.sleep_millisecs), ("run", s.run)]
        changed: dict[str, tuple[Any, Any]] = {}
        for knob, value in steps:
            before = await self.ctx.blocking(h.ksm_read, knob)
            if knob in NEEDS_UNMERGED and str(before) != str(value):
                stats = await self.ctx.blocking(h.ksm_stats)
                if stats.pages_shared > 0:  # the kernel refuses it while pages are merged
                    await self.ctx.knobs.turn(self.name, "", KIND, "run", RUN_UNMERGE)
            if await self._turn(knob, value):
                changed[knob] = (before, value)
        return changed

    async def tick(self) -> None:
        """One observe → decide → act outside the period loop (after an API change)."""
        async with self._tick_lock:
            obs = await self.observe(Period(0))
            await self.act(self.decide(obs))

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

    # -- operations for the parts that require this one, and views --------------------------------
    def sharing(self, name: str) -> dict[str, Any] | None:
        """What the memory part needs for sharing-aware ballooning: the VM's KSM-shared and
        unshared resident guest RAM and the unshared fraction (``None`` if unknown)."""
        v = self.vms.get(name)
        if v is None or v["unshared_fraction"] is None:
            return None
        est = v.get("estimate") or {}
        return {
            "shared_bytes": v["shared_bytes"], "unshared_bytes": v["unshared_bytes"],
            "unshared_fraction": v["unshared_fraction"], "guest_rss_bytes": v["guest_rss_bytes"],
            "potential_bytes": est.get("potential_bytes"), "mergeable": v["mergeable"],
        }  # fmt: skip

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
            "originals": self.originals(),
            "decision": None if self.last is None else self.last.as_dict(),
            "scan": None if self.report is None else {
                **{k: v for k, v in self.report.as_dict(regions=0).items() if k != "regions"},
                "meta": self.report_meta,
            },
            "errors": list(self.errors),
        }  # fmt: skip

    def vm_view(self, name: str) -> dict[str, Any] | None:
        return self.vms.get(name)


PART = DedupPart
__all__ = ["KIND", "DedupPart", "Observation", "Plan", "decide", "restore_order"]
