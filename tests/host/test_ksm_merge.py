"""Real KSM on this host: two processes' identical MADV_MERGEABLE pages really get merged, the
controller and the engine read the counts, and every knob turned is put back."""

from __future__ import annotations

import ctypes
import mmap
import os
import time

import numpy as np
import pytest

from symbiont.dedup.engine import Engine
from symbiont.dedup.ksm_controller import KsmController, MemoryKnobStore
from symbiont.dedup.memsource import host_mergeable_pages, mergeable_mappings, read_smaps
from symbiont.dedup.policy import KsmSettings
from symbiont.dedup.workload import MergeableWorkload
from symbiont.host.ksm import PAGE_SIZE, Ksm, KsmdCpu, mergeable_processes, process_ksm_stat

pytestmark = [pytest.mark.root]


@pytest.fixture
def ksm_ctl(as_root: None):
    k = Ksm()
    k.require()
    before = k.settings()
    ctl = KsmController(k, MemoryKnobStore(), unmerge_on_restore=True)
    ctl.set("run", 0)  # nothing merges before the test says so (restored afterwards)
    yield ctl
    ctl.restore()
    assert k.settings() == before  # every knob the test turned is back


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def test_ksm_merges_identical_pages_of_two_processes(ksm_ctl: KsmController) -> None:
    # fresh content each run, so that no KSM page left from an earlier run matches it
    with MergeableWorkload(procs=2, pages=2000, shared_fraction=0.5, seed=int(time.time()) % 10_000) as w:
        # the engine reads both processes' memory (/proc/PID/mem) and predicts exactly this
        srcs = w.sources()
        rep = Engine().scan(srcs)
        assert rep.saveable == w.expected_saveable == 1000
        assert rep.cross_saveable == 1000 and rep.remaining == 1000  # nothing merged yet
        for pid in w.pids:
            assert (process_ksm_stat(pid) or {}).get("ksm_merging_pages", 0) == 0
            assert any(m.size == 2000 * PAGE_SIZE for m in mergeable_mappings(pid))
        assert set(w.pids) <= set(mergeable_processes())
        assert host_mergeable_pages() >= 4000
        cpu = KsmdCpu()
        c0 = cpu.seconds()
        ksm_ctl.apply(KsmSettings(1, 4000, 10))
        _wait(lambda: all((process_ksm_stat(p) or {}).get("ksm_merging_pages") == 1000 for p in w.pids), 30,
              "1000 merged pages in each worker")  # fmt: skip
        sample = ksm_ctl.sample()
        assert sample.stats.pages_shared >= 1000 and sample.stats.pages_sharing >= 1000
        assert sample.stats.full_scans >= 1 and sample.settings["run"] == 1
        assert sample.ksmd_cpu_s is not None and c0 is not None and sample.ksmd_cpu_s >= c0
        assert w.merging_pages() == 2000 and w.saved_pages() == 1000
        # the engine now sees the shared frames: nothing remains to merge
        rep2 = Engine().scan(srcs)
        assert rep2.saveable == 1000 and rep2.remaining == 0
        assert [s.merged_pages for s in rep2.sources] == [1000, 1000]
        for s in srcs:
            s.close()


def mergeable_at(addr: int) -> bool | None:
    """The mg flag of the mapping of this process that contains ``addr``."""
    for m in read_smaps(os.getpid()):
        if m.start <= addr < m.end:
            return m.mergeable
    return None


def test_only_madvised_private_memory_is_mergeable(as_root: None) -> None:
    """What tenant boundaries rest on: KSM may merge a mapping only with the mg VmFlag."""
    n = 16
    plain = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    marked = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    marked.madvise(mmap.MADV_MERGEABLE)
    try:
        a_plain = ctypes.addressof(ctypes.c_char.from_buffer(plain))
        a_marked = ctypes.addressof(ctypes.c_char.from_buffer(marked))
        assert mergeable_at(a_marked) is True and mergeable_at(a_plain) is False
        marked.madvise(mmap.MADV_UNMERGEABLE)  # only the owner can take it back
        # (the kernel may now merge the mapping with its identical neighbour: look it up by
        # the address it contains, not by its start)
        assert mergeable_at(a_marked) is False
    finally:
        plain.close()
        marked.close()


def test_zero_pages_merge_into_the_kernel_zero_page_with_use_zero_pages(ksm_ctl: KsmController) -> None:
    with MergeableWorkload(procs=1, pages=600, shared_fraction=0.0, zero_pages=500, seed=3) as w:
        srcs = w.sources()
        rep = Engine().scan(srcs)
        assert rep.zero_pages == 500 and rep.saveable == 499
        ksm_ctl.set("use_zero_pages", 1)
        ksm_ctl.apply(KsmSettings(1, 2000, 10))
        st = _wait(lambda: (s := process_ksm_stat(w.pids[0]) or {}).get("ksm_zero_pages", 0) >= 500 and s, 30,
                   "500 zero pages merged into the zero page")  # fmt: skip
        assert st["ksm_zero_pages"] == 500
        z = np.asarray(srcs[0].read(np.arange(550, 600)))
        assert not z.any()  # still zeros to the reader
        for s in srcs:
            s.close()
