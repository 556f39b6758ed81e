"""The page-hashing engine: sharing potential per VM and across VMs, and candidate regions.

The pipeline is Catalyst's (seeds/000) and ESX's content-based sharing (seeds/002):

1. **hash** every page of every source in large batches on a :class:`~.backends.HashBackend`;
2. **sort** all hashes together and cut the sorted array into runs of equal hashes; a run of two
   or more pages is a *candidate group* (ESX's "hint" match);
3. **confirm** every candidate byte by byte: the pages are read again, re-hashed (a page whose
   hash changed since step 1 is *volatile*, like KSM's ``pages_volatile``, and dropped), and
   compared with the group's first page; pages that differ from it (hash collisions) are
   partitioned exactly by sorting their raw bytes. Only byte-identical pages form a *class*;
4. **report**: a class of ``n`` pages saves ``n - 1`` frames once merged. The report splits this
   into what is saveable inside each VM and what only cross-VM merging gives, attributes it to
   VMs, tells how much is already merged (sources that know their frame numbers), and lists the
   largest runs of adjacent duplicate pages (*candidate regions*: the hints).

A *source* is anything with pages: a VM's guest RAM read through ``/proc/PID/mem``
(:mod:`symbiont.dedup.memsource`) or a buffer (tests, benchmarks).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from symbiont.dedup.backends import PAGE_SIZE, CpuBackend, HashBackend, HashFn, as_pages

_VOID = np.dtype((np.void, PAGE_SIZE))


class EngineError(Exception):
    """A source cannot be read (process gone, permission) or the input is malformed."""


# -- sources ------------------------------------------------------------------------------------
class PageSource(ABC):
    """Pages of one VM (or process, or buffer), numbered ``0 .. npages-1`` in address order."""

    name: str

    @property
    @abstractmethod
    def npages(self) -> int: ...

    @abstractmethod
    def addresses(self) -> np.ndarray:
        """uint64 address of every page (ascending; gaps where non-resident pages were skipped)."""

    def pfns(self) -> np.ndarray | None:
        """Host frame number of every page (0 = unknown), or ``None`` if the source cannot tell."""
        return None

    @abstractmethod
    def batches(self, batch_pages: int) -> Iterator[np.ndarray]:
        """Successive ``(k, 4096)`` uint8 arrays covering all pages in order (may reuse one buffer)."""

    @abstractmethod
    def read(self, indices: np.ndarray) -> np.ndarray:
        """The current contents of the given pages as a new ``(len, 4096)`` uint8 array."""

    def refresh(self) -> None:  # noqa: B027 (optional hook)
        """Re-read what may have changed since the last scan (resident pages, frame numbers)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass


class BufferSource(PageSource):
    """Pages held in memory (a synthetic memory image, or a snapshot)."""

    def __init__(
        self, name: str, data: np.ndarray | bytes | bytearray | memoryview, base_addr: int = 0,
        pfns: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.pages = as_pages(data)
        self.base_addr = base_addr
        self._pfns = None if pfns is None else np.asarray(pfns, dtype=np.uint64)
        if self._pfns is not None and self._pfns.shape != (self.pages.shape[0],):
            raise EngineError(f"{name}: pfns must have one entry per page")

    @property
    def npages(self) -> int:
        return int(self.pages.shape[0])

    def addresses(self) -> np.ndarray:
        return self.base_addr + np.arange(self.npages, dtype=np.uint64) * np.uint64(PAGE_SIZE)

    def pfns(self) -> np.ndarray | None:
        return self._pfns

    def batches(self, batch_pages: int) -> Iterator[np.ndarray]:
        for i in range(0, self.npages, batch_pages):
            yield self.pages[i : i + batch_pages]

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.pages[np.asarray(indices, dtype=np.int64)]


# -- the report -----------------------------------------------------------------------------------
@dataclass
class SourceReport:
    name: str
    pages: int
    dup_pages: int = 0  # pages with at least one identical page anywhere in the scan
    intra_saveable: int = 0  # frames merging inside this source alone would free
    cross_pages: int = 0  # pages whose content also exists in another source
    attributed_saveable: float = 0.0  # this source's share of all frames saveable (sums to the total)
    zero_pages: int = 0  # pages of the all-zero class
    volatile_pages: int = 0
    merged_pages: int | None = None  # pages already mapped to a frame another page maps too
    regions: int = 0  # runs of adjacent duplicate pages

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "pages": self.pages, "bytes": self.pages * PAGE_SIZE,
            "dup_pages": self.dup_pages, "intra_saveable_pages": self.intra_saveable,
            "cross_pages": self.cross_pages, "attributed_saveable_pages": round(self.attributed_saveable, 3),
            "potential_bytes": int(round(self.attributed_saveable * PAGE_SIZE)),
            "zero_pages": self.zero_pages, "volatile_pages": self.volatile_pages,
            "merged_pages": self.merged_pages, "regions": self.regions,
        }  # fmt: skip


