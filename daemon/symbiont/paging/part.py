"""The paging part: the swap tier's life cycle, page-out, park and wake (host paging, the
third primitive of seeds/002; keeping idle VMs, seeds/004).

Swap tier. With ``paging.enabled`` the part creates a zram device at start and removes it at
stop (``swapoff`` brings every page back to its owner, so nothing is lost). The device is
recorded in sqlite *right after* ``hot_add``, before it is formatted, so a daemon killed at
any point leaves a record. Its size (``disksize``: swap slots) and its RAM limit
(``mem_limit``) are set apart (docs/paging.md: zero-filled pages take slots, not RAM). A
restarted daemon finds the record and either **adopts** the device — still its own (swap
label), paging enabled with the same size, RAM limit and compressor: the
pages of running and parked VMs stay where they are — or **removes** it. A device whose label
is not ours is never touched; its record is dropped.

Page-out (:meth:`PagingPart.pageout_vm`): the guest decides *what* (``paging.cold``: its free
and cold frames), the host *how much* (resident guest RAM − (working set + margin), or what
the caller asks); ``process_madvise(MADV_PAGEOUT)`` on the QEMU process's guest-RAM mapping.

Park / wake: park pages the VM out, lets it run ``park_observe_s``, pages it out again and
delivers one request (an agent ping): what comes back now (went out and was faulted back in:
never a page the page-out could not take, such as a KSM-merged one) is the request's working
set, which is recorded; then the VM is paused (knob ``paging_parked`` in the ledger: original
``running``) and paged out again. Wake swaps the recorded working set in while libvirt resumes
the VM, then delivers the request and measures how long it took. The ledger resumes a parked
VM (no prefetch) when it is unregistered and when the daemon stops (``restore_on_exit``).

Everything reaches the system through the host port (``ctx.host``); the working set is the
memory part's last sample (``requires = ("memory",)``) or a fresh one from the agent.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from symbiont.errors import AgentError, Conflict, Invalid, NoAgent, NotFound, Unavailable
from symbiont.host import pageout as po
from symbiont.host import zram
from symbiont.host.port import HostError
from symbiont.host.procmem import Mapping
from symbiont.knobs import KnobKind
from symbiont.paging import policy
from symbiont.paging.config import CONFIG, PagingConfig
from symbiont.paging.policy import IdleSample, IdleVerdict, ShortfallPlan, VmFootprint, VmMemoryInputs
from symbiont.part import Part, PartContext, Period, in_period

log = logging.getLogger(__name__)
MIB = 1 << 20
PAGE = po.PAGE_SIZE
KIND = "paging_parked"  # ledger kind: original 'running', current 'paused'
PREFETCH_GAP = 2 * PAGE  # join working-set ranges this close: fewer syscalls, hardly more data
# Set while the part talks to a VM's agent itself (park's and wake's own ping): the gateway hook
# neither counts that as a request from outside nor wakes (wake is what is running).
_OWN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("paging_own_call", default=False)

SCHEMA = """
CREATE TABLE IF NOT EXISTS paging_tier (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    device INTEGER NOT NULL,
    label TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    mem_limit_bytes INTEGER NOT NULL DEFAULT 0,
    compressor TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS paging_parked (
    vm TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    ranges TEXT NOT NULL,
    info TEXT NOT NULL,
    parked_at REAL NOT NULL
)
"""


def tier_label(state_dir: str) -> str:
    """The swap label naming this daemon's tier (mkswap keeps 15 bytes; unique per state folder)."""
    return "symbiont-" + hashlib.sha256(state_dir.encode()).hexdigest()[:6]


def guest_classes(cold: Any, npages: int) -> tuple[list[tuple[str, list[tuple[int, int]]]], str | None]:
    """The guest's free/cold runs, validated; an invalid answer is ignored as a whole."""
    if not isinstance(cold, dict):
        return [], None
    try:
        if cold.get("page_size") != PAGE:
            raise ValueError(f"guest page size {cold.get('page_size')!r} is not the host's {PAGE}")
        return [("guest-free", policy.sanitize_runs(cold.get("free"), npages)),
                ("guest-cold", policy.sanitize_runs(cold.get("cold"), npages))], None
    except ValueError as exc:
        return [], f"guest's cold pages ignored: {exc}"


@dataclass
class ShortfallPlanInputs:
    """One period's observation for the shortfall policy."""

    budget_mib: float
    vms: list[VmFootprint]
    margin_mib: float


@dataclass
class PagingObservation:
    """One period: the shortfall policy's inputs (``auto_pageout``) and, per running VM, its
    recent idle samples (``idle_park``)."""

    shortfall: ShortfallPlanInputs | None = None
    idle: dict[str, list[IdleSample]] = field(default_factory=dict)
    idle_after_s: float = 60.0
    idle_cpu_pct: float = 2.0


@dataclass
class PagingDecision:
    shortfall: ShortfallPlan | None = None
    idle: dict[str, IdleVerdict] = field(default_factory=dict)  # the idle policy's verdict per VM

    @property
    def park(self) -> dict[str, IdleVerdict]:
        """The VMs the idle policy parks, with why."""
        return {vm: v for vm, v in self.idle.items() if v.park}


class PagingPart(Part):
    """Host paging: one swap tier, page-out, park and wake; state on the instance."""

    name = "paging"
    config = CONFIG
    requires = ("memory", "dedup")  # memory: how much of a VM is cold; dedup: what KSM shares (status)

    def __init__(self, ctx: PartContext, cfg: PagingConfig) -> None:
        super().__init__(ctx, cfg)
        self.device: int | None = None  # the tier's zram number (the truth is in sqlite)
        self.last: dict[str, dict[str, Any]] = {}  # per VM: last page-out / park / wake outcome
        self.lock = asyncio.Lock()
        self.last_plan: ShortfallPlan | None = None
        self._refused: str | None = None  # the last refusal logged (logged again only when it changes)
        self._plan_logged: object = None  # the last shortfall plan logged without a page-out (ditto)
        self._tier_full: bool = False  # the last 'tier-full' logged (logged again once it had room)
        # idle VMs (paging.idle_park): each VM's recent samples, and agent calls made for it from
        # outside the control loop (counted by the gateway hook)
        self.idle_samples: dict[str, deque[IdleSample]] = {}
        self.idle_last: dict[str, IdleVerdict] = {}
        self.requests: dict[str, int] = {}
        self._taps: dict[str, tuple[int | None, list[str]]] = {}  # vm -> (QEMU pid, its tap devices)
        self._parking: dict[str, asyncio.Event] = {}  # set when that park is over
        self._waking: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._no_tier_logged = False
        self.clock = time.monotonic  # the idle policy's clock (a test steps its own)
        # A parked VM's guest RAM resident, measured once (at its park, or the first period that
        # finds it parked): (QEMU pid, guest RAM bytes, resident MiB). A paused guest does not
        # fault its pages back in, so re-reading its smaps each period (tens of ms for a QEMU
        # with its RAM in swap) bought nothing; dropped on wake, restore and unregistration.
        self._parked_fp: dict[str, tuple[int, int, float]] = {}

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        hook = getattr(self.ctx.agents, "set_before_call", None)
        if hook is not None:  # the daemon's gateway: a call for a parked VM wakes it first
            hook(self.before_agent_call)
        self.ctx.store.ensure_schema(SCHEMA)
        cols = {r["name"] for r in self.ctx.store.query("PRAGMA table_info(paging_tier)")}
        if "mem_limit_bytes" not in cols:  # a record of a daemon from before the limit was its own key
            with self.ctx.store.transaction() as db:
                db.execute("ALTER TABLE paging_tier ADD COLUMN mem_limit_bytes INTEGER NOT NULL DEFAULT 0")
        self.ctx.knobs.register(KnobKind(KIND, self.name, read=self._read_parked, write=self._write_parked))
        # A parked row whose knob the ledger no longer holds (restored while this part was not
        # running) is stale: the VM runs again.
        held = {r["vm"] for r in self.ctx.knobs.rows(part=self.name) if r["kind"] == KIND}
        with self.ctx.store.transaction() as db:
            for r in db.execute("SELECT vm FROM paging_parked").fetchall():
                if r["vm"] not in held:
                    db.execute("DELETE FROM paging_parked WHERE vm = ?", (r["vm"],))
        try:
            rec = await self.ctx.blocking(self.recover_tier)
            if rec:
                self.ctx.decisions.log("tier-recover", None, {"record": "earlier daemon"}, rec)
                log.info("paging: swap tier of an earlier daemon %s (%s)", rec["action"], rec)
            if self.cfg.enabled and self.device is None:
                num = await self.ctx.blocking(self.create_tier)
                limit_mib = self._mem_limit_bytes() // MIB
                self.ctx.decisions.log("tier-create", None, {"size_mib": self.cfg.zram_size_mib,
                                                             "mem_limit_mib": limit_mib,
                                                             "compressor": self.cfg.compressor}, {"device": num})
                log.info("paging: swap tier /dev/zram%d (%d MiB of slots, RAM limit %d MiB, %s)", num,
                         self.cfg.zram_size_mib, limit_mib, self.cfg.compressor)
        except HostError as exc:
            log.error("paging: no swap tier: %s", exc)
        for vm in sorted(self.parked_vms()):  # parked by an earlier daemon: traffic still wakes them
            await self._watch_taps(vm)

    async def stop(self) -> None:
        """Remove the tier (swapoff returns every page); the ledger resumes parked VMs after."""
        hook = getattr(self.ctx.agents, "set_before_call", None)
        if hook is not None:
            hook(None)
        for task in list(self._tasks):
            task.cancel()
        for vm in list(self.parked_vms()):
            self._unwatch_taps(vm)
        try:
            await self.ctx.blocking(self.remove_tier, "daemon stopping", timeout=300.0)
        except (HostError, TimeoutError) as exc:
            log.error("paging: swap tier not removed (the next start retries): %s", exc)

    async def vm_removed(self, vm: str) -> None:
        """The ledger resumed it already (its knob); forget the parked record."""
        with self.ctx.store.transaction() as db:
            db.execute("DELETE FROM paging_parked WHERE vm = ?", (vm,))
        self.last.pop(vm, None)
        self._unwatch_taps(vm)
        for d in (self.idle_samples, self.idle_last, self.requests, self._taps, self._parked_fp):
            d.pop(vm, None)  # type: ignore[attr-defined]

    def _read_parked(self, vm: str, _key: str) -> str:
        return self.ctx.host.info(vm).state

    def _write_parked(self, vm: str, _key: str, value: str) -> None:
        """The knob's writer: 'running' resumes a paused VM (restore), 'paused' suspends it."""
        state = self.ctx.host.info(vm).state
        if value == "running" and state == "paused":
            self.ctx.host.resume(vm)
        elif value == "paused" and state == "running":
            self.ctx.host.suspend(vm)
        if value == "running":
            self._parked_fp.pop(vm, None)
            with self.ctx.store.transaction() as db:
                db.execute("DELETE FROM paging_parked WHERE vm = ?", (vm,))

    # -- the swap tier ---------------------------------------------------------------------------
    def _tier_row(self) -> dict[str, Any] | None:
        rows = self.ctx.store.query("SELECT * FROM paging_tier WHERE id = 1")
        return dict(rows[0]) if rows else None

    def _forget_tier(self) -> None:
        with self.ctx.store.transaction() as db:
            db.execute("DELETE FROM paging_tier WHERE id = 1")

    def _mem_limit_bytes(self) -> int:
        """The tier's RAM limit (``paging.zram_mem_limit_mib``, 0: derived from the host's memory)."""
        total = int(self.ctx.host.meminfo_kib().get("MemTotal", 0)) << 10
        return self.cfg.mem_limit_bytes(total)

    def recover_tier(self) -> dict[str, Any] | None:
        """Deal with a tier recorded by an earlier daemon (see the module docstring)."""
        row = self._tier_row()
        if row is None:
            return None
        cfg, host = self.cfg, self.ctx.host
        num, label = int(row["device"]), row["label"]
        probe = host.zram_probe(num)
        if probe is None:
            self._forget_tier()
            return {"action": "forgotten", "device": num, "reason": "the device is gone"}
        found = probe["label"]
        if found is not None and found != label:
            self._forget_tier()
            return {"action": "forgotten", "device": num, "reason": f"zram{num} now belongs to {found!r}"}
        if found is None and probe["disksize"] and row["state"] != "creating":
            self._forget_tier()
            return {"action": "forgotten", "device": num, "reason": f"zram{num} holds no swap of ours"}
        # A record from before the limit was recorded (0): that daemon wrote mem_limit = disksize.
        limit = int(row["mem_limit_bytes"] or 0) or int(row["size_bytes"])
        same = (cfg.enabled and row["state"] == "on" and found == label and probe["is_swap"]
                and int(row["size_bytes"]) == cfg.zram_size_mib * MIB and row["compressor"] == cfg.compressor
                and limit == self._mem_limit_bytes())
        if same:
            self.device = num
            return {"action": "adopted", "device": num, "swap": probe["swap"]}
        used = probe["swap"].get("used_kib", 0)
        host.zram_remove(num)  # swapoff first: the pages go back to their owners, nothing is lost
        self._forget_tier()
        why = "paging is disabled" if not cfg.enabled else (
            "left half-made" if row["state"] == "creating"
            else "the config asks for another size, RAM limit or compressor")
        return {"action": "removed", "device": num, "swapped_in_kib": used, "reason": why}

    def create_tier(self) -> int:
        cfg = self.cfg
        label = tier_label(self.ctx.cfg.state_dir)
        limit = self._mem_limit_bytes()

        def record(num: int) -> None:
            with self.ctx.store.transaction() as db:
                db.execute("INSERT OR REPLACE INTO paging_tier (id, device, label, size_bytes, mem_limit_bytes, "
                           "compressor, priority, state, created_at) VALUES (1, ?, ?, ?, ?, ?, ?, 'creating', ?)",
                           (num, label, cfg.zram_size_mib * MIB, limit, cfg.compressor, cfg.swap_priority,
                            time.time()))

        num = self.ctx.host.zram_create(cfg.zram_size_mib * MIB, cfg.compressor, label, cfg.swap_priority, record,
                                        mem_limit_bytes=limit)
        with self.ctx.store.transaction() as db:
            db.execute("UPDATE paging_tier SET state = 'on' WHERE id = 1")
        self.device = num
        return num

    def remove_tier(self, reason: str) -> dict[str, Any]:
        if self.device is None or self._tier_row() is None:
            return {"removed": False}
        probe = self.ctx.host.zram_probe(self.device) or {"swap": {}}
        used = probe["swap"].get("used_kib", 0)
        t0 = time.monotonic()
        self.ctx.host.zram_remove(self.device)
        self._forget_tier()
        out = {"removed": True, "device": self.device, "swapped_in_kib": used,
               "seconds": round(time.monotonic() - t0, 3)}
        self.ctx.decisions.log("tier-remove", None, {"reason": reason}, out)
        self.device = None
        return out

    def tier_view(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"enabled": cfg.enabled, "device": None, "compressor": cfg.compressor}
        probe = self.ctx.host.zram_probe(self.device) if self.device is not None else None
        if probe is None:
            return out
        sw, mm = probe["swap"], probe["stats"]
        out.update({"device": zram.dev_path(self.device), "size_mib": round(sw.get("size_kib", 0) / 1024, 1),
                    "used_mib": round(sw.get("used_kib", 0) / 1024, 1), "priority": sw.get("priority")})
        if mm is not None:
            # size/used: swap slots (uncompressed, a zero-filled page takes one); mem_*: RAM.
            # A page-out needs both a free slot and RAM under the limit: what is left of each.
            out["slots_free_mib"] = round((sw.get("size_kib", 0) - sw.get("used_kib", 0)) / 1024, 1)
            if mm.mem_limit:
                out["ram_free_mib"] = round(max(0, mm.mem_limit - mm.mem_used_total) / MIB, 1)
            out.update({"mem_limit_mib": round(mm.mem_limit / MIB, 1) if mm.mem_limit else None,
                        "same_filled_mib": round(mm.same_pages * PAGE / MIB, 1),
                        "stored_mib": round(mm.orig_data_size / MIB, 1),
                        "compressed_mib": round(mm.compr_data_size / MIB, 1),
                        "mem_used_mib": round(mm.mem_used_total / MIB, 1),
                        "ratio": round(mm.orig_data_size / mm.compr_data_size, 2) if mm.compr_data_size else None})
        return out

    def _swap_used_mib(self) -> float | None:
        probe = self.ctx.host.zram_probe(self.device) if self.device is not None else None
        return None if probe is None else round(probe["swap"].get("used_kib", 0) / 1024, 1)

    # -- a VM's memory on the host -----------------------------------------------------------------
    def _qemu(self, vm: str) -> tuple[int, int, str]:
        """(QEMU pid, guest RAM bytes, libvirt state) of a registered VM, or a 4xx."""
        self.ctx.vm(vm)
        try:
            info = self.ctx.host.info(vm)
        except HostError as exc:
            raise NotFound(f"libvirt domain {vm!r} is gone: {exc}") from None
        pid = self.ctx.host.qemu_pid(vm)
        if pid is None or info.state not in ("running", "paused"):
            raise Conflict(f"VM {vm!r} is {info.state}: no QEMU process to page")
        return pid, info.max_memory_kib * 1024, info.state

    def regions(self, pid: int, ram_bytes: int) -> tuple[Mapping, list[Mapping], list[Mapping]]:
        """(guest RAM, TCG code cache, all mappings) of a QEMU process."""
        try:
            maps = self.ctx.host.process_smaps(pid)
            return po.guest_ram(maps, ram_bytes), po.code_cache(maps), maps
        except (HostError, po.PageoutError) as exc:
            raise Unavailable(str(exc)) from None

    def memory_view(self, pid: int, ram_bytes: int) -> dict[str, Any]:
        """Where a VM's host memory is (issue 15 item 4): guest RAM, the TCG translation-code
        cache, and QEMU's other memory (heap, stacks, libraries: RSS less the two), each
        resident and swapped apart, from the QEMU process's smaps and status."""
        ram, code, _maps = self.regions(pid, ram_bytes)
        st = self.ctx.host.process_status_kib(pid)
        code_rss, code_swap = sum(r.rss_kib for r in code), sum(r.swap_kib for r in code)
        return {
            "qemu_other": {"resident_mib": round(max(0, st.get("VmRSS", 0) - ram.rss_kib - code_rss) / 1024, 1),
                           "swapped_mib": round(max(0, st.get("VmSwap", 0) - ram.swap_kib - code_swap) / 1024, 1)},
            "qemu_pid": pid,
            "rss_mib": round(st.get("VmRSS", 0) / 1024, 1),
            "swap_mib": round(st.get("VmSwap", 0) / 1024, 1),
            "guest_ram": {"size_mib": round(ram.size / MIB, 1), "resident_mib": round(ram.rss_kib / 1024, 1),
                          "swapped_mib": round(ram.swap_kib / 1024, 1)},
            "code_cache": {"regions": len(code), "resident_mib": round(sum(r.rss_kib for r in code) / 1024, 1),
                           "swapped_mib": round(sum(r.swap_kib for r in code) / 1024, 1)},
        }

    def _require_tier(self, vm: str) -> int:
        self.ctx.vm(vm)
        if self.device is None:
            raise Conflict("no swap tier: set paging.enabled in the config (pages would have nowhere to go)")
        return self.device

    async def guest_sample(self, vm: str) -> dict[str, Any]:
        """What the guest knows: its working set (the memory part's last sample, else a fresh
        non-resetting one), free memory, and its cold frames (``paging.cold``)."""
        out: dict[str, Any] = {"wss_mib": None, "source": None}
        try:
            mem = self.ctx.peer("memory")
            st = mem.state.vms.get(vm)  # type: ignore[attr-defined]
            last = dict(st.last_wss) if st is not None else {}
        except (KeyError, AttributeError):
            last = {}
        agents = self.ctx.agents
        if last.get("referenced_bytes") is not None:
            out.update(wss_mib=round(last["referenced_bytes"] / MIB, 1), source="memory part")
        elif agents.supports(vm, "memory.wss-sample"):
            try:
                res, _ = await agents.call(vm, "memory.wss-sample", {"reset": False})
                ref = res.get("referenced_bytes") if isinstance(res, dict) else None
                if isinstance(ref, int) and not isinstance(ref, bool) and ref >= 0 and res.get("interval_s"):
                    out.update(wss_mib=round(ref / MIB, 1), source="memory.wss-sample")
            except AgentError as exc:
                out["wss_error"] = str(exc)
        mi = self.ctx.latest(vm).get("agent", {}).get("meminfo", {})
        if "MemFree" in mi:
            out["mem_free_mib"] = round(mi["MemFree"] / MIB, 1)
        if "MemAvailable" in mi:
            out["mem_available_mib"] = round(mi["MemAvailable"] / MIB, 1)
        out["cold"] = None
        if agents.supports(vm, "paging.cold"):
            try:
                res, _ = await agents.call(vm, "paging.cold", {}, timeout=30.0)
                out["cold"] = res
            except AgentError as exc:
                out["cold_error"] = str(exc)
        return out

    TIER_FULL_MIB = 16  # less room than this in the tier: a page-out would free nothing

    def tier_room_mib(self) -> float | None:
        """Guest MiB one more page-out can still put in the tier (None: not known). Its free
        slots, or 0 once the compressed pages' RAM is at the limit: past either, a page-out
        frees nothing (the kernel keeps a page that finds no slot; zram refuses writes above
        ``mem_limit``). The density run's 144 step ran into the slots silently."""
        t = self.tier_view()
        if t.get("slots_free_mib") is None:
            return None
        if t.get("ram_free_mib") is not None and t["ram_free_mib"] < self.TIER_FULL_MIB:
            return 0.0
        return float(t["slots_free_mib"])

    async def pageout_vm(self, vm: str, mib: int | None = None, reason: str = "api") -> dict[str, Any]:
        """Page out a VM's cold guest memory (see the module docstring); a decision in the log."""
        self._require_tier(vm)
        pid, ram_bytes, state = self._qemu(vm)
        if mib is not None and not 1 <= mib <= ram_bytes // MIB:
            raise Invalid(f"mib {mib} outside 1..{ram_bytes // MIB} (the VM's guest RAM)")
        host = self.ctx.host
        async with self.lock:
            ram, _code, _maps = self.regions(pid, ram_bytes)
            npages = ram_bytes // PAGE  # guest-physical frames; QEMU's rounding past them is not RAM
            present = (await self.ctx.blocking(host.process_residency, pid, ram.start, ram.size))[:npages]
            resident_mib = float(present.sum()) * PAGE / MIB
            sample = await self.guest_sample(vm)
            classes, cold_error = guest_classes(sample.pop("cold"), npages)
            want_mib = float(mib) if mib is not None else policy.pageout_target_mib(
                resident_mib, sample["wss_mib"], self.cfg.margin_mib)
            sel = policy.select(present, int(want_mib * MIB / PAGE), classes, blind=True)
            rss0 = host.process_status_kib(pid)
            swap0 = self._swap_used_mib()
            t0 = time.perf_counter()
            ranges = [(ram.start + a * PAGE, n * PAGE) for a, n in sel.ranges]
            advised = await self.ctx.blocking(host.process_pageout, pid, ranges, timeout=120.0) if ranges else 0
            dt = time.perf_counter() - t0
            rss1 = host.process_status_kib(pid)
            inputs = {"reason": reason, "state": state, "requested_mib": mib, "resident_mib": round(resident_mib, 1),
                      "guest": {**sample, "free_runs": len(classes[0][1]) if classes else None,
                                "cold_runs": len(classes[1][1]) if classes else None, "cold_error": cold_error},
                      "margin_mib": self.cfg.margin_mib, "target_mib": round(want_mib, 1)}
            outcome = {"paged_mib": round(sel.pages * PAGE / MIB, 1),
                       "by_source_mib": {k: round(v * PAGE / MIB, 1) for k, v in sel.pages_by_source.items()},
                       "ranges": len(ranges), "advised_mib": round(advised / MIB, 1), "seconds": round(dt, 4),
                       "rss_before_mib": round(rss0.get("VmRSS", 0) / 1024, 1),
                       "rss_after_mib": round(rss1.get("VmRSS", 0) / 1024, 1),
                       "vm_swap_mib": round(rss1.get("VmSwap", 0) / 1024, 1),
                       "tier_used_before_mib": swap0, "tier_used_after_mib": self._swap_used_mib()}
            self.ctx.decisions.log("pageout", vm, inputs, outcome)
            self.last[vm] = {"action": "pageout", "at": time.time(), **outcome}
            log.info("vm %s: paged out %.1f MiB in %.3f s (RSS %s -> %s MiB; %s)", vm, outcome["paged_mib"], dt,
                     outcome["rss_before_mib"], outcome["rss_after_mib"], outcome["by_source_mib"])
            return {"vm": vm, "inputs": inputs, **outcome}

    # -- park and wake ---------------------------------------------------------------------------
    def parked(self, vm: str) -> dict[str, Any] | None:
        rows = self.ctx.store.query("SELECT * FROM paging_parked WHERE vm = ?", (vm,))
        if not rows:
            return None
        r = dict(rows[0])
        return {"vm": vm, "pid": r["pid"], "ranges": json.loads(r["ranges"]), "info": json.loads(r["info"]),
                "parked_at": r["parked_at"]}

    def parked_vms(self) -> set[str]:
        return {r["vm"] for r in self.ctx.store.query("SELECT vm FROM paging_parked")}

    def _all_pages(self, ram: Mapping, code: list[Mapping], maps: list[Mapping]) -> list[tuple[int, int]]:
        """Guest RAM, the TCG code cache and (``include_qemu_heap``) QEMU's other private
        anonymous memory."""
        out = [(ram.start, ram.size)] + ([(r.start, r.size) for r in code] if self.cfg.include_code_cache else [])
        if self.cfg.include_qemu_heap:
            out += [(r.start, r.size) for r in maps
                    if r.anonymous and r.perms == "rw-p" and r.start != ram.start and r.rss_kib]
        return out

    def _residency(self, pid: int, regs: list[Mapping]) -> list[Any]:
        """Each region's page-present mask (pagemap)."""
        return [self.ctx.host.process_residency(pid, r.start, r.size) for r in regs]

    def _came_back(self, pid: int, regs: list[Mapping], stayed: list[Any]) -> list[tuple[int, int]]:
        """The ranges resident now that were not right after the page-out (``stayed``): what
        went out and was faulted back in. A page the page-out could not take stays resident
        without being touched: a KSM-merged page (MADV_PAGEOUT skips pages mapped more than
        once; the density run recorded ~515 MiB of them per clone as its "working set"), or one
        pinned; counting it would make every wake prefetch memory that never left."""
        out: list[tuple[int, int]] = []
        for r, now, before in zip(regs, self._residency(pid, regs), stayed, strict=True):
            out.extend((r.start + a * PAGE, n * PAGE) for a, n in po.runs(now & ~before))
        return out

    async def _ping(self, vm: str, timeout: float) -> float | None:
        """Seconds an agent ping took, or None when there is no agent to ask."""
        if not self.ctx.agent(vm).ready:
            return None
        token = _OWN_CALL.set(True)
        try:
            t0 = time.perf_counter()
            await self.ctx.agents.call(vm, "core.ping", {}, timeout=timeout)
            return time.perf_counter() - t0
        finally:
            _OWN_CALL.reset(token)

    async def park(self, vm: str, reason: str = "api", idle: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record the request's working set, pause the VM and page all of it out; then watch its
        taps (a frame toward it wakes it). ``idle``: the idle policy's inputs, for the log."""
        self._require_tier(vm)
        pid, ram_bytes, state = self._qemu(vm)
        if self.parked(vm) is not None or vm in self._parking:
            raise Conflict(f"VM {vm!r} is already parked")
        if state != "running":
            raise Conflict(f"VM {vm!r} is {state}: only a running VM can be parked")
        done = self._parking[vm] = asyncio.Event()
        try:
            out = await self._park(vm, pid, ram_bytes, reason, idle)
        finally:
            del self._parking[vm]
            done.set()
        await self._watch_taps(vm)
        return out

    async def _park(self, vm: str, pid: int, ram_bytes: int, reason: str,
                    idle: dict[str, Any] | None) -> dict[str, Any]:
        cfg, host = self.cfg, self.ctx.host
        async with self.lock:
            ram, code, maps = self.regions(pid, ram_bytes)
            before = self.memory_view(pid, ram_bytes)
            everything = self._all_pages(ram, code, maps)
            t0 = time.perf_counter()
            regs = [ram] + (code if cfg.include_code_cache else [])
            # What the idle guest brings back is its background working set; what the one
            # request brings back after a second page-out is the *event's* working set
            # (seeds/004), the one wake prefetches before delivering a request. Both count only
            # pages that went out and came back: residency is read right after each page-out.
            stayed = await self.ctx.blocking(self._pageout_then_residency, pid, everything, regs, timeout=120.0)
            await asyncio.sleep(cfg.park_observe_s)
            background = await self.ctx.blocking(self._came_back, pid, regs, stayed)
            stayed = await self.ctx.blocking(self._pageout_then_residency, pid, everything, regs, timeout=120.0)
            ping_s = None
            try:
                ping_s = await self._ping(vm, timeout=10.0)
            except AgentError as exc:
                log.info("vm %s: no ping while observing its working set: %s", vm, exc)
            wset = await self.ctx.blocking(self._came_back, pid, regs, stayed)
            background_mib = sum(n for _, n in background) / MIB
            wset_mib = sum(n for _, n in wset) / MIB
            unpaged_mib = sum(int(m.sum()) for m in stayed) * PAGE / MIB
            try:
                await self.ctx.knobs.turn(self.name, vm, KIND, "", "paused", original="running")
            except HostError as exc:
                raise Unavailable(f"{vm}: suspend failed: {exc}") from None
            with self.ctx.store.transaction() as db:
                db.execute("INSERT INTO paging_parked (vm, pid, ranges, info, parked_at) VALUES (?, ?, ?, ?, ?)",
                           (vm, pid, json.dumps(wset), json.dumps({"wset_mib": round(wset_mib, 1)}), time.time()))
            await self.ctx.blocking(host.process_pageout, pid, everything, timeout=120.0)
            dt = time.perf_counter() - t0
            after = self.memory_view(pid, ram_bytes)
            self._parked_fp[vm] = (pid, ram_bytes, float(after["guest_ram"]["resident_mib"]))
            outcome = {"wset_mib": round(wset_mib, 1), "wset_ranges": len(wset), "observe_ping_s": ping_s,
                       "unpaged_mib": round(unpaged_mib, 1),  # stayed resident through the page-out (KSM)
                       "background_wset_mib": round(background_mib, 1), "seconds": round(dt, 3),
                       "before": before, "after": after, "tier_used_mib": self._swap_used_mib(),
                       "tier_room_mib": self.tier_room_mib()}  # near 0: the next park frees little
            self.ctx.decisions.log("park", vm, {"reason": reason, "observe_s": cfg.park_observe_s,
                                                "include_code_cache": cfg.include_code_cache,
                                                **({"idle": idle} if idle is not None else {})}, outcome)
            self.last[vm] = {"action": "park", "at": time.time(), "wset_mib": outcome["wset_mib"]}
            log.info("vm %s: parked (RSS %.1f -> %.1f MiB, idle working set %.1f MiB)", vm, before["rss_mib"],
                     after["rss_mib"], wset_mib)
            return {"vm": vm, **outcome}

    def _pageout_then_residency(self, pid: int, ranges: list[tuple[int, int]], regs: list[Mapping]) -> list[Any]:
        """Page ``ranges`` out, then read what stayed resident in ``regs`` (one blocking call:
        the guest runs meanwhile, and the sooner the read the fewer pages it re-faults first)."""
        self.ctx.host.process_pageout(pid, ranges)
        return self._residency(pid, regs)

    def _prefetch(self, pid: int, ranges: list[tuple[int, int]], mode: str) -> tuple[int, float]:
        """Swap the ranges in, split over the host's CPUs (the syscalls release the GIL)."""
        t0 = time.perf_counter()
        ranges = po.coalesce(ranges, PREFETCH_GAP)
        if not ranges:
            return 0, 0.0
        host = self.ctx.host
        if mode == "willneed":  # one syscall per 1024 ranges: the kernel reads them into the swap cache
            return host.process_willneed(pid, ranges), time.perf_counter() - t0
        workers = max(1, min(4, os.cpu_count() or 1))
        total = sum(n for _, n in ranges)
        parts: list[list[tuple[int, int]]] = [[] for _ in range(workers)]
        share, i, acc = total / workers, 0, 0
        for a, n in ranges:  # contiguous shares of about equal size
            parts[min(i, workers - 1)].append((a, n))
            acc += n
            if acc >= share * (i + 1):
                i += 1
        with ThreadPoolExecutor(workers) as ex:
            done = sum(ex.map(lambda p: host.process_touch(pid, p), [p for p in parts if p]))
        return done, time.perf_counter() - t0

    def _resume(self, vm: str) -> float:
        t0 = time.perf_counter()
        self.ctx.host.resume(vm)
        return time.perf_counter() - t0

    async def wake(self, vm: str, prefetch: bool = True, reason: str = "api", mode: str | None = None) -> dict[str, Any]:
        """Swap the recorded working set in (``prefetch``) while the VM resumes, then deliver a
        request (agent ping); the wake latency is until its answer."""
        rec = self.parked(vm)
        if rec is None:
            self.ctx.vm(vm)
            raise Conflict(f"VM {vm!r} is not parked")
        mode = mode or self.cfg.prefetch
        if mode not in ("touch", "willneed"):
            raise Invalid(f"prefetch mode {mode!r}: must be touch or willneed")
        self._unwatch_taps(vm)
        host = self.ctx.host
        pid = host.qemu_pid(vm)
        async with self.lock:
            if self.parked(vm) is None:  # woken by another request while this one waited
                raise Conflict(f"VM {vm!r} is not parked")
            t0 = time.perf_counter()
            ranges = [(int(a), int(n)) for a, n in rec["ranges"]]
            fetched = 0
            prefetch_s = resume_s = None
            try:
                if prefetch and pid == rec["pid"]:
                    # Swap-in and libvirt's resume overlap; the request is sent once both are done.
                    (fetched, prefetch_s), resume_s = await asyncio.gather(
                        asyncio.to_thread(self._prefetch, pid, ranges, mode), asyncio.to_thread(self._resume, vm))
                elif host.info(vm).state == "paused":
                    resume_s = await asyncio.to_thread(self._resume, vm)
            except HostError as exc:
                raise Unavailable(f"{vm}: resume failed: {exc}") from None
            ready_s = time.perf_counter() - t0
            ping_s = error = None
            try:
                ping_s = await self._ping(vm, timeout=30.0)
            except AgentError as exc:
                error = str(exc)
            latency = time.perf_counter() - t0
            self._parked_fp.pop(vm, None)
            with self.ctx.store.transaction() as db:
                db.execute("DELETE FROM paging_parked WHERE vm = ?", (vm,))
            self.ctx.knobs.forget(vm, KIND)
            outcome = {"latency_s": round(latency, 4), "ready_s": round(ready_s, 4),
                       "resume_s": None if resume_s is None else round(resume_s, 4),
                       "prefetch_s": None if prefetch_s is None else round(prefetch_s, 4),
                       "ping_s": None if ping_s is None else round(ping_s, 4),
                       "prefetched_mib": round(fetched / MIB, 1), "answered": ping_s is not None, "error": error}
            self.ctx.decisions.log("wake", vm, {"reason": reason, "prefetch": prefetch, "mode": mode,
                                                "wset_mib": rec["info"].get("wset_mib"),
                                                "parked_s": round(time.time() - rec["parked_at"], 1)}, outcome)
            self.last[vm] = {"action": "wake", "at": time.time(), **outcome}
            log.info("vm %s: woken in %.3f s (prefetch %s: %.1f MiB)", vm, latency, prefetch, fetched / MIB)
            return {"vm": vm, "prefetch": prefetch, "mode": mode, **outcome}

    # -- wake on request: the gateway hook, tap traffic, the ping ------------------------------
    async def before_agent_call(self, vm: str, op: str) -> None:
        """The gateway's hook, before every agent call. A call from outside the control loop
        counts as a request (the VM is not idle) and wakes the VM if it is parked, so the call is
        answered; the daemon's own periodic calls never wake one: they are refused (the parts
        skip paused VMs already; this closes the race with a park made meanwhile)."""
        if _OWN_CALL.get():
            return
        parked = vm in self._parking or vm in self._waking or self.parked(vm) is not None
        if in_period():
            if parked:
                raise NoAgent(f"{vm}: parked by the paging part (the control loop does not wake it)")
            return
        self.requests[vm] = self.requests.get(vm, 0) + 1
        if parked:
            await self.ensure_awake(vm, f"agent call {op}")

    async def ensure_awake(self, vm: str, reason: str) -> dict[str, Any] | None:
        """Wake ``vm`` if it is parked (or being parked); concurrent callers share one wake.
        The wake's outcome, or None when it was not parked."""
        task = self._waking.get(vm)
        if task is None:
            parking = self._parking.get(vm)
            if parking is not None:  # a park in progress ends first, then it is woken
                await parking.wait()
            task = self._waking.get(vm)
        if task is None:
            if self.parked(vm) is None:
                return None
            task = asyncio.get_running_loop().create_task(self._wake_for(vm, reason), name=f"wake-{vm}")
            self._waking[vm] = task
            task.add_done_callback(lambda _t, vm=vm: self._waking.pop(vm, None))
        return await asyncio.shield(task)

    async def _wake_for(self, vm: str, reason: str) -> dict[str, Any] | None:
        try:
            return await self.wake(vm, prefetch=True, reason=reason)
        except Conflict:  # woken meanwhile (API wake)
            return None

    async def ping(self, vm: str) -> dict[str, Any]:
        """``POST /v1/vms/{vm}/ping``: an agent ``core.ping``, waking the VM first if parked;
        seconds include the wake."""
        self.ctx.vm(vm)  # 404
        t0 = time.perf_counter()
        wake = await self.ensure_awake(vm, "ping")
        if not self.ctx.agent(vm).ready:
            # A woken guest's link may reconnect: give it the agent timeout.
            t_end = time.monotonic() + 5.0
            while not self.ctx.agent(vm).ready and time.monotonic() < t_end and wake is not None:
                await asyncio.sleep(0.05)
            if not self.ctx.agent(vm).ready:
                raise Conflict(f"VM {vm!r} has no agent connected: nothing to ping")
        await self.ctx.agents.call(vm, "core.ping", {}, timeout=10.0)
        return {"vm": vm, "seconds": round(time.perf_counter() - t0, 4), "woke": wake is not None, "wake": wake}

    def _devs(self, vm: str) -> list[str]:
        """The VM's tap devices (domain XML), read again when its QEMU process changed."""
        host = self.ctx.host
        pid = host.qemu_pid(vm)
        hit = self._taps.get(vm)
        if hit is not None and hit[0] == pid:
            return hit[1]
        try:
            devs = host.interfaces(vm)
        except HostError as exc:
            log.debug("vm %s: no interfaces: %s", vm, exc)
            devs = []
        self._taps[vm] = (pid, devs)
        return devs

    async def _watch_taps(self, vm: str) -> None:
        """While parked, a frame toward the guest on one of its taps wakes it."""
        loop = self._loop or asyncio.get_running_loop()

        def on_frame(vm: str, dev: str) -> None:  # the watcher's thread
            def start() -> None:
                t = loop.create_task(self.ensure_awake(vm, f"frame on tap {dev}"), name=f"tap-wake-{vm}")
                self._tasks.add(t)
                t.add_done_callback(self._task_done)
            loop.call_soon_threadsafe(start)

        try:
            devs = await self.ctx.blocking(self._devs, vm)
            if devs:
                watched = await self.ctx.blocking(self.ctx.host.watch_taps, vm, devs, on_frame)
                log.info("vm %s: parked; a frame on %s wakes it", vm, ", ".join(watched) or "(none)")
        except (HostError, TimeoutError) as exc:
            log.warning("vm %s: its taps are not watched (traffic will not wake it): %s", vm, exc)

    def _unwatch_taps(self, vm: str) -> None:
        try:
            self.ctx.host.unwatch_taps(vm)
        except HostError as exc:
            log.debug("vm %s: unwatch: %s", vm, exc)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("paging: %s failed: %s", task.get_name(), task.exception())

    # -- the period: idle VMs parked (paging.idle_park), then page out what ballooning left above
    # the budget (paging.auto_pageout) -------------------------------------------------------------
    def idle_sample(self, vm: str, now: float) -> IdleSample:
        """One look at a VM for the idle policy: the core's libvirt sample (state), its vCPU time,
        its taps' packet counters, the requests counted by the hook, the guest's load."""
        snap = self.ctx.latest(vm)
        lv = snap.get("libvirt") or {}
        host = self.ctx.host
        running = lv.get("state") == "running"
        vcpu = packets = None
        if running:
            vcpu = host.vcpu_seconds(vm)
            devs = self._devs(vm)
            if devs:
                counts = [host.net_packets(d) for d in devs]
                packets = sum(c for c in counts if c is not None)
        load = (snap.get("agent") or {}).get("loadavg") or []
        return IdleSample(t=now, running=running, vcpu_s=vcpu, net_packets=packets,
                          requests=self.requests.get(vm, 0), load1=float(load[0]) if load else None)

    def _observe_idle(self, now: float) -> dict[str, list[IdleSample]]:
        keep = self.cfg.idle_after_s + 4 * max(1.0, float(self.ctx.cfg.control.period_s))
        out: dict[str, list[IdleSample]] = {}
        busy = self.parked_vms() | set(self._parking) | set(self._waking)
        names = {rec.name for rec in self.ctx.vms()}
        for vm in [v for v in self.idle_samples if v not in names]:
            del self.idle_samples[vm]
        for vm in sorted(names):
            q = self.idle_samples.setdefault(vm, deque(maxlen=4096))
            if vm in busy:
                q.clear()  # parked: after its wake the window starts again
                continue
            try:
                q.append(self.idle_sample(vm, now))
            except HostError as exc:
                log.debug("vm %s: no idle sample: %s", vm, exc)
                q.clear()
                continue
            while len(q) > 1 and now - q[1].t >= keep:
                q.popleft()
            out[vm] = list(q)
        return out

    async def observe(self, period: Period) -> PagingObservation:
        """Idle samples (``idle_park``), then, after the memory part's act (it is required, so it
        ran first): each VM's resident guest RAM, balloon target, working set and floor, and
        memory's budget (``auto_pageout``)."""
        cfg = self.cfg
        obs = PagingObservation(idle_after_s=cfg.idle_after_s, idle_cpu_pct=cfg.idle_cpu_pct)
        if cfg.idle_park:
            if self.device is None:
                if not self._no_tier_logged:
                    log.warning("paging: idle_park is on but there is no swap tier (paging.enabled): "
                                "idle VMs are not parked")
                    self._no_tier_logged = True
            else:
                obs.idle = await self.ctx.blocking(self._observe_idle, self.clock())
        if cfg.auto_pageout and self.device is not None:
            obs.shortfall = await self._observe_shortfall()
        return obs

    async def _observe_shortfall(self) -> ShortfallPlanInputs:
        mem: Any = self.ctx.peer("memory")
        parked = self.parked_vms()
        vms = []
        for rec in self.ctx.vms():
            lv = dict(self.ctx.latest(rec.name).get("libvirt") or {})
            try:
                got = self._parked_footprint(rec.name, lv) if rec.name in parked else None
                if got is None:
                    pid, ram_bytes, state = self._qemu(rec.name)
                    ram, _code, _maps = await self.ctx.blocking(self.regions, pid, ram_bytes)
                    resident_mib = ram.rss_kib / 1024
                    if rec.name in parked and state == "paused":
                        self._parked_fp[rec.name] = (pid, ram_bytes, resident_mib)
                else:
                    ram_bytes, resident_mib, state = got[0], got[1], "paused"
            except Exception as exc:  # a VM that is down has no footprint to page
                log.debug("vm %s: no footprint: %s", rec.name, exc)
                continue
            st = mem.state.vms.get(rec.name)
            ref = st.last_wss.get("referenced_bytes") if st is not None else None
            pol = rec.policy.get("memory", {}) if isinstance(rec.policy, dict) else {}
            vms.append(VmFootprint(
                name=rec.name, running=state == "running", resident_mib=resident_mib,
                allocated_mib=float(mem.current_target(rec.name, lv)) if lv else ram_bytes / MIB,
                wss_mib=None if ref is None else float(ref) / MIB, floor_mib=float(pol.get("min_mib") or 64),
                **mem.shortfall_inputs(rec.name)))  # pressure, balloon growth, ρ, u: who must not be paged
        return ShortfallPlanInputs(float(mem.budget_mib()), vms, float(self.cfg.margin_mib))

    def _parked_footprint(self, vm: str, lv: dict[str, Any]) -> tuple[int, float] | None:
        """(guest RAM bytes, resident MiB) of a parked VM as measured when it was parked, while
        the core's sample of this period still says paused and its QEMU is the same process
        (a pidfile read: no libvirt call, no smaps); None: measure it."""
        hit = self._parked_fp.get(vm)
        if hit is None or lv.get("state") != "paused":
            return None
        try:
            same = self.ctx.host.qemu_pid(vm) == hit[0]
        except HostError:
            same = False
        if not same:
            self._parked_fp.pop(vm, None)
            return None
        return hit[1], hit[2]

    def decide(self, obs: PagingObservation | None) -> PagingDecision:
        if obs is None:
            return PagingDecision()
        return PagingDecision(
            shortfall=None if obs.shortfall is None else policy.shortfall_plan(
                obs.shortfall.budget_mib, obs.shortfall.vms, obs.shortfall.margin_mib),
            idle={vm: policy.idle_verdict(s, obs.idle_after_s, obs.idle_cpu_pct) for vm, s in obs.idle.items()})

    async def act(self, decision: PagingDecision | None) -> None:
        if decision is None:
            return
        self.idle_last = dict(decision.idle)
        for vm, verdict in decision.park.items():
            # In a task: parking observes the VM for park_observe_s; the period goes on.
            t = asyncio.get_running_loop().create_task(self._idle_park(vm, verdict), name=f"idle-park-{vm}")
            self._tasks.add(t)
            t.add_done_callback(self._task_done)
        await self._act_shortfall(decision.shortfall)

    async def _idle_park(self, vm: str, verdict: IdleVerdict) -> None:
        self.idle_samples.pop(vm, None)
        try:
            await self.park(vm, reason=f"idle policy: {verdict.reason}", idle=verdict.inputs)
        except Exception as exc:  # logged with its inputs: a refused park is a decision too
            self.ctx.decisions.log("idle-park-failed", vm, {"reason": verdict.reason, "idle": verdict.inputs},
                                   {"error": str(exc)[:500]})
            log.warning("vm %s: idle park failed: %s", vm, exc)

    async def _act_shortfall(self, decision: ShortfallPlan | None) -> None:
        self.last_plan = decision
        if decision is None:
            return
        inputs = {"budget_mib": decision.budget_mib, "footprint_mib": round(decision.footprint_mib, 1),
                  "shortfall_mib": round(decision.shortfall_mib, 1)}
        if decision.refused is not None:
            if decision.refused != self._refused:
                self.ctx.decisions.log("refused", None, inputs, {"reason": decision.refused})
                log.warning("paging: %s", decision.refused)
            self._refused = decision.refused
            return
        self._refused = None
        # The plan, each VM with its inputs and why it was paged or spared: logged when it pages,
        # or when who is spared and why changes (not every period of a shortfall nobody may pay).
        sig = (tuple(decision.pageouts), tuple((ln.name, ln.reason.split(":")[0]) for ln in decision.vms))
        if decision.shortfall_mib > 0 and (decision.pageouts or sig != self._plan_logged):
            self.ctx.decisions.log("pageout-plan", None, {**inputs, "margin_mib": self.cfg.margin_mib, "vms": {
                ln.name: ln.inputs for ln in decision.vms}}, {"pageouts": decision.pageouts, "left_mib": round(
                    decision.left_mib, 1), "reasons": {ln.name: ln.reason for ln in decision.vms}})
        self._plan_logged = sig if decision.shortfall_mib > 0 else None
        why = {ln.name: ln.reason for ln in decision.vms}
        for i, (vm, mib) in enumerate(decision.pageouts):
            room = self.tier_room_mib()
            if room is not None and mib > room:
                if room < self.TIER_FULL_MIB:
                    if not self._tier_full:
                        self.ctx.decisions.log("tier-full", None, {**inputs, "tier": self.tier_view()}, {
                            "skipped": decision.pageouts[i:],
                            "reason": "no room left in the swap tier (its slots or its RAM limit): page-outs "
                                      "would free nothing; raise paging.zram_size_mib / zram_mem_limit_mib"})
                        log.warning("paging: the swap tier is full; page-outs skipped until it has room")
                    self._tier_full = True
                    break
                mib = int(room)  # what fits
            self._tier_full = False
            try:
                await self.pageout_vm(vm, mib, reason=f"policy: {decision.shortfall_mib:.0f} MiB over the budget "
                                                      f"after ballooning: {why.get(vm, '')}")
            except Exception as exc:  # one VM's failure must not stop the others
                log.warning("vm %s: policy page-out of %d MiB failed: %s", vm, mib, exc)

    # -- the view --------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """``GET /v1/paging``: the tier and, per VM, where its host memory is."""
        vms = []
        for rec in self.ctx.vms():
            row: dict[str, Any] = {"name": rec.name, "parked": False}
            try:
                pid, ram_bytes, state = self._qemu(rec.name)
                row.update(state=state, **self.memory_view(pid, ram_bytes))
            except Exception as exc:  # a VM that is down or unreadable still gets a row
                row["error"] = str(exc)
            p = self.parked(rec.name)
            if p is not None:
                row.update(parked=True, parked_at=p["parked_at"], wset_mib=p["info"].get("wset_mib"))
            row["last"] = self.last.get(rec.name)
            vms.append(row)
        return {"tier": self.tier_view(), "vms": vms}

    def set_policy(self, changes: dict[str, Any]) -> dict[str, Any]:
        """``PUT /v1/paging/policy``: the idle policy's keys for this run (validated by the API)."""
        for key in ("idle_park", "idle_after_s", "idle_cpu_pct"):
            if key in changes:
                setattr(self.cfg, key, changes[key])
        self.ctx.decisions.log("idle-policy", None, changes, {})
        return {k: getattr(self.cfg, k) for k in ("idle_park", "idle_after_s", "idle_cpu_pct")}

    # -- where each VM's memory is, and the last lever that moved (symbiont status) -------------
    LEVER_PARTS = ("memory", "paging", "dedup", "cpu", "placement", "migration", "ssdcache", "gpu")

    def last_lever(self, vm: str, now: float | None = None) -> dict[str, Any] | None:
        """The newest decision any part logged for ``vm`` (not the core's or the agent link's):
        part, action, why, how long ago."""
        marks = ",".join("?" * len(self.LEVER_PARTS))
        rows = self.ctx.store.query(f"SELECT ts, part, action, inputs, outcome FROM decisions WHERE vm = ? "
                                    f"AND part IN ({marks}) ORDER BY id DESC LIMIT 1", (vm, *self.LEVER_PARTS))
        if not rows:
            return None
        r = rows[0]

        def load(text: str) -> dict[str, Any]:
            try:
                v = json.loads(text)
            except (TypeError, ValueError):
                return {}
            return v if isinstance(v, dict) else {}

        inputs, outcome = load(r["inputs"]), load(r["outcome"])
        why = outcome.get("reason") or inputs.get("reason") or ""
        return {"part": r["part"], "action": r["action"], "reason": str(why)[:300],
                "age_s": round((now or time.time()) - float(r["ts"]), 1)}

    def _shared_mib(self, vm: str, pid: int) -> float | None:
        """KSM-merged guest RAM: the dedup part's figure for the VM, else KSM's per-process counter."""
        try:
            info = self.ctx.peer("dedup").sharing(vm)  # type: ignore[attr-defined]
        except Exception:  # the dedup part may not run in this daemon
            info = None
        if info and isinstance(info.get("shared_bytes"), (int, float)):
            return float(info["shared_bytes"]) / MIB
        st = self.ctx.host.process_ksm_stat(pid)
        if st is None:
            return None
        return float(int(st.get("ksm_merging_pages", 0)) * PAGE) / MIB

    def memory_status(self) -> dict[str, Any]:
        """``GET /v1/paging/memory``: per VM, each MiB of its configured memory in one place
        (:func:`policy.account`), QEMU's overhead apart, its host footprint, and the last lever
        that moved for it and why."""
        probe = self.ctx.host.zram_probe(self.device) if self.device is not None else None
        mm = probe["stats"] if probe is not None else None
        cost = (mm.mem_used_total / mm.orig_data_size) if mm is not None and mm.orig_data_size else None
        now = time.time()
        parked = self.parked_vms()
        rows = []
        for rec in self.ctx.vms():
            snap = self.ctx.latest(rec.name)
            lv, mi = snap.get("libvirt") or {}, (snap.get("agent") or {}).get("meminfo") or {}
            row: dict[str, Any] = {"name": rec.name, "state": "parked" if rec.name in parked else lv.get("state"),
                                   "last": self.last_lever(rec.name, now)}
            try:
                pid, ram_bytes, state = self._qemu(rec.name)
                view = self.memory_view(pid, ram_bytes)
                if row["state"] is None:
                    row["state"] = state
                g, c, o = view["guest_ram"], view["code_cache"], view["qemu_other"]
                pss = self.ctx.host.process_pss_kib(pid)
                cur = lv.get("memory_mib")
                row.update(policy.account(VmMemoryInputs(
                    configured_mib=ram_bytes / MIB,
                    balloon_mib=float(cur) if isinstance(cur, (int, float)) else None,
                    guest_used_mib=(mi["MemTotal"] - mi["MemAvailable"]) / MIB
                    if "MemTotal" in mi and "MemAvailable" in mi else None,
                    ram_resident_mib=g["resident_mib"], ram_swapped_mib=g["swapped_mib"],
                    ksm_shared_mib=self._shared_mib(rec.name, pid),
                    code_resident_mib=c["resident_mib"], code_swapped_mib=c["swapped_mib"],
                    other_resident_mib=o["resident_mib"], other_swapped_mib=o["swapped_mib"],
                    pss_mib=None if pss is None else pss / 1024, swap_cost=cost)))
                for k, v in list(row.items()):
                    if isinstance(v, float):
                        row[k] = round(v, 1)
            except Exception as exc:  # a VM that is down or unreadable still gets a row
                row["error"] = str(exc)[:300]
            rows.append(row)
        return {"swap_cost": None if cost is None else round(cost, 3), "vms": rows}

    def status(self) -> dict[str, Any]:
        return {"enabled": self.cfg.enabled, "auto_pageout": self.cfg.auto_pageout,
                "last_plan": None if self.last_plan is None else {
                    "shortfall_mib": round(self.last_plan.shortfall_mib, 1), "pageouts": self.last_plan.pageouts,
                    "refused": self.last_plan.refused},
                "device": None if self.device is None else zram.dev_path(self.device),
                "parked": sorted(self.parked_vms()), "idle_park": self.cfg.idle_park,
                "idle": {vm: {"park": v.park, "reason": v.reason} for vm, v in self.idle_last.items()}}


PART = PagingPart
