"""Dedup benchmark: page-hashing throughput per backend against memcpy of the same buffer.

    python benchmarks/bench_dedup.py [--mib 256] [--repeat 3] [--gpu-types A100,H100] [--json out.json]

* ``memcpy`` is ``numpy.copyto`` of the buffer into a preallocated one: the ceiling for anything
  that has to read every byte once (one core).
* ``hash <backend>`` is the backend's hashing of the same buffer in 8192-page batches: wall time on
  this host, and for GPUs the device time (modelled for ``simulated-gpu``, measured with CUDA
  events for ``cupy``, transfers included). Ratio = throughput / memcpy throughput.
* ``hash cpu kernel native|numpy``: the two CPU kernels of the same hash (:mod:`symbiont.dedup.native`,
  the compiled loop, and the numpy reference), each timed right after a memcpy of the buffer;
  ``x memcpy`` is the **median of the per-repeat ratios**, so that load from other processes on
  the host hits both sides of each ratio alike. Target (issue 18): >= 0.5x memcpy per core.
* ``engine scan`` is the whole pipeline (hash, sort, byte-compare of every candidate, report) on
  an image where 30 % of the pages have duplicates.
* ``/proc/PID/mem read`` (root) is reading a child process's memory the way guest RAM is read.
Target from the issue: >= 1 GiB/s per core for CPU hashing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
# isort: split
from symbiont.dedup import native  # noqa: E402
from symbiont.dedup.backends import (  # noqa: E402
    PAGE_SIZE,
    available_backends,
    select_backend,
    xsm64_cpu,
    xsm64_numpy,
)
from symbiont.dedup.engine import BufferSource, Engine  # noqa: E402

GiB = 2**30


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def paired(copy: Any, fn: Any, repeat: int) -> tuple[float, float, list[float]]:
    """Median ratio t_copy / t_fn over ``repeat`` back-to-back pairs, the median time of ``fn``
    and every ratio."""
    ratios, times = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        copy()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        times.append(t2 - t1)
    return statistics.median(ratios), statistics.median(times), ratios


def run(mib: int, repeat: int, gpu_types: list[str]) -> list[dict[str, Any]]:
    n = mib * 2**20 // PAGE_SIZE
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)
    nbytes = buf.nbytes
    dst = np.empty_like(buf)
    np.copyto(dst, buf)  # fault the destination in
    t_copy = best(lambda: np.copyto(dst, buf), repeat)
    memcpy = nbytes / t_copy / GiB
    rows: list[dict[str, Any]] = [{"metric": "memcpy (numpy.copyto, 1 core)", "gib_s": memcpy, "ratio": 1.0,
                                   "note": f"{mib} MiB, best of {repeat}"}]  # fmt: skip
    batch = 8192
    kernels = [("native", xsm64_cpu)] if native.load() is not None else []
    for kname, kfn in [*kernels, ("numpy", xsm64_numpy)]:

        def hash_k(kfn: Any = kfn) -> None:
            for i in range(0, n, batch):
                kfn(buf[i : i + batch])

        hash_k()
        ratio, t, ratios = paired(lambda: np.copyto(dst, buf), hash_k, max(repeat, 5))
        rows.append({"metric": f"hash cpu kernel {kname} (1 core)", "gib_s": nbytes / t / GiB, "ratio": ratio,
                     "note": f"median of {len(ratios)} pairs with memcpy: "
                             f"{' '.join(f'{r:.2f}' for r in ratios)}"
                             + (f"; {native.why()}" if kname == "native" else "")})  # fmt: skip
    variants: list[tuple[str, str]] = [("cpu", "")] + [("simulated-gpu", g) for g in gpu_types]
    if available_backends()["cupy"]["available"]:
        variants.append(("cupy", ""))
    for name, gpu in variants:
        be = select_backend(name, gpu or "A100")

        def hash_all(be: Any = be) -> None:
            for i in range(0, n, batch):
                be.hash_pages(buf[i : i + batch])

        hash_all()  # warm-up (CuPy compiles its kernel here)
        be.reset_stats()
        t = best(hash_all, repeat)
        wall = nbytes / t / GiB
        label = f"hash {name}{' ' + gpu if gpu else ''}"
        rows.append({"metric": f"{label} (wall on this host)", "gib_s": wall, "ratio": wall / memcpy,
                     "note": "per core" if name != "cupy" else "incl. host<->device copies"})  # fmt: skip
        if be.stats.device_s:
            dev = be.stats.bytes / be.stats.device_s / GiB
            how = "modelled" if name == "simulated-gpu" else "CUDA events"
            rows.append({"metric": f"{label} (device time, {how})", "gib_s": dev, "ratio": dev / memcpy,
                         "note": f"h2d {be.stats.h2d_s / repeat:.4f} s, kernel {be.stats.kernel_s / repeat:.4f} s, "
                                 f"d2h {be.stats.d2h_s / repeat:.4f} s per pass"})  # fmt: skip
    # the whole engine on an image with 30 % duplicated pages
    img = buf.copy()
    k = int(0.15 * n)
    img[n - k :] = img[:k]
    src = BufferSource("img", img)
    eng = Engine(select_backend("cpu"))
    rep = None

    def scan() -> None:
        nonlocal rep
        rep = eng.scan([src])

    t = best(scan, repeat)
    assert rep is not None and rep.saveable == k
    rows.append({"metric": "engine scan cpu (hash+sort+compare+report)", "gib_s": nbytes / t / GiB,
                 "ratio": nbytes / t / GiB / memcpy,
                 "note": f"30% duplicated; confirm {rep.timings['confirm_s']:.3f} s of {t:.3f} s"})  # fmt: skip
    if os.geteuid() == 0:
        rows.append(proc_read(min(mib, 256), repeat, memcpy))
    return rows


def proc_read(mib: int, repeat: int, memcpy: float) -> dict[str, Any]:
    from symbiont.dedup.workload import MergeableWorkload

    pages = mib * 2**20 // PAGE_SIZE
    with MergeableWorkload(procs=1, pages=pages, shared_fraction=0.0) as w:
        (src,) = w.sources()

        def read_all() -> None:
            for _ in src.batches(8192):
                pass

        t = best(read_all, repeat)
        src.close()
    g = pages * PAGE_SIZE / t / GiB
    return {"metric": "/proc/PID/mem read (preadv, resident pages)", "gib_s": g, "ratio": g / memcpy,
            "note": f"{mib} MiB of a child process"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-types", default="A100,H100")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    rows = run(args.mib, args.repeat, [g for g in args.gpu_types.split(",") if g])
    t = Table(title=f"page hashing vs memcpy ({args.mib} MiB buffer)")
    for col in ("metric", "GiB/s", "x memcpy", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["metric"], f"{r['gib_s']:.2f}", f"{r['ratio']:.2f}", r["note"])
    Console(width=None if sys.stdout.isatty() else 180).print(t)
    cpu = next(r for r in rows if r["metric"].startswith("hash cpu kernel"))
    print(f"CPU hashing ({cpu['metric']}) {cpu['gib_s']:.2f} GiB/s per core = {cpu['ratio']:.2f}x memcpy "
          f"(median): target >= 0.5x memcpy per core {'met' if cpu['ratio'] >= 0.5 else 'NOT met'}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