@dataclass
class ScanReport:
    """What a scan found. Counts are pages of 4 KiB; the arrays keep every confirmed duplicate."""

    sources: list[SourceReport]
    backend: dict[str, Any]
    pages: int = 0
    saveable: int = 0  # sum over classes of (size - 1): frames freed by merging everything
    intra_saveable: int = 0
    cross_saveable: int = 0
    zero_pages: int = 0
    classes: int = 0
    candidate_groups: int = 0  # runs of equal hashes (>= 2 pages)
    candidate_pages: int = 0
    collision_groups: int = 0  # candidate groups that were not one single content
    false_candidates: int = 0  # candidate pages the byte compare rejected (not volatile)
    volatile_pages: int = 0
    remaining: int | None = None  # frames still saveable given current frame numbers (None: unknown)
    regions: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # per confirmed duplicate page: source number, page index in the source, class id
    dup_src: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    dup_idx: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    dup_class: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    zero_classes: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # host frame of each duplicate page (negative: unknown), when every source knows its frames
    dup_pfn: np.ndarray | None = None
    started_at: float = 0.0
    # saveable_for / remaining_for by their arguments: the hint policy asks every period of a
    # report that changes only with the next scan (np.unique over every duplicate: ~0.1 s a call
    # with 24 VMs, on the event loop). Valid for the arrays it was computed from (they are set
    # after construction): another array object clears it.
    _memo: dict[tuple[Any, ...], int | None] = field(default_factory=dict, repr=False, compare=False)
    _memo_of: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def _memoized(self, key: tuple[Any, ...], fn: Callable[[], int | None]) -> int | None:
        of = (self.dup_src, self.dup_class, self.dup_pfn, self.zero_classes, len(self.sources))
        if len(self._memo_of) != len(of) or any(a is not b for a, b in zip(of[:4], self._memo_of[:4], strict=True)) \
                or of[4] != self._memo_of[4]:
            self._memo.clear()
            self._memo_of = of
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source(self, name: str) -> SourceReport:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def saveable_for(self, names: Iterable[str], exclude_zero: bool = False) -> int:
        """Frames saveable if only the given sources were merged (e.g. 1..N VMs; tenant opt-outs)."""
        wanted = {n for n in names}
        return int(self._memoized(("saveable", frozenset(wanted), exclude_zero),
                                  lambda: self._saveable_for(wanted, exclude_zero)) or 0)

    def _saveable_for(self, wanted: set[str], exclude_zero: bool) -> int:
        ids = [i for i, s in enumerate(self.sources) if s.name in wanted]
        if not ids or self.dup_class.size == 0:
            return 0
        sel = np.isin(self.dup_src, ids)
        if exclude_zero and self.zero_classes.size:
            sel &= ~np.isin(self.dup_class, self.zero_classes)
        cls = self.dup_class[sel]
        if cls.size == 0:
            return 0
        _, counts = np.unique(cls, return_counts=True)
        return int((counts - 1).sum())

    def remaining_for(self, names: Iterable[str]) -> int | None:
        """Frames still saveable among the given sources, given which pages already share a frame
        (``None`` when the sources do not know their frame numbers)."""
        wanted = set(names)
        return self._memoized(("remaining", frozenset(wanted)), lambda: self._remaining_for(wanted))

    def _remaining_for(self, wanted: set[str]) -> int | None:
        if self.dup_pfn is None:
            return None
        ids = [i for i, s in enumerate(self.sources) if s.name in wanted]
        sel = np.isin(self.dup_src, ids)
        if not sel.any():
            return 0
        key = np.stack([self.dup_class[sel], self.dup_pfn[sel]], axis=1)
        ukey = np.unique(key, axis=0)
        frames = np.bincount(ukey[:, 0])
        return int((frames[frames > 0] - 1).sum())

    def subset(self, names: Iterable[str]) -> dict[str, Any]:
        """Pages, saveable, already saved and remaining frames if only ``names`` were merged."""
        names = list(names)
        wanted = set(names)
        pages = sum(s.pages for s in self.sources if s.name in wanted)
        saveable = self.saveable_for(names)
        remaining = self.remaining_for(names)
        merged: int | None = None
        if self.dup_pfn is not None:
            ids = [i for i, s in enumerate(self.sources) if s.name in wanted]
            sel = np.isin(self.dup_src, ids)
            merged = 0
            if sel.any():
                key = np.stack([self.dup_class[sel], self.dup_pfn[sel]], axis=1)
                _, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
                merged = int((cnt[inv.ravel()] >= 2).sum())
        return {
            "sources": names, "pages": pages, "saveable_pages": saveable,
            "saveable_no_zero_pages": self.saveable_for(names, exclude_zero=True),
            "remaining_pages": remaining, "saved_pages": None if remaining is None else saveable - remaining,
            "merged_pages": merged,
        }  # fmt: skip

    def classes_of(self, name: str) -> dict[int, int]:
        """class id → pages of source ``name`` in it (for tests and tools)."""
        i = self.names.index(name)
        cls = self.dup_class[self.dup_src == i]
        u, c = np.unique(cls, return_counts=True)
        return {int(a): int(b) for a, b in zip(u, c, strict=True)}

    def as_dict(self, regions: int | None = None) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "pages": self.pages, "bytes": self.pages * PAGE_SIZE,
            "saveable_pages": self.saveable, "saveable_bytes": self.saveable * PAGE_SIZE,
            "saveable_fraction": round(self.saveable / self.pages, 6) if self.pages else 0.0,
            "intra_saveable_pages": self.intra_saveable, "cross_saveable_pages": self.cross_saveable,
            "zero_pages": self.zero_pages, "classes": self.classes,
            "candidate_groups": self.candidate_groups, "candidate_pages": self.candidate_pages,
            "collision_groups": self.collision_groups, "false_candidates": self.false_candidates,
            "volatile_pages": self.volatile_pages, "remaining_pages": self.remaining,
            "sources": [s.as_dict() for s in self.sources],
            "regions": self.regions if regions is None else self.regions[:regions],
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "backend": self.backend,
        }  # fmt: skip


