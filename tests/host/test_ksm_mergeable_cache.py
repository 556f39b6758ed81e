"""H8's cache in ``host_mergeable_pages`` on a real process: a process's mergeable-page figure
is reused while its statm RSS stands (a paused, parked VM) and read again from smaps once its
RSS moves. No KSM setting is read or changed: MADV_MERGEABLE marks mappings whether ksmd runs
or not, and the pages are random, so nothing here could merge."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from symbiont.host.ksm import PAGE_SIZE
from symbiont.host.procmem import MERGEABLE_CACHE_S, _statm_resident, host_mergeable_pages, read_smaps

pytestmark = [pytest.mark.root]

A, B, D = 2048, 2048, 1024  # pages: mergeable from the start / made mergeable later / added later

CHILD = textwrap.dedent(f"""
    import mmap, os, sys
    def anon(pages):
        m = mmap.mmap(-1, pages * {PAGE_SIZE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        return m
    def fill(m):
        for off in range(0, len(m), 1 << 20):
            m[off:off + (1 << 20)] = os.urandom(min(1 << 20, len(m) - off))
    a, b = anon({A}), anon({B})
    a.madvise(mmap.MADV_MERGEABLE)
    fill(a); fill(b)
    keep = []
    out = sys.stdout
    out.write("ready\\n"); out.flush()
    for line in sys.stdin:
        if line == "merge-b\\n":  # b turns mergeable: no page is faulted or freed, RSS stands
            b.madvise(mmap.MADV_MERGEABLE)
        elif line == "grow\\n":  # a new mergeable mapping, every page touched: RSS moves
            d = anon({D}); d.madvise(mmap.MADV_MERGEABLE); fill(d); keep.append(d)
        out.write("ok\\n"); out.flush()
""")


@pytest.fixture
def worker(as_root: None, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The process, and a proc directory that holds only it (a link to its /proc entry), so
    that the host's other processes (other tests' VMs) do not move the totals."""
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        proc = tmp_path / "proc"
        proc.mkdir()
        (proc / str(p.pid)).symlink_to(f"/proc/{p.pid}")
        yield p, proc
    finally:
        p.kill()
        p.wait()


def tell(p: subprocess.Popen[str], cmd: str) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(cmd + "\n")
    p.stdin.flush()
    assert p.stdout.readline() == "ok\n"


def smaps_mergeable_pages(pid: int) -> int:
    return sum(m.rss_kib for m in read_smaps(pid) if m.mergeable) * 1024 // PAGE_SIZE


def test_cached_while_rss_stands_reread_once_it_moves(worker: tuple[subprocess.Popen[str], Path]) -> None:
    p, proc = worker
    cache: dict[int, tuple[int, int, float]] = {}
    assert host_mergeable_pages(proc, cache, now=0.0) == A
    rss = _statm_resident(p.pid, proc)
    assert cache == {p.pid: (rss, A, 0.0)}

    tell(p, "merge-b")
    assert smaps_mergeable_pages(p.pid) == A + B  # what a smaps pass would say now
    assert _statm_resident(p.pid, proc) == rss  # ... but the process's RSS has not moved
    assert host_mergeable_pages(proc, cache, now=10.0) == A  # so the figure read at 0 s stands
    assert cache == {p.pid: (rss, A, 0.0)}

    tell(p, "grow")
    moved = _statm_resident(p.pid, proc)
    assert moved is not None and rss is not None and moved >= rss + D
    assert host_mergeable_pages(proc, cache, now=20.0) == A + B + D  # RSS moved: smaps again
    assert cache == {p.pid: (moved, A + B + D, 20.0)}

    tell(p, "merge-b")  # (a no-op by now) the entry also ages out after MERGEABLE_CACHE_S
    assert host_mergeable_pages(proc, cache, now=20.0 + MERGEABLE_CACHE_S) == A + B + D
    assert cache[p.pid][2] == 20.0 + MERGEABLE_CACHE_S
    assert host_mergeable_pages(proc) == A + B + D  # without a cache: smaps every time
