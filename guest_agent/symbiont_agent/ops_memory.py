"""Memory cooperation in the guest: working-set sampling and symbiotic balloon preparation.

Working set (ESX's f). ESX marks n random guest pages invalid and counts the ones touched
in a period (f ≈ k/n). This guest kernel has no DAMON and no idle-page tracking, but it has
per-page *referenced* bits that the kernel itself sets on access and that
``/proc/PID/clear_refs`` clears: clearing them is "marking", and the ``Referenced:`` count
in ``/proc/PID/smaps_rollup`` after the period is k. We take n = all resident mapped pages
instead of a random subset, so there is no sampling error; the cost is one page-table walk
per process per period (a few ms on a lab guest). Unmapped page cache is not covered: f
is the fraction of guest memory in *mapped* pages touched during the period.

Balloon preparation (symbiotic ballooning). Before the host inflates the balloon by N MiB,
the guest chooses what to give up: clean page cache first (cgroup v2 ``memory.reclaim``
on the root group, which takes inactive file pages before anything else when there is no
swap; falling back to dropping clean caches), then containers' memory by their shares if the
containers part is present — never a container flagged no-reclaim — and reports what it freed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from symbiont_agent.agent import op
from symbiont_agent.stats import read_meminfo

_last_reset: dict[str, float] = {"t": 0.0}
MAX_RELEASE_MIB = 1 << 20


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _rollup(pid: int) -> tuple[int, int] | None:
    """(Rss kB, Referenced kB) of one process, or None when it has no mm / is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            rss = ref = 0
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Referenced:"):
                    ref = int(line.split()[1])
            return rss, ref
    except (OSError, ValueError):
        return None


def _clear_refs(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("1")
        return True
    except OSError:
        return False


def sample_working_set(reset: bool = True, exclude_self: bool = True,
                       pids: list[int] | None = None) -> dict[str, Any]:
    """Referenced vs resident mapped memory since the last reset; then reset (mark) again.

    ``pids`` limits the walk to some processes (tests); by default every process counts.
    """
    now = time.monotonic()
    me = os.getpid()
    rss_kb = ref_kb = procs = 0
    for pid in pids if pids is not None else _pids():
        if exclude_self and pid == me:
            continue
        r = _rollup(pid)
        if r is None or r[0] == 0:
            continue
        rss_kb += r[0]
        ref_kb += r[1]
        procs += 1
        if reset:
            _clear_refs(pid)
    interval = now - _last_reset["t"] if _last_reset["t"] else None
    if reset:
        _last_reset["t"] = now
    mi = read_meminfo()
    total = mi.get("MemTotal", 0)
    return {
        "referenced_bytes": ref_kb * 1024,
        "resident_bytes": rss_kb * 1024,
        "mem_total_bytes": total,
        "processes": procs,
        "interval_s": interval,
        # f over the VM's memory (ESX's definition) and over resident mapped memory
        "active_fraction": (ref_kb * 1024 / total) if total else None,
        "active_fraction_of_resident": (ref_kb / rss_kb) if rss_kb else None,
    }


@op("memory.wss-sample")
def _wss(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return sample_working_set(reset=bool(args.get("reset", True)))


def _available() -> int:
    return read_meminfo().get("MemAvailable", 0)


def _free() -> int:
    return read_meminfo().get("MemFree", 0)


def reclaim_page_cache(nbytes: int) -> dict[str, Any]:
    """Free up to ``nbytes`` of clean page cache (memory.reclaim, else drop_caches).

    Reclaim on the root group reaches into every cgroup, so no-reclaim containers get their
    ``memory.min`` protection refreshed first (the containers part), and keep their pages.
    """
    try:
        from symbiont_agent import ops_containers

        protect = getattr(ops_containers, "refresh_protection", None)
        if protect is not None:
            protect()
    except ImportError:
        pass
    before = _free()
    method = "memory.reclaim"
    try:
        with open("/sys/fs/cgroup/memory.reclaim", "w") as fh:
            fh.write(str(nbytes))
    except OSError:
        # memory.reclaim returns EAGAIN when it could not reclaim all of it: that is fine.
        if not os.path.exists("/sys/fs/cgroup/memory.reclaim"):
            method = "drop_caches"
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("1")
    return {"method": method, "freed_bytes": max(0, _free() - before)}


@op("memory.balloon-prepare")
def _balloon_prepare(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The host is about to take ``release_mib``: free it in the guest's own order first."""
    mib = args.get("release_mib")
    if not isinstance(mib, int) or isinstance(mib, bool) or not 0 <= mib <= MAX_RELEASE_MIB:
        raise ValueError(f"release_mib must be an integer in 0..{MAX_RELEASE_MIB}")
    want = mib << 20
    steps = []
    free_before = _free()
    if want > 0:
        steps.append({"step": "page-cache", **reclaim_page_cache(want)})
        got = _free() - free_before
        if got < want:
            steps.append({"step": "containers", **_reclaim_containers(want - got)})
    return {
        "requested_bytes": want,
        "freed_bytes": max(0, _free() - free_before),
        "mem_available_bytes": _available(),
        "steps": steps,
    }


def _reclaim_containers(nbytes: int) -> dict[str, Any]:
    """Containers' memory by their shares, never no-reclaim ones (the containers part)."""
    try:
        from symbiont_agent import ops_containers
    except ImportError:
        return {"freed_bytes": 0, "skipped": "no containers part in this agent"}
    fn = getattr(ops_containers, "reclaim_by_shares", None)
    if fn is None:
        return {"freed_bytes": 0, "skipped": "containers part has no reclaim_by_shares"}
    return dict(fn(nbytes))
