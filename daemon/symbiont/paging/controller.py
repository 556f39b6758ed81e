"""The paging controller: the swap tier's life cycle, page-out, park and wake.

Swap tier. With ``paging.enabled`` the daemon creates a zram device at start
(:mod:`symbiont.host.zram`) and removes it at stop (``swapoff`` brings every page back to
its owner, so nothing is lost). The device is recorded in sqlite *right after* ``hot_add``,
before it is formatted, so a daemon killed at any point leaves a record. A restarted daemon
finds the record and either **adopts** the device — when it is still its own (swap label),
and paging is enabled with the same size and compressor: the pages of running and parked
VMs stay where they are, no swap-in storm, no double tier — or **removes** it (paging now
disabled or configured differently): ``swapoff`` returns the pages to the VMs that own them.
A device whose label is not ours is never touched; its record is dropped.

Page-out (:func:`pageout_vm`): the guest decides *what* (``paging-cold``: its free and cold
frames), the host *how much* (resident guest RAM − (working set + margin), or what the
caller asks), restricted to pages resident now; ``process_madvise(MADV_PAGEOUT)`` on the
QEMU process's guest-RAM mapping. Every page-out is a decision with its inputs.

Park / wake (seeds/004: keep idle VMs forever, available on demand). Park pages the running
VM's RAM out and lets it run ``park_observe_s`` (what comes back is its background working
set), pages it out again and delivers one request (an agent ping): the pages that come back
now (``pagemap``) are the request's working set, which is recorded. Then it pauses the VM
(no CPU) and pages everything out again. Wake swaps the recorded
working set in (``prefetch``) while libvirt resumes the VM, then delivers the request (an
agent ping) and measures how long it took. Parked VMs are a knob: the daemon resumes them
when it stops.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import libvirt

from symbiont.agentlink import AgentOpError, AgentUnavailable
from symbiont.errors import Conflict, Invalid, NotFound, Unavailable
from symbiont.host import pageout as po
from symbiont.host import zram
from symbiont.host.libvirt_host import LibvirtError
from symbiont.paging import policy

if TYPE_CHECKING:
    from symbiont.daemon import Daemon

log = logging.getLogger(__name__)
MIB = 1 << 20
PAGE = po.PAGE_SIZE

SCHEMA = """
CREATE TABLE IF NOT EXISTS paging_tier (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    device INTEGER NOT NULL,
    label TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
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


class PagingState:
    """In-memory side of the part: the tier's device (the truth is in sqlite) and last actions."""

    def __init__(self) -> None:
        self.device: int | None = None
        self.last: dict[str, dict[str, Any]] = {}  # per VM: last page-out / park / wake outcome
        self.lock = asyncio.Lock()


def tier_label(state_dir: str) -> str:
    """The swap label naming this daemon's tier (mkswap keeps 15 bytes; unique per state folder)."""
    return "symbiont-" + hashlib.sha256(state_dir.encode()).hexdigest()[:6]


def _state(daemon: Daemon) -> PagingState:
    return daemon.paging  # type: ignore[attr-defined,no-any-return]


# -- the swap tier ------------------------------------------------------------------------------
def _tier_row(daemon: Daemon) -> dict[str, Any] | None:
    rows = daemon.store.query("SELECT * FROM paging_tier WHERE id = 1")
    return dict(rows[0]) if rows else None


def _forget_tier(daemon: Daemon) -> None:
    with daemon.store.transaction() as db:
        db.execute("DELETE FROM paging_tier WHERE id = 1")


def recover_tier(daemon: Daemon) -> dict[str, Any] | None:
    """Deal with a tier recorded by an earlier daemon (see the module docstring): adopt or remove."""
    row = _tier_row(daemon)
    if row is None:
        return None
    cfg = daemon.cfg.paging
    num, label = int(row["device"]), row["label"]
    if not zram.exists(num):
        _forget_tier(daemon)
        return {"action": "forgotten", "device": num, "reason": "the device is gone"}
    found = zram.swap_label(num)
    if found is not None and found != label:
        _forget_tier(daemon)
        return {"action": "forgotten", "device": num, "reason": f"zram{num} now belongs to {found!r}"}
    if found is None and zram.disksize(num) and row["state"] != "creating":
        _forget_tier(daemon)
        return {"action": "forgotten", "device": num, "reason": f"zram{num} holds no swap of ours"}
    same = (cfg.enabled and row["state"] == "on" and found == label and zram.is_swap(num)
            and int(row["size_bytes"]) == cfg.zram_size_mib * MIB and row["compressor"] == cfg.compressor)
    if same:
        _state(daemon).device = num
        return {"action": "adopted", "device": num, "swap": zram.swaps().get(zram.dev_path(num))}
    used = zram.swaps().get(zram.dev_path(num), {}).get("used_kib", 0)
    zram.remove(num)  # swapoff first: the pages go back to their owners, nothing is lost
    _forget_tier(daemon)
    why = "paging is disabled" if not cfg.enabled else (
        "left half-made" if row["state"] == "creating" else "the config asks for another size or compressor")
    return {"action": "removed", "device": num, "swapped_in_kib": used, "reason": why}


def create_tier(daemon: Daemon) -> int:
    cfg = daemon.cfg.paging
    label = tier_label(daemon.cfg.state_dir)

    def record(num: int) -> None:
        with daemon.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO paging_tier (id, device, label, size_bytes, compressor, priority, "
                       "state, created_at) VALUES (1, ?, ?, ?, ?, ?, 'creating', ?)",
                       (num, label, cfg.zram_size_mib * MIB, cfg.compressor, cfg.swap_priority, time.time()))

    num = zram.create_swap(cfg.zram_size_mib * MIB, cfg.compressor, label, cfg.swap_priority, on_added=record)
    with daemon.store.transaction() as db:
        db.execute("UPDATE paging_tier SET state = 'on' WHERE id = 1")
    _state(daemon).device = num
    return num


def remove_tier(daemon: Daemon, reason: str) -> dict[str, Any]:
    st = _state(daemon)
    row = _tier_row(daemon)
    if st.device is None or row is None:
        return {"removed": False}
    used = zram.swaps().get(zram.dev_path(st.device), {}).get("used_kib", 0)
    t0 = time.monotonic()
    zram.remove(st.device)
    _forget_tier(daemon)
    out = {"removed": True, "device": st.device, "swapped_in_kib": used, "seconds": round(time.monotonic() - t0, 3)}
    daemon.store.log_decision("paging", "tier-remove", None, {"reason": reason}, out)
    st.device = None
    return out


def tier_view(daemon: Daemon) -> dict[str, Any]:
    st = _state(daemon)
    cfg = daemon.cfg.paging
    out: dict[str, Any] = {"enabled": cfg.enabled, "device": None, "compressor": cfg.compressor}
    if st.device is None or not zram.exists(st.device):
        return out
    sw = zram.swaps().get(zram.dev_path(st.device), {})
    mm = zram.stats(st.device)
    out.update({
        "device": zram.dev_path(st.device),
        "size_mib": round(sw.get("size_kib", 0) / 1024, 1),
        "used_mib": round(sw.get("used_kib", 0) / 1024, 1),
        "priority": sw.get("priority"),
        "stored_mib": round(mm.orig_data_size / MIB, 1),
        "compressed_mib": round(mm.compr_data_size / MIB, 1),
        "mem_used_mib": round(mm.mem_used_total / MIB, 1),
        "ratio": round(mm.orig_data_size / mm.compr_data_size, 2) if mm.compr_data_size else None,
    })
    return out


# -- the part's life cycle ----------------------------------------------------------------------
async def start(daemon: Daemon) -> None:
    daemon.paging = PagingState()  # type: ignore[attr-defined]
    daemon.store.ensure_schema(SCHEMA)
    try:
        rec = await asyncio.to_thread(recover_tier, daemon)
        if rec:
            daemon.store.log_decision("paging", "tier-recover", None, {"record": "earlier daemon"}, rec)
            log.info("paging: swap tier of an earlier daemon %s (%s)", rec["action"], rec)
        if daemon.cfg.paging.enabled and _state(daemon).device is None:
            num = await asyncio.to_thread(create_tier, daemon)
            daemon.store.log_decision("paging", "tier-create", None,
                                      {"size_mib": daemon.cfg.paging.zram_size_mib,
                                       "compressor": daemon.cfg.paging.compressor}, {"device": num})
            log.info("paging: swap tier /dev/zram%d (%d MiB, %s)", num, daemon.cfg.paging.zram_size_mib,
                     daemon.cfg.paging.compressor)
    except zram.ZramError as exc:
        log.error("paging: no swap tier: %s", exc)


async def stop(daemon: Daemon) -> None:
    """Resume parked VMs (a knob), then remove the tier: swapoff returns every page."""
    if not hasattr(daemon, "paging"):
        return
    if daemon.cfg.restore_on_exit:
        for row in daemon.store.query("SELECT vm FROM paging_parked"):
            try:
                await wake(daemon, row["vm"], prefetch=False, reason="daemon stopping")
            except Exception as exc:
                log.warning("vm %s: could not wake it on stop: %s", row["vm"], exc)
    try:
        await asyncio.to_thread(remove_tier, daemon, "daemon stopping")
    except zram.ZramError as exc:
        log.error("paging: swap tier not removed (the next start retries): %s", exc)


# -- a VM's memory on the host ------------------------------------------------------------------
def _qemu(daemon: Daemon, vm: str) -> tuple[int, int, str]:
    """(QEMU pid, guest RAM bytes, libvirt state) of a registered VM, or a 4xx."""
    if daemon.store.get_vm(vm) is None:
        raise NotFound(f"VM {vm!r} is not registered")
    try:
        info = daemon.libvirt.info(vm)
    except LibvirtError as exc:
        raise NotFound(f"libvirt domain {vm!r} is gone: {exc}") from None
    pid = daemon.libvirt.qemu_pid(vm)
    if pid is None or info.state not in ("running", "paused"):
        raise Conflict(f"VM {vm!r} is {info.state}: no QEMU process to page")
    return pid, info.max_memory_kib * 1024, info.state


def regions(pid: int, ram_bytes: int) -> tuple[po.Region, list[po.Region]]:
    try:
        maps = po.read_smaps(pid)
        return po.guest_ram(maps, ram_bytes), po.code_cache(maps)
    except po.PageoutError as exc:
        raise Unavailable(str(exc)) from None


def memory_view(pid: int, ram_bytes: int) -> dict[str, Any]:
    """Where a VM's host memory is: QEMU RSS/swap, guest RAM and TCG code cache apart."""
    ram, code = regions(pid, ram_bytes)
    st = po.status_kib(pid)
    return {
        "qemu_pid": pid,
        "rss_mib": round(st.get("VmRSS", 0) / 1024, 1),
        "swap_mib": round(st.get("VmSwap", 0) / 1024, 1),
        "guest_ram": {"size_mib": round(ram.size / MIB, 1), "resident_mib": round(ram.rss_kib / 1024, 1),
                      "swapped_mib": round(ram.swap_kib / 1024, 1)},
        "code_cache": {"regions": len(code), "resident_mib": round(sum(r.rss_kib for r in code) / 1024, 1),
                       "swapped_mib": round(sum(r.swap_kib for r in code) / 1024, 1)},
    }


def _require_tier(daemon: Daemon, vm: str) -> int:
    if daemon.store.get_vm(vm) is None:
        raise NotFound(f"VM {vm!r} is not registered")
    dev = _state(daemon).device
    if dev is None:
        raise Conflict("no swap tier: set paging.enabled in the config (pages would have nowhere to go)")
    return dev


def _swap_used_mib(daemon: Daemon) -> float | None:
    dev = _state(daemon).device
    if dev is None:
        return None
    return round(zram.swaps().get(zram.dev_path(dev), {}).get("used_kib", 0) / 1024, 1)


async def guest_sample(daemon: Daemon, vm: str) -> dict[str, Any]:
    """What the guest knows: its working set (the memory part's last sample, else a fresh
    non-resetting one), free memory, and its cold frames (``paging-cold``)."""
    out: dict[str, Any] = {"wss_mib": None, "source": None}
    try:  # the memory part's last sample, where that part keeps one
        last = dict(daemon.memory.vm(vm).last_wss)  # type: ignore[attr-defined]
    except Exception:
        last = {}
    link = daemon.links.get(vm)
    coop = link is not None and link.cooperative
    if last.get("referenced_bytes") is not None:
        out.update(wss_mib=round(last["referenced_bytes"] / MIB, 1), source="memory part")
    elif coop and "wss-sample" in link.caps:
        try:
            res, _ = await link.request("wss-sample", {"reset": False})
            ref = res.get("referenced_bytes") if isinstance(res, dict) else None
            if isinstance(ref, int) and not isinstance(ref, bool) and ref >= 0 and res.get("interval_s"):
                out.update(wss_mib=round(ref / MIB, 1), source="wss-sample")
        except (AgentUnavailable, AgentOpError) as exc:
            out["wss_error"] = str(exc)
    mi = daemon.latest.get(vm, {}).get("agent", {}).get("meminfo", {})
    if "MemFree" in mi:
        out["mem_free_mib"] = round(mi["MemFree"] / MIB, 1)
    if "MemAvailable" in mi:
        out["mem_available_mib"] = round(mi["MemAvailable"] / MIB, 1)
    out["cold"] = None
    if coop and "paging-cold" in link.caps:
        try:
            res, _ = await link.request("paging-cold", {}, timeout=30.0)
            out["cold"] = res
        except (AgentUnavailable, AgentOpError) as exc:
            out["cold_error"] = str(exc)
    return out


def _guest_classes(cold: Any, npages: int) -> tuple[list[tuple[str, list[tuple[int, int]]]], str | None]:
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


async def pageout_vm(daemon: Daemon, vm: str, mib: int | None = None, reason: str = "api") -> dict[str, Any]:
    """Page out a VM's cold guest memory (see the module docstring); a decision in the log."""
    _require_tier(daemon, vm)
    pid, ram_bytes, state = _qemu(daemon, vm)
    if mib is not None and not 1 <= mib <= ram_bytes // MIB:
        raise Invalid(f"mib {mib} outside 1..{ram_bytes // MIB} (the VM's guest RAM)")
    async with _state(daemon).lock:
        ram, _code = regions(pid, ram_bytes)
        npages = ram_bytes // PAGE  # guest-physical frames; QEMU's rounding past them is not RAM
        present, _sw = po.residency(po.pagemap(pid, ram.start, ram.size))
        present = present[:npages]
        resident_mib = float(present.sum()) * PAGE / MIB
        sample = await guest_sample(daemon, vm)
        classes, cold_error = _guest_classes(sample.pop("cold"), npages)
        cfg = daemon.cfg.paging
        want_mib = float(mib) if mib is not None else policy.pageout_target_mib(
            resident_mib, sample["wss_mib"], cfg.margin_mib)
        sel = policy.select(present, int(want_mib * MIB / PAGE), classes, blind=True)
        rss0 = po.status_kib(pid)
        swap0 = _swap_used_mib(daemon)
        t0 = time.perf_counter()
        ranges = [(ram.start + a * PAGE, n * PAGE) for a, n in sel.ranges]
        advised = await asyncio.to_thread(po.pageout, pid, ranges) if ranges else 0
        dt = time.perf_counter() - t0
        rss1 = po.status_kib(pid)
        inputs = {"reason": reason, "state": state, "requested_mib": mib, "resident_mib": round(resident_mib, 1),
                  "guest": {**sample, "free_runs": len(classes[0][1]) if classes else None,
                            "cold_runs": len(classes[1][1]) if classes else None, "cold_error": cold_error},
                  "margin_mib": cfg.margin_mib, "target_mib": round(want_mib, 1)}
        outcome = {"paged_mib": round(sel.pages * PAGE / MIB, 1),
                   "by_source_mib": {k: round(v * PAGE / MIB, 1) for k, v in sel.pages_by_source.items()},
                   "ranges": len(ranges), "advised_mib": round(advised / MIB, 1), "seconds": round(dt, 4),
                   "rss_before_mib": round(rss0.get("VmRSS", 0) / 1024, 1),
                   "rss_after_mib": round(rss1.get("VmRSS", 0) / 1024, 1),
                   "vm_swap_mib": round(rss1.get("VmSwap", 0) / 1024, 1),
                   "tier_used_before_mib": swap0, "tier_used_after_mib": _swap_used_mib(daemon)}
        daemon.store.log_decision("paging", "pageout", vm, inputs, outcome)
        _state(daemon).last[vm] = {"action": "pageout", "at": time.time(), **outcome}
        log.info("vm %s: paged out %.1f MiB in %.3f s (RSS %s -> %s MiB; %s)", vm, outcome["paged_mib"], dt,
                 outcome["rss_before_mib"], outcome["rss_after_mib"], outcome["by_source_mib"])
        return {"vm": vm, "inputs": inputs, **outcome}


# -- park and wake ------------------------------------------------------------------------------
def _parked(daemon: Daemon, vm: str) -> dict[str, Any] | None:
    rows = daemon.store.query("SELECT * FROM paging_parked WHERE vm = ?", (vm,))
    if not rows:
        return None
    r = dict(rows[0])
    return {"vm": vm, "pid": r["pid"], "ranges": json.loads(r["ranges"]), "info": json.loads(r["info"]),
            "parked_at": r["parked_at"]}


def _all_pages(pid: int, ram: po.Region, code: list[po.Region], with_code: bool,
               with_heap: bool) -> list[tuple[int, int]]:
    """Guest RAM, the TCG code cache and (``with_heap``) QEMU's other private anonymous memory."""
    out = [(ram.start, ram.size)] + ([(r.start, r.size) for r in code] if with_code else [])
    if with_heap:
        try:
            maps = po.read_smaps(pid)
        except po.PageoutError:
            maps = []
        out += [(r.start, r.size) for r in maps
                if r.anonymous and r.perms == "rw-p" and r.start != ram.start and r.rss_kib]
    return out


def _resident_ranges(pid: int, regs: list[po.Region]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for r in regs:
        present, _ = po.residency(po.pagemap(pid, r.start, r.size))
        out.extend((r.start + a * PAGE, n * PAGE) for a, n in po.runs(present))
    return out


async def _ping(daemon: Daemon, vm: str, timeout: float) -> float | None:
    """Seconds an agent ping took, or None when there is no agent to ask."""
    link = daemon.links.get(vm)
    if link is None or not link.ready:
        return None
    t0 = time.perf_counter()
    await link.request("ping", {}, timeout=timeout)
    return time.perf_counter() - t0


def _dom(daemon: Daemon, vm: str) -> libvirt.virDomain:
    try:
        return daemon.libvirt.domain(vm)
    except LibvirtError as exc:
        raise NotFound(str(exc)) from None


async def park(daemon: Daemon, vm: str, reason: str = "api") -> dict[str, Any]:
    """Record the request's working set, pause the VM and page all of it out (module docstring)."""
    _require_tier(daemon, vm)
    pid, ram_bytes, state = _qemu(daemon, vm)
    if _parked(daemon, vm) is not None:
        raise Conflict(f"VM {vm!r} is already parked")
    if state != "running":
        raise Conflict(f"VM {vm!r} is {state}: only a running VM can be parked")
    cfg = daemon.cfg.paging
    async with _state(daemon).lock:
        ram, code = regions(pid, ram_bytes)
        before = memory_view(pid, ram_bytes)
        everything = _all_pages(pid, ram, code, cfg.include_code_cache, cfg.include_qemu_heap)
        t0 = time.perf_counter()
        await asyncio.to_thread(po.pageout, pid, everything)
        # Let the guest run idle: what it brings back is its background working set (timer
        # ticks, daemons). Then page out again and deliver one request (an agent ping): the
        # pages that come back now are the *event's* working set (seeds/004: "build a minimal
        # working set for each event"), the one wake prefetches before delivering a request.
        await asyncio.sleep(cfg.park_observe_s)
        regs = [ram] + (code if cfg.include_code_cache else [])
        background = await asyncio.to_thread(_resident_ranges, pid, regs)
        await asyncio.to_thread(po.pageout, pid, everything)
        ping_s = None
        try:
            ping_s = await _ping(daemon, vm, timeout=10.0)
        except (AgentUnavailable, AgentOpError) as exc:
            log.info("vm %s: no ping while observing its working set: %s", vm, exc)
        wset = await asyncio.to_thread(_resident_ranges, pid, regs)
        background_mib = sum(n for _, n in background) / MIB
        wset_mib = sum(n for _, n in wset) / MIB
        dom = _dom(daemon, vm)
        try:
            await asyncio.to_thread(dom.suspend)
        except libvirt.libvirtError as exc:
            raise Unavailable(f"{vm}: suspend failed: {exc.get_error_message()}") from None
        daemon.store.save_knob(vm, "paging_parked", "running", "paused", part="paging")
        with daemon.store.transaction() as db:
            db.execute("INSERT INTO paging_parked (vm, pid, ranges, info, parked_at) VALUES (?, ?, ?, ?, ?)",
                       (vm, pid, json.dumps(wset), json.dumps({"wset_mib": round(wset_mib, 1)}), time.time()))
        await asyncio.to_thread(po.pageout, pid, everything)
        dt = time.perf_counter() - t0
        after = memory_view(pid, ram_bytes)
        outcome = {"wset_mib": round(wset_mib, 1), "wset_ranges": len(wset), "observe_ping_s": ping_s,
                   "background_wset_mib": round(background_mib, 1),
                   "seconds": round(dt, 3), "before": before, "after": after, "tier_used_mib": _swap_used_mib(daemon)}
        daemon.store.log_decision("paging", "park", vm,
                                  {"reason": reason, "observe_s": cfg.park_observe_s,
                                   "include_code_cache": cfg.include_code_cache}, outcome)
        _state(daemon).last[vm] = {"action": "park", "at": time.time(), "wset_mib": outcome["wset_mib"]}
        log.info("vm %s: parked (RSS %.1f -> %.1f MiB, idle working set %.1f MiB)", vm, before["rss_mib"],
                 after["rss_mib"], wset_mib)
        return {"vm": vm, **outcome}


PREFETCH_GAP = 2 * PAGE  # join working-set ranges this close: fewer syscalls, hardly more data


def _prefetch(pid: int, ranges: list[tuple[int, int]], mode: str) -> tuple[int, float]:
    """Swap the ranges in, split over the host's CPUs (the syscalls release the GIL);
    (bytes, seconds)."""
    t0 = time.perf_counter()
    ranges = po.coalesce(ranges, PREFETCH_GAP)
    if not ranges:
        return 0, 0.0
    if mode == "willneed":  # one syscall per 1024 ranges: the kernel reads them into the swap cache
        return po.willneed(pid, ranges), time.perf_counter() - t0
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
        done = sum(ex.map(lambda p: po.touch(pid, p), [p for p in parts if p]))
    return done, time.perf_counter() - t0


def _resume(dom: libvirt.virDomain) -> float:
    t0 = time.perf_counter()
    dom.resume()
    return time.perf_counter() - t0


async def wake(daemon: Daemon, vm: str, prefetch: bool = True, reason: str = "api",
               mode: str | None = None) -> dict[str, Any]:
    """Swap the recorded working set in (``prefetch``) while the VM resumes, then deliver a
    request (agent ping); the wake latency is until its answer."""
    rec = _parked(daemon, vm)
    if rec is None:
        if daemon.store.get_vm(vm) is None:
            raise NotFound(f"VM {vm!r} is not registered")
        raise Conflict(f"VM {vm!r} is not parked")
    mode = mode or daemon.cfg.paging.prefetch
    if mode not in ("touch", "willneed"):
        raise Invalid(f"prefetch mode {mode!r}: must be touch or willneed")
    pid = daemon.libvirt.qemu_pid(vm)
    async with _state(daemon).lock:
        t0 = time.perf_counter()
        ranges = [(int(a), int(n)) for a, n in rec["ranges"]]
        fetched = 0
        prefetch_s = resume_s = None
        dom = _dom(daemon, vm)
        try:
            if prefetch and pid == rec["pid"]:
                # Swap-in and libvirt's resume overlap; the request is only sent once both are done.
                (fetched, prefetch_s), resume_s = await asyncio.gather(
                    asyncio.to_thread(_prefetch, pid, ranges, mode), asyncio.to_thread(_resume, dom))
            elif dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
                resume_s = await asyncio.to_thread(_resume, dom)
        except libvirt.libvirtError as exc:
            raise Unavailable(f"{vm}: resume failed: {exc.get_error_message()}") from None
        ready_s = time.perf_counter() - t0
        ping_s = None
        error = None
        try:
            ping_s = await _ping(daemon, vm, timeout=30.0)
        except (AgentUnavailable, AgentOpError) as exc:
            error = str(exc)
        latency = time.perf_counter() - t0
        with daemon.store.transaction() as db:
            db.execute("DELETE FROM paging_parked WHERE vm = ?", (vm,))
        daemon.store.forget_knob(vm, "paging_parked")
        outcome = {"latency_s": round(latency, 4), "ready_s": round(ready_s, 4),
                   "resume_s": None if resume_s is None else round(resume_s, 4),
                   "prefetch_s": None if prefetch_s is None else round(prefetch_s, 4),
                   "ping_s": None if ping_s is None else round(ping_s, 4), "prefetched_mib": round(fetched / MIB, 1),
                   "answered": ping_s is not None, "error": error}
        daemon.store.log_decision("paging", "wake", vm,
                                  {"reason": reason, "prefetch": prefetch, "mode": mode,
                                   "wset_mib": rec["info"].get("wset_mib"), "parked_s": round(time.time() - rec["parked_at"], 1)},
                                  outcome)
        _state(daemon).last[vm] = {"action": "wake", "at": time.time(), **outcome}
        log.info("vm %s: woken in %.3f s (prefetch %s: %.1f MiB)", vm, latency, prefetch, fetched / MIB)
        return {"vm": vm, "prefetch": prefetch, "mode": mode, **outcome}


# -- the view -----------------------------------------------------------------------------------
def view(daemon: Daemon) -> dict[str, Any]:
    """``GET /v1/paging``: the tier and, per VM, where its host memory is."""
    vms = []
    for rec in daemon.store.list_vms():
        row: dict[str, Any] = {"name": rec.name, "parked": False}
        try:
            pid, ram_bytes, state = _qemu(daemon, rec.name)
            row.update(state=state, **memory_view(pid, ram_bytes))
        except Exception as exc:  # a VM that is down or unreadable still gets a row
            row["error"] = str(exc)
        p = _parked(daemon, rec.name)
        if p is not None:
            row.update(parked=True, parked_at=p["parked_at"], wset_mib=p["info"].get("wset_mib"))
        row["last"] = _state(daemon).last.get(rec.name)
        vms.append(row)
    return {"tier": tier_view(daemon), "vms": vms}
