"""Elastic SSD benchmark: the NBD data path against the raw loop device, and resize commit time.

    sudo .venv/bin/python benchmarks/bench_ssdcache.py            # about a minute on 2 cores
    sudo .venv/bin/python benchmarks/bench_ssdcache.py --quick

1. Reads (and random 4 KiB writes) through the elastic disk vs the raw loop device, in the
   same run, with the same client (``qemu-img bench``, queue depths 1, 4 and 16, the same
   data), the export served once by the Python data path and once by the C one (``nbdfast``):
   sequential 1 MiB and random 4 KiB. Two pairings: *direct* (client O_DIRECT on the loop device vs our server, whose data
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

from symbiont.ssdcache import nbdfast
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


def data_path(reps: int, seq_count: int, rand_count: int, depths: tuple[int, ...]) -> list[dict[str, object]]:
    """Raw loop device vs the elastic disk served by the Python data path and by the native
    one (``nbdfast``), same run, same client, same data."""
    out = []
    with tempfile.TemporaryDirectory(prefix="symbiont-bench-") as tmpd:
        tmp = Path(tmpd)
        pool = Pool.create_file(tmp / "pool.img", 256)
        io = IoThread()
        io.start()
        try:
            mapping = {i: 255 - i for i in range(128)}
            servers = {}
            for kind, native in (("python", False), ("native", True)):
                exp = Export(f"bench-{kind}", 128, pool, mapping, native=native)
                srv = NbdServer(exp, tmp / f"{kind}.sock", executor=io.executor)
                io.submit(srv.start())
                servers[kind] = (exp, srv, f"nbd+unix:///bench-{kind}?socket={tmp / f'{kind}.sock'}")
            subprocess.run(["qemu-io", "-f", "raw", "-t", "none", pool.device, "-c", "write -P 0x5a 0 256M"],
                           check=True, capture_output=True)
            dfd = pool.dfd
            for depth in depths:
                cases = [
                    ("seq 1 MiB", ["-c", str(seq_count), "-s", "1M", "-d", str(depth)]),
                    ("rand 4 KiB", ["-c", str(rand_count), "-s", "4k", "-S", "1044480", "-d", str(depth)]),
                    ("rand 4 KiB w", ["-w", "-c", str(rand_count), "-s", "4k", "-S", "1044480", "-d", str(depth)]),
                ]
                for mode, raw_cache, server_direct in (("direct", "none", True), ("warm", "writeback", False)):
                    for name, args in cases:
                        if mode == "warm" and name.endswith(" w"):
                            continue  # buffered writes: the page cache, not the data path
                        t: dict[str, list[float]] = {"raw": [], "python": [], "native": []}
                        for _ in range(reps):
                            # raw loop device, blocks 128..255 (where the exports' data lives)
                            t["raw"].append(qemu_bench(pool.device, raw_cache, [*args, "-o", str(128 << 20)]))
                            for kind, (exp, _srv, uri) in servers.items():
                                pool.dfd = dfd if server_direct else -1
                                exp.set_direct(server_direct)
                                t[kind].append(qemu_bench(uri, "writeback", args))
                                pool.dfd = dfd
                                exp.set_direct(True)
                        n = int(args[args.index("-c") + 1])
                        size = (1 << 20) if "1M" in args else 4096
                        med = {k: statistics.median(v) for k, v in t.items()}
                        row: dict[str, object] = {"depth": depth, "mode": mode, "case": name}
                        for k, v in med.items():
                            row[f"{k}_mib_s"] = n * size / v / (1 << 20)
                            row[f"{k}_iops"] = n / v
                        row["ratio_python"] = med["raw"] / med["python"]
                        row["ratio_native"] = med["raw"] / med["native"]
                        out.append(row)
            for _exp, srv, _uri in servers.values():
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
    rows = data_path(reps, 128 if args.quick else 512, 2000 if args.quick else 10000, (1, 16) if args.quick else (1, 4, 16))
    print(f"# elastic SSD data path vs raw loop device (qemu-img bench, median of {reps}); native: {nbdfast.why()}")
    print(f"{'QD':>2} {'mode':7} {'case':13} {'raw':>14} {'python NBD':>16} {'native NBD':>16} {'py':>5} {'nat':>5}")
    for r in rows:
        unit = "MiB/s" if str(r["case"]).startswith("seq") else "IOPS"
        key = "mib_s" if unit == "MiB/s" else "iops"
        print(f"{r['depth']:>2} {r['mode']:7} {r['case']:13} {r[f'raw_{key}']:8.0f} {unit:5} "
              f"{r[f'python_{key}']:10.0f} {unit:5} {r[f'native_{key}']:10.0f} {unit:5} "
              f"{r['ratio_python']:5.2f} {r['ratio_native']:5.2f}")
    t = asyncio.run(resize_timing(5 if args.quick else 20))
    print("# commit time of a 64-block resize (host side, no guest)")
    for k, v in t.items():
        print(f"{k:8} p50 {statistics.median(v):6.2f} ms  max {max(v):6.2f} ms  (n={len(v)})")
    print(f"# {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