# -- the engine -----------------------------------------------------------------------------------
class Engine:
    """Hash, sort, confirm, report. ``hash_fn`` replaces the backend's hash (tests force collisions
    with a deliberately weak one); sorting always runs on the backend."""

    def __init__(
        self,
        backend: HashBackend | None = None,
        hash_fn: HashFn | None = None,
        batch_pages: int = 8192,
        confirm_pages: int = 8192,
        top_regions: int = 32,
    ) -> None:
        if batch_pages < 1 or confirm_pages < 2:
            raise ValueError("batch_pages must be >= 1 and confirm_pages >= 2")
        self.backend = backend or CpuBackend()
        self.hash_fn = hash_fn
        self.batch_pages = batch_pages
        self.confirm_pages = confirm_pages
        self.top_regions = top_regions

    def _hash(self, pages: np.ndarray) -> np.ndarray:
        if self.hash_fn is not None:
            h = np.asarray(self.hash_fn(pages), dtype=np.uint64)
            if h.shape != (pages.shape[0],):
                raise EngineError("hash_fn must return one uint64 per page")
            return h
        return self.backend.hash_pages(pages)

    # -- 1. hash ---------------------------------------------------------------------------
    def scan(self, sources: Sequence[PageSource]) -> ScanReport:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise EngineError(f"source names must be unique: {names}")
        started = time.time()
        t_read = t_hash = 0.0
        per_src: list[np.ndarray] = []
        for s in sources:
            s.refresh()
        for s in sources:
            hs = np.empty(s.npages, dtype=np.uint64)
            pos = 0
            it = iter(s.batches(self.batch_pages))
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                k = batch.shape[0]
                hs[pos : pos + k] = self._hash(batch)
                t_read += t1 - t0
                t_hash += time.perf_counter() - t1
                pos += k
            if pos != s.npages:
                raise EngineError(f"{s.name}: source yielded {pos} pages, expected {s.npages}")
            per_src.append(hs)
        sizes = np.array([s.npages for s in sources], dtype=np.int64)
        H = np.concatenate(per_src) if per_src else np.empty(0, np.uint64)
        src = np.repeat(np.arange(len(sources), dtype=np.int32), sizes)
        idx = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if len(sizes) else np.empty(0, np.int64)
        n = int(H.shape[0])

        # -- 2. sort and cut into runs of equal hashes --------------------------------------
        t0 = time.perf_counter()
        if n:
            order = self.backend.argsort(H)
            Hs = H[order]
            brk = np.flatnonzero(Hs[1:] != Hs[:-1]) + 1
            starts = np.concatenate(([0], brk)).astype(np.int64)
            lens = np.diff(np.concatenate((starts, [n])))
        else:
            order = np.empty(0, np.int64)
            starts = lens = np.empty(0, np.int64)
        cand = lens >= 2
        c_starts, c_lens = starts[cand], lens[cand]
        t_sort = time.perf_counter() - t0

        # -- 3. confirm byte by byte ---------------------------------------------------------
        t0 = time.perf_counter()
        conf = _Confirm(self, sources, H, src, idx)
        conf.run(order, c_starts, c_lens)
        t_confirm = time.perf_counter() - t0

        # -- 4. report ---------------------------------------------------------------------
        t0 = time.perf_counter()
        rep = _build_report(sources, src, idx, conf, int(c_lens.size), int(c_lens.sum()), self.top_regions)
        rep.pages = n
        rep.started_at = started
        rep.backend = self.backend.describe() | ({"hash": "custom"} if self.hash_fn is not None else {})
        rep.timings = {
            "read_s": t_read, "hash_s": t_hash, "sort_s": t_sort, "confirm_s": t_confirm,
            "report_s": time.perf_counter() - t0, "total_s": time.time() - started,
            "device_s": self.backend.stats.device_s,
        }  # fmt: skip
        return rep


