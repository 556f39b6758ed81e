"""Synthetic KSM workloads: processes whose private anonymous buffers are ``MADV_MERGEABLE``.

Each worker maps ``pages`` private anonymous pages, marks them mergeable (``mmap.madvise``) and
fills them: the first ``shared_fraction`` of the pages with content common to all workers
(identical across workers, distinct within one), the rest with content of its own. So with ``P``
workers exactly ``(P - 1) * round(shared_fraction * pages)`` frames can be saved — the ground
truth the engine's estimate and KSM's merging are checked against. (Only *private* anonymous
memory is ever merged; shared anonymous memory is not.)

Used by the host tests and the policy experiment; needs no root to run, but reading the workers'
memory for the engine does (``/proc/PID/mem``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

from symbiont.dedup.backends import PAGE_SIZE
from symbiont.dedup.memsource import ProcessMemorySource
from symbiont.host.ksm import process_ksm_stat

_WORKER = r"""
import ctypes, json, mmap, os, sys
import numpy as np
npages, shared, common_seed, own_seed, zero = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
m = mmap.mmap(-1, npages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
m.madvise(mmap.MADV_MERGEABLE)
a = np.frombuffer(m, dtype=np.uint8).reshape(npages, 4096)
if shared:
    a[:shared] = np.random.default_rng(common_seed).integers(0, 256, size=(shared, 4096), dtype=np.uint8)
own = npages - shared - zero
if own > 0:
    a[shared:shared + own] = np.random.default_rng(own_seed).integers(0, 256, size=(own, 4096), dtype=np.uint8)
if zero:
    a[npages - zero:] = 0  # written, so resident: real zero pages, not the unmapped kind
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(json.dumps({"pid": os.getpid(), "addr": addr, "bytes": npages * 4096}), flush=True)
sys.stdin.read()
"""


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    pid: int
    addr: int
    nbytes: int


@dataclass
class MergeableWorkload:
    """``procs`` workers with ``pages`` mergeable pages each (a context manager)."""

    procs: int = 2
    pages: int = 2048
    shared_fraction: float = 0.9
    zero_pages: int = 0  # resident zero pages per worker (merged with each other unless use_zero_pages)
    seed: int = 1
    name: str = "proc"
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.procs < 1 or self.pages < 1 or not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError("procs >= 1, pages >= 1, 0 <= shared_fraction <= 1")
        if self.zero_pages + self.shared_pages > self.pages:
            raise ValueError("zero_pages + shared pages exceed pages")

    @property
    def shared_pages(self) -> int:
        return round(self.shared_fraction * self.pages)

    @property
    def expected_saveable(self) -> int:
        """Frames merging saves: the common pages of all but one worker, plus all zero pages but one."""
        zero = self.procs * self.zero_pages
        return (self.procs - 1) * self.shared_pages + max(zero - 1, 0)

    def start(self, timeout: float = 60.0) -> MergeableWorkload:
        try:
            for i in range(self.procs):
                p = subprocess.Popen(
                    [sys.executable, "-c", _WORKER, str(self.pages), str(self.shared_pages),
                     str(self.seed), str(self.seed * 1000 + i + 1), str(self.zero_pages)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                self.workers.append(Worker(p, p.pid, 0, 0))
            deadline = time.monotonic() + timeout
            for w in self.workers:
                assert w.proc.stdout is not None
                line = w.proc.stdout.readline()
                if not line or time.monotonic() > deadline:
                    raise RuntimeError(f"workload worker {w.pid} did not start (rc={w.proc.poll()})")
                info = json.loads(line)
                w.addr, w.nbytes = int(info["addr"]), int(info["bytes"])
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> MergeableWorkload:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def sources(self) -> list[ProcessMemorySource]:
        """The workers' buffers as engine sources (root)."""
        return [ProcessMemorySource(f"{self.name}{i}", w.pid, [(w.addr, w.addr + w.nbytes)])
                for i, w in enumerate(self.workers)]  # fmt: skip

    def merging_pages(self) -> int:
        """Sum of the workers' ``ksm_merging_pages`` (their pages mapped to a KSM page)."""
        total = 0
        for w in self.workers:
            st = process_ksm_stat(w.pid) or {}
            total += int(st.get("ksm_merging_pages", 0))
        return total

    def saved_pages(self) -> int:
        """Frames saved among the workers, assuming their merged pages share frames only with each
        other: merged pages minus one kept frame per distinct merged content (common pages: one
        frame per content shared by all workers)."""
        merging = self.merging_pages()
        # Common content merges P pages onto 1 frame: saved = merging * (P-1)/P for those pages.
        return int(round(merging * (self.procs - 1) / self.procs)) if self.procs > 1 else 0

    def stop(self) -> None:
        for w in self.workers:
            try:
                if w.proc.stdin is not None:
                    w.proc.stdin.close()
            except OSError:
                pass
        for w in self.workers:
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            if w.proc.stdout is not None:
                w.proc.stdout.close()
        self.workers = []


__all__ = ["PAGE_SIZE", "MergeableWorkload"]
