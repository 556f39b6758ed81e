"""Elastic SSD benchmark: the NBD data path against the raw loop device, and resize commit time.

    sudo .venv/bin/python benchmarks/bench_ssdcache.py            # about a minute on 2 cores
    sudo .venv/bin/python benchmarks/bench_ssdcache.py --quick

1. Reads through the elastic disk vs the raw loop device, in the same run, with the same
   client (``qemu-img bench``, queue depth 4, the same data): sequential 1 MiB and random
   4 KiB. Two pairings: *direct* (client O_DIRECT on the loop device vs our server, whose data
   path is O_DIRECT) and *warm* (client through the page cache vs our server with O_DIRECT
   off, data cached). The export maps its 128 logical blocks onto physical blocks in reverse
   order, so every 1 MiB crosses the translation. Target: ≥ 50 % for 1 MiB sequential.
2. Commit time of an inflate and a deflate of 64 blocks (sqlite transactions, map update,
   zeroing of the freed blocks by punching holes), host side, no guest: target < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from symbiont.ssdcache.manager import CacheManager
from symbiont.ssdcache.nbdserver import Export, IoThread, NbdServer
from symbiont.ssdcache.pool import Pool
from symbiont.state import StateStore


def qemu_bench(target: str, cache: str, args: list[str]) -> float:
    """Seconds ``qemu-img bench`` reports for the run."""
    r = subprocess.run(["qemu-img", "bench", "-f", "raw", "-t", cache, *args, target],
                       capture_output=True, text=True, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if not m:
        raise RuntimeError(f"qemu-img bench failed: {r.stdout}{r.stderr}")
    return float(m.group(1))


def data_path(reps: int, seq_count: int, rand_count: int) -> list[dict[str, object]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="symbiont-bench-") as tmpd:
        tmp = Path(tmpd)
        pool = Pool.create_file(tmp / "pool.img", 256)
        io = IoThread()
        io.start()
        try:
            exp = Export("bench", 128, pool, {i: 255 - i for i in range(128)})
            srv = NbdServer(exp, tmp / "bench.sock", executor=io.executor)
            io.submit(srv.start())
            uri = f"nbd+unix:///bench?socket={tmp / 'bench.sock'}"
            subprocess.run(["qemu-io", "-f", "raw", "-t", "none", pool.device, "-c", "write -P 0x5a 0 256M"],
                           check=True, capture_output=True)
            dfd = pool.dfd
            cases = [
                ("seq 1 MiB", ["-c", str(seq_count), "-s", "1M", "-d", "4"]),
                ("rand 4 KiB", ["-c", str(rand_count), "-s", "4k", "-S", "1044480", "-d", "4"]),
            ]
            for mode, raw_cache, server_direct in (("direct", "none", True), ("warm", "writeback", False)):
                for name, args in cases:
                    raw_t, nbd_t = [], []
                    for _ in range(reps):
                        # raw loop device, blocks 128..255 (where the export's data lives)
                        raw_t.append(qemu_bench(pool.device, raw_cache, [*args, "-o", str(128 << 20)]))
                        pool.dfd = dfd if server_direct else -1
                        nbd_t.append(qemu_bench(uri, "writeback", args))
                        pool.dfd = dfd
                    n = int(args[1])
                    size = (1 << 20) if "1M" in args else 4096
                    raw_s, nbd_s = statistics.median(raw_t), statistics.median(nbd_t)
                    out.append({"mode": mode, "case": name, "raw_mib_s": n * size / raw_s / (1 << 20),
                                "nbd_mib_s": n * size / nbd_s / (1 << 20), "raw_iops": n / raw_s,
                                "nbd_iops": n / nbd_s, "ratio": raw_s / nbd_s})
            io.submit(srv.close())
        finally:
            io.stop()
            pool.close(detach=True)
    return out


async def resize_timing(reps: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="symbiont-bench-") as tmpd:
        tmp = Path(tmpd)
        store = StateStore(tmp / "s.sqlite3")
        mgr = CacheManager(store, tmp / "run", pool_dir=tmp)
        await mgr.start()
        try:
            await mgr.create_pool(str(tmp / "pool.img"), None, 256)
            await mgr.register("vm", 128, 0, persist=True)
            up, down = [], []
            for _ in range(reps):
                up.append((await mgr.resize("vm", 64))["timings_ms"]["commit"])
                down.append((await mgr.resize("vm", 0))["timings_ms"]["commit"])
            await mgr.unregister("vm")
            await mgr.delete_pool(remove_file=True)
        finally:
            await mgr.stop()
            store.close()
    return {"inflate": up, "deflate": down}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices)")
    reps = 1 if args.quick else 3
    t0 = time.monotonic()
    rows = data_path(reps, 128 if args.quick else 512, 2000 if args.quick else 10000)
    print(f"# elastic SSD data path vs raw loop device (qemu-img bench, depth 4, median of {reps})")
    print(f"{'mode':7} {'case':11} {'raw':>14} {'elastic (NBD)':>16} {'ratio':>6}")
    for r in rows:
        unit = "MiB/s" if r["case"].startswith("seq") else "IOPS"
        raw = r["raw_mib_s"] if unit == "MiB/s" else r["raw_iops"]
        nbd = r["nbd_mib_s"] if unit == "MiB/s" else r["nbd_iops"]
        print(f"{r['mode']:7} {r['case']:11} {raw:9.0f} {unit:5} {nbd:10.0f} {unit:5} {r['ratio']:6.2f}")
    t = asyncio.run(resize_timing(5 if args.quick else 20))
    print("# commit time of a 64-block resize (host side, no guest)")
    for k, v in t.items():
        print(f"{k:8} p50 {statistics.median(v):6.2f} ms  max {max(v):6.2f} ms  (n={len(v)})")
    print(f"# {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
