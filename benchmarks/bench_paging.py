"""Host paging: page-out rate into zram, and swap-in with and without prefetch.

A helper process holds 256 MiB of private anonymous memory (half-compressible, like guest
RAM). Each run pages all of it out with ``process_madvise(MADV_PAGEOUT)`` (the page-out
rate), then the helper reads one byte of every page and times that itself:

* baseline: the memory resident (no page-out): the cost of the walk alone;
* demand: no prefetch, every page a major fault from zram in the helper's own thread;
* touch ×1 / ×2 threads: the daemon's prefetch first (``/proc/PID/mem`` reads fault the
  pages in and map them), then the walk;
* willneed: ``process_madvise(MADV_WILLNEED)`` first (into the swap cache), then the walk.

Swap-in rate = 256 MiB / (prefetch + walk − baseline walk). Root; makes and removes its own
zram device. ``--vm`` also parks and wakes a real lab VM (boots one; hold the VM lock):

    .venv/bin/python benchmarks/bench_paging.py --runs 5
    flock /tmp/symbiont-vm.lock .venv/bin/python benchmarks/bench_paging.py --runs 5 --vm 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _common  # noqa: F401  (repo root on sys.path)

from symbiont.host import pageout as po
from symbiont.host import zram

MIB = 1 << 20
SIZE = 256 * MIB
HELPER = """
import mmap, random, sys, time
b = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
rnd = random.Random(7)
for i in range(0, len(b), 1 << 20):
    b[i:i + (1 << 20)] = (rnd.randbytes(2048) + bytes(2048)) * 256
print("ready", flush=True)
mv = memoryview(b)
while sys.stdin.readline():
    t = time.perf_counter()
    s = 0
    for i in range(0, len(b), 4096):
        s += mv[i]
    print(time.perf_counter() - t, flush=True)
""".replace("SIZE", str(SIZE))


class Helper:
    def __init__(self) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert self.p.stdout.readline().strip() == "ready"
        self.r = po.guest_ram(po.read_smaps(self.p.pid), SIZE)

    def walk(self) -> float:
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        return float(self.p.stdout.readline())

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def touch_threads(pid: int, ranges: list[tuple[int, int]], n: int) -> None:
    (a, size), = ranges
    step = size // n
    parts = [[(a + i * step, step)] for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda p: po.touch(pid, p), parts))


def helper_runs(runs: int) -> None:
    num = zram.create_swap(1024 * MIB, "lzo-rle", "symbiont-bench", 32000)
    h = Helper()
    res: dict[str, list[float]] = {k: [] for k in ("baseline", "demand", "touch x1", "touch x2", "willneed")}
    pageout_s: list[float] = []
    try:
        whole = [(h.r.start, h.r.size)]
        for _ in range(runs):
            res["baseline"].append(h.walk())
            for mode in ("demand", "touch x1", "touch x2", "willneed"):
                t = time.perf_counter()
                po.pageout(h.p.pid, whole)
                pageout_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                if mode == "touch x1":
                    po.touch(h.p.pid, whole)
                elif mode == "touch x2":
                    touch_threads(h.p.pid, whole, 2)
                elif mode == "willneed":
                    po.willneed(h.p.pid, whole)
                pre = time.perf_counter() - t
                res[mode].append(pre + h.walk())
        mm = zram.stats(num)
    finally:
        h.close()
        zram.remove(num)
    base = statistics.median(res["baseline"])
    po_s = statistics.median(pageout_s)
    print(f"page-out: 256 MiB in {1000 * po_s:.0f} ms median = {256 / po_s:.0f} MiB/s "
          f"(n={len(pageout_s)}); zram ratio {mm.orig_data_size / max(1, mm.compr_data_size):.2f}")
    print(f"{'swap-in of 256 MiB':<22} {'median':>9} {'rate MiB/s':>11} {'vs demand':>10}")
    dem = statistics.median(res["demand"]) - base
    for k, v in res.items():
        med = statistics.median(v)
        if k == "baseline":
            print(f"{'resident (baseline)':<22} {1000 * med:7.0f} ms {'-':>11} {'-':>10}")
            continue
        cost = med - base
        print(f"{k:<22} {1000 * med:7.0f} ms {256 / cost:11.0f} {dem / cost:9.2f}×")


def vm_runs(runs: int) -> None:
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from symbiont_research.lab.session import LabSession

    with TemporaryDirectory(prefix="bench-paging-") as tmp, LabSession(
            count=1, prefix="symbiont-bpg-", period_s=2.0, memory_mib=512, work_dir=Path(tmp),
            daemon_overrides={"paging": {"enabled": True, "zram_size_mib": 1024, "park_observe_s": 2.0}}) as lab:
        vm = lab.names[0]
        time.sleep(5)
        rows: dict[str, list[dict]] = {"none": [], "touch": [], "willneed": []}
        with lab.client() as c:
            for _ in range(runs):
                for mode in rows:
                    p = c.post(f"/v1/paging/vms/{vm}/park", None)
                    w = c.call("POST", f"/v1/paging/vms/{vm}/wake",
                               params={"prefetch": str(mode != "none").lower(),
                                       "mode": "touch" if mode == "none" else mode})
                    rows[mode].append({**w, "wset_mib": p["wset_mib"], "rss_parked": p["after"]["rss_mib"],
                                       "rss_before": p["before"]["rss_mib"], "park_s": p["seconds"]})
                    time.sleep(1)
        dem = statistics.median(r["latency_s"] for r in rows["none"])
        r0 = rows["none"][0]
        print(f"park: QEMU RSS {r0['rss_before']} → {r0['rss_parked']} MiB in {r0['park_s']} s; "
              f"request working set {statistics.median(r['wset_mib'] for r in rows['none']):.1f} MiB")
        print(f"{'wake (VM)':<10} {'latency p50':>12} {'request answered p50':>21} {'prefetch p50':>13} {'vs none':>8}")
        for mode, rs in rows.items():
            lat = statistics.median(r["latency_s"] for r in rs)
            ping = statistics.median(r["ping_s"] for r in rs)
            pre = statistics.median(r["prefetch_s"] or 0 for r in rs)
            print(f"{mode:<10} {1000 * lat:9.1f} ms {1000 * ping:18.1f} ms {1000 * pre:10.1f} ms {dem / lat:7.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--vm", type=int, default=0, help="also park/wake a real VM this many times per mode")
    a = ap.parse_args()
    helper_runs(a.runs)
    if a.vm:
        vm_runs(a.vm)


if __name__ == "__main__":
    main()
