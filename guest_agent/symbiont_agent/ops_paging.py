"""Host paging, the guest's side: which guest-physical pages are cold (the guest decides *what*).

The host pages out ranges of the QEMU process's guest-RAM mapping; a guest-physical frame
number (PFN) is an offset into that mapping. ``/proc/kpageflags`` (root) has one 64-bit
flag word per PFN, so the guest can name its own cold frames without any host help:

* ``free``: a free buddy block (``BUDDY`` marks its first page; the flag-less pages after
  it belong to the block) and ballooned pages (``OFFLINE``): the guest uses none of them;
* ``cold``: pages on an *inactive* LRU list that were not referenced since the kernel last
  looked (clean page cache first in the guest's own reclaim order, then anonymous memory).

Everything else (active LRU pages, slab, page tables, kernel text) is left to the host's
"how much" alone. Hints only: paging out a guest page is always correct (the host swaps it
back on access), only the cost differs.
"""

from __future__ import annotations

import array
import os
from typing import Any

from symbiont_agent.agent import op

KPF_LOCKED, KPF_REFERENCED, KPF_LRU, KPF_ACTIVE, KPF_SLAB = 0, 2, 5, 6, 7
KPF_BUDDY, KPF_ANON, KPF_UNEVICTABLE, KPF_NOPAGE, KPF_OFFLINE, KPF_PGTABLE = 10, 12, 18, 20, 23, 26
MAX_RUNS = 4096  # per class: the answer stays far below the protocol's 1 MiB
_CHUNK = 1 << 15  # PFNs per read (256 KiB)


def classify(flags: array.array, base: int = 0, state: dict[str, Any] | None = None) -> tuple[list, list]:
    """(free, cold) runs ``[[first_pfn, count], ...]`` of one block of flag words (pure)."""
    st = state if state is not None else {"in_free": False}
    free: list[list[int]] = []
    cold: list[list[int]] = []
    buddy, lru, active, ref = 1 << KPF_BUDDY, 1 << KPF_LRU, 1 << KPF_ACTIVE, 1 << KPF_REFERENCED
    pinned = (1 << KPF_UNEVICTABLE) | (1 << KPF_LOCKED)
    offline = 1 << KPF_OFFLINE
    for i, f in enumerate(flags):
        pfn = base + i
        if f & (buddy | offline) or (st["in_free"] and f == 0):
            st["in_free"] = True
            _add(free, pfn)
            continue
        st["in_free"] = False
        if f & lru and not f & (active | ref | pinned):
            _add(cold, pfn)
    return free, cold


def _add(runs: list[list[int]], pfn: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == pfn:
        runs[-1][1] += 1
    else:
        runs.append([pfn, 1])


def _merge(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    if a and b and a[-1][0] + a[-1][1] == b[0][0]:
        a[-1][1] += b[0][1]
        b = b[1:]
    a.extend(b)
    return a


def _bound(runs: list[list[int]]) -> tuple[list[list[int]], bool]:
    """At most MAX_RUNS runs: the largest, in address order."""
    if len(runs) <= MAX_RUNS:
        return runs, False
    keep = sorted(sorted(runs, key=lambda r: -r[1])[:MAX_RUNS])
    return keep, True


def cold_pages(path: str = "/proc/kpageflags", max_pfn: int | None = None) -> dict[str, Any]:
    free: list[list[int]] = []
    cold: list[list[int]] = []
    state = {"in_free": False}
    pfn = 0
    with open(path, "rb") as fh:
        while max_pfn is None or pfn < max_pfn:
            data = fh.read(8 * _CHUNK)
            if not data:
                break
            words = array.array("Q")
            words.frombytes(data[: len(data) // 8 * 8])
            f, c = classify(words, pfn, state)
            _merge(free, f)
            _merge(cold, c)
            pfn += len(words)
    free, ft = _bound(free)
    cold, ct = _bound(cold)
    return {"page_size": os.sysconf("SC_PAGE_SIZE"), "pfns": pfn, "free": free, "cold": cold, "truncated": ft or ct,
            "free_pages": sum(n for _, n in free), "cold_pages": sum(n for _, n in cold)}


@op("paging.cold")
def _paging_cold(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Runs of free and cold guest-physical frames, for the host's page-out."""
    return cold_pages()