class _Confirm:
    """Step 3: turns candidate hash runs into exact content classes (``cls`` per global page)."""

    def __init__(self, eng: Engine, sources: Sequence[PageSource], H: np.ndarray, src: np.ndarray,
                 idx: np.ndarray) -> None:  # fmt: skip
        self.eng = eng
        self.sources = sources
        self.H, self.src, self.idx = H, src, idx
        self.cls = np.full(H.shape[0], -1, dtype=np.int64)
        self.volatile = np.zeros(H.shape[0], dtype=bool)
        self.next_class = 0
        self.zero_classes: list[int] = []
        self.collision_groups = 0

    def read(self, g: np.ndarray) -> np.ndarray:
        s_of = self.src[g]
        if s_of.shape[0] and (s_of == s_of[0]).all():
            return self.sources[int(s_of[0])].read(self.idx[g])
        out = np.empty((g.shape[0], PAGE_SIZE), dtype=np.uint8)
        for s in np.unique(s_of):
            sel = np.flatnonzero(s_of == s)
            out[sel] = self.sources[int(s)].read(self.idx[g[sel]])
        return out

    def _new_class(self, members: np.ndarray, page: np.ndarray) -> None:
        c = self.next_class
        self.next_class += 1
        self.cls[members] = c
        if not page.any():
            self.zero_classes.append(c)

    def run(self, order: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> None:
        limit = self.eng.confirm_pages
        if starts.shape[0] == 0:
            return
        # Confirm runs in address order of their first page (not hash order): duplicates cluster
        # in regions, so a chunk then reads long runs of adjacent pages instead of scattered ones.
        by_addr = np.argsort(order[starts], kind="stable")
        starts, lens = starts[by_addr], lens[by_addr]
        # members of all candidate runs, run after run, and where each run starts among them
        offs = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        total = int(lens.sum())
        members = order[np.repeat(starts, lens) + (np.arange(total, dtype=np.int64) - np.repeat(offs, lens))]
        big = np.flatnonzero(lens > limit)
        for r in big:
            self._big_run(members[offs[r] : offs[r] + lens[r]])
        small = np.flatnonzero(lens <= limit)
        if small.shape[0] == 0:
            return
        # greedy chunks of consecutive small runs holding at most ``limit`` pages
        sl = lens[small]
        csum = np.cumsum(sl)
        i = 0
        while i < small.shape[0]:
            base = csum[i] - sl[i]
            j = int(np.searchsorted(csum, base + limit, side="right"))
            j = max(j, i + 1)
            runs = small[i:j]
            if runs.shape[0] and runs[-1] - runs[0] + 1 == runs.shape[0]:
                G = members[offs[runs[0]] : offs[runs[-1]] + lens[runs[-1]]]
            else:
                G = np.concatenate([members[offs[r] : offs[r] + lens[r]] for r in runs])
            self._chunk(G, lens[runs])
            i = j

    def _chunk(self, G: np.ndarray, lens: np.ndarray) -> None:
        """Whole runs that fit one read: vectorised compare of every member with its run's leader."""
        m = G.shape[0]
        offs = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        P = self.read(G)
        ok = self.eng._hash(P) == self.H[G]
        self.volatile[G[~ok]] = True
        pos = np.where(ok, np.arange(m), m)
        leader = np.minimum.reduceat(pos, offs)  # first non-volatile member of each run
        lead_of = np.repeat(leader, lens)
        valid = ok & (lead_of < m)
        eq = np.zeros(m, dtype=bool)
        W = P.view(np.uint64)
        if valid.all():
            eq = (W == W[lead_of]).all(axis=1)
        elif valid.any():
            v = np.flatnonzero(valid)
            eq[v] = (W[v] == W[lead_of[v]]).all(axis=1)
        n_eq = np.add.reduceat(eq.astype(np.int64), offs)
        n_ok = np.add.reduceat(ok.astype(np.int64), offs)
        run_of = np.repeat(np.arange(lens.shape[0]), lens)
        # Runs whose leader has at least one identical page become classes, numbered in run order.
        qual = n_eq >= 2
        nq = int(qual.sum())
        if nq:
            cid = np.full(lens.shape[0], -1, dtype=np.int64)
            cid[qual] = self.next_class + np.arange(nq)
            sel = eq & qual[run_of]
            self.cls[G[sel]] = cid[run_of[sel]]
            zero = ~P[leader[qual]].any(axis=1)
            self.zero_classes.extend(int(c) for c in cid[qual][zero])
            self.next_class += nq
        # Hash collisions: runs with pages that differ from their leader (rare with xsm64).
        rest = ok & ~eq
        for r in np.flatnonzero(n_ok > n_eq):
            self.collision_groups += 1
            mem = np.flatnonzero(rest & (run_of == r))
            if mem.shape[0] >= 2:
                self._partition(G[mem], P[mem])

    def _partition(self, g: np.ndarray, pages: np.ndarray) -> None:
        """Exact classes of ``pages`` by sorting their raw bytes (memcmp order)."""
        keys = np.ascontiguousarray(pages).view(_VOID).ravel()
        _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        for u in np.flatnonzero(counts >= 2):
            mem = np.flatnonzero(inv == u)
            self._new_class(g[mem], pages[mem[0]])

    def _big_run(self, run: np.ndarray) -> None:
        """A run larger than one read (e.g. thousands of zero pages): stream it against a leader;
        what differs is streamed again against a new leader, until nothing is left."""
        limit = self.eng.confirm_pages
        pending = run
        first = True
        while pending.shape[0] >= 2:
            if pending.shape[0] <= limit:
                P = self.read(pending)
                ok = self.eng._hash(P) == self.H[pending]
                self.volatile[pending[~ok]] = True
                if ok.sum() >= 2:
                    self._partition(pending[ok], P[ok])
                return
            leader_page: np.ndarray | None = None
            members: list[np.ndarray] = []
            rest: list[np.ndarray] = []
            for a in range(0, pending.shape[0], limit):
                g = pending[a : a + limit]
                P = self.read(g)
                ok = self.eng._hash(P) == self.H[g]
                self.volatile[g[~ok]] = True
                if leader_page is None and ok.any():
                    leader_page = P[int(np.flatnonzero(ok)[0])].copy()
                if leader_page is None:
                    continue
                eq = ok & (P.view(np.uint64) == leader_page.view(np.uint64)).all(axis=1)
                members.append(g[eq])
                rest.append(g[ok & ~eq])
            mem = np.concatenate(members) if members else np.empty(0, np.int64)
            if leader_page is not None and mem.shape[0] >= 2:
                self._new_class(mem, leader_page)
            pending = np.concatenate(rest) if rest else np.empty(0, np.int64)
            if first and pending.shape[0]:
                self.collision_groups += 1
            first = False


def _build_report(
    sources: Sequence[PageSource], src: np.ndarray, idx: np.ndarray, conf: _Confirm,
    candidate_groups: int, candidate_pages: int, top_regions: int,
) -> ScanReport:  # fmt: skip
    nsrc = len(sources)
    reports = [SourceReport(s.name, s.npages) for s in sources]
    dup_g = np.flatnonzero(conf.cls >= 0)
    d_cls = conf.cls[dup_g]
    d_src = src[dup_g]
    d_idx = idx[dup_g]
    zero_classes = np.array(sorted(conf.zero_classes), dtype=np.int64)
    rep = ScanReport(sources=reports, backend={})
    rep.classes = conf.next_class
    rep.candidate_groups = candidate_groups
    rep.candidate_pages = candidate_pages
    rep.collision_groups = conf.collision_groups
    rep.volatile_pages = int(conf.volatile.sum())
    rep.false_candidates = candidate_pages - int(dup_g.shape[0]) - rep.volatile_pages
    rep.dup_src, rep.dup_idx, rep.dup_class, rep.zero_classes = d_src, d_idx, d_cls, zero_classes
    vol_per_src = np.bincount(src[conf.volatile], minlength=nsrc) if nsrc else np.empty(0, np.int64)
    for i, r in enumerate(reports):
        r.volatile_pages = int(vol_per_src[i])
    if dup_g.shape[0] == 0:
        rep.regions = []
        rep.remaining = 0 if all(s.pfns() is not None for s in sources) else None
        if rep.remaining is not None:
            rep.dup_pfn = np.empty(0, np.int64)
            for r in reports:
                r.merged_pages = 0
        return rep
    class_size = np.bincount(d_cls, minlength=conf.next_class)
    rep.saveable = int(dup_g.shape[0] - conf.next_class)
    is_zero = np.zeros(conf.next_class, dtype=bool)
    is_zero[zero_classes] = True
    rep.zero_pages = int(class_size[is_zero].sum())
    # (class, source) pair counts
    pair = d_cls * nsrc + d_src
    upair, n_cv = np.unique(pair, return_counts=True)
    p_cls, p_src = upair // nsrc, (upair % nsrc).astype(np.int64)
    srcs_per_class = np.bincount(p_cls, minlength=conf.next_class)
    cross = srcs_per_class[p_cls] >= 2
    frac = (class_size[p_cls] - 1) / class_size[p_cls]
    intra = np.maximum(n_cv - 1, 0)
    for i, r in enumerate(reports):
        sel = p_src == i
        r.dup_pages = int(n_cv[sel].sum())
        r.intra_saveable = int(intra[sel].sum())
        r.cross_pages = int(n_cv[sel & cross].sum())
        r.attributed_saveable = float((n_cv[sel] * frac[sel]).sum())
        r.zero_pages = int(n_cv[sel & is_zero[p_cls]].sum())
    rep.intra_saveable = sum(r.intra_saveable for r in reports)
    rep.cross_saveable = rep.saveable - rep.intra_saveable
    # Already merged: pages of a class that share a host frame (needs frame numbers).
    pfn_arrays = [s.pfns() for s in sources]
    if all(p is not None for p in pfn_arrays):
        pf = np.empty(dup_g.shape[0], dtype=np.int64)
        for i, p in enumerate(pfn_arrays):
            sel = d_src == i
            pf[sel] = np.asarray(p, dtype=np.int64)[d_idx[sel]]
        unknown = pf <= 0
        pf[unknown] = -(np.arange(int(unknown.sum()), dtype=np.int64) + 1)  # unknown frames are distinct
        key = np.stack([d_cls, pf], axis=1)
        ukey, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        frames_per_class = np.bincount(ukey[:, 0], minlength=conf.next_class)
        rep.remaining = int((frames_per_class[frames_per_class > 0] - 1).sum())
        rep.dup_pfn = pf
        shared = cnt[inv.ravel()] >= 2
        for i, r in enumerate(reports):
            r.merged_pages = int((shared & (d_src == i)).sum())
    # Candidate regions: runs of adjacent duplicate pages, per source.
    regions: list[dict[str, Any]] = []
    zero_member = is_zero[d_cls]
    cross_member = (srcs_per_class[d_cls] >= 2)
    for i, s in enumerate(sources):
        sel = np.flatnonzero(d_src == i)
        if sel.shape[0] == 0:
            continue
        o = sel[np.argsort(d_idx[sel], kind="stable")]
        addr = s.addresses()[d_idx[o]].astype(np.uint64)
        brk = np.flatnonzero(np.diff(addr) != PAGE_SIZE) + 1
        r_start = np.concatenate(([0], brk))
        r_len = np.diff(np.concatenate((r_start, [o.shape[0]])))
        reports[i].regions = int(r_start.shape[0])
        cz = np.add.reduceat(zero_member[o].astype(np.int64), r_start)
        cc = np.add.reduceat(cross_member[o].astype(np.int64), r_start)
        top = np.argsort(-r_len, kind="stable")[:top_regions]
        for t in top:
            regions.append({
                "source": s.name, "start": f"0x{int(addr[r_start[t]]):x}", "pages": int(r_len[t]),
                "bytes": int(r_len[t]) * PAGE_SIZE, "zero_pages": int(cz[t]), "cross_pages": int(cc[t]),
            })  # fmt: skip
    regions.sort(key=lambda d: (-d["pages"], d["source"], d["start"]))
    rep.regions = regions[:top_regions]
    return rep


def scan_buffers(buffers: dict[str, Any], backend: HashBackend | None = None, **kw: Any) -> ScanReport:
    """Convenience: scan named in-memory images."""
    return Engine(backend, **kw).scan([BufferSource(k, v) for k, v in buffers.items()])


__all__ = ["BufferSource", "Engine", "EngineError", "PageSource", "ScanReport", "SourceReport", "scan_buffers"]
