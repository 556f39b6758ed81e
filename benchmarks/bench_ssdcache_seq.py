"""Sequential 1 MiB at QD 16 through the elastic disk: throughput and where the CPU goes.

    sudo .venv/bin/python benchmarks/bench_ssdcache_seq.py            # ~1 min
    sudo .venv/bin/python benchmarks/bench_ssdcache_seq.py --reps 3 --mib 512

Host side, no guest: ``qemu-img bench -t none -s 1M -d 16`` (QEMU's own NBD client, the code a
guest's NBD disk runs) against the raw loop device and against the same export served by the C
data path with and without the splice read path (``nosplice``: pread into a buffer + sendmsg;
``native``: pool -> pipe -> socket), in the same run, interleaved. Besides the ratio to the raw
device it prints the CPU time per MiB of the client (``qemu-img``, from ``getrusage``) and of the
server (this process, ``os.times``): through NBD every byte is copied by the client once more than
on the raw device, which is what bounds the sequential ratio (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from symbiont.ssdcache import nbdfast
from symbiont.ssdcache.nbdserver import Export, IoThread, NbdServer
from symbiont.ssdcache.pool import Pool

KINDS = ("raw", "nosplice", "native")


def bench(target: str, args: list[str]) -> tuple[float, float, float]:
    """(seconds qemu-img reports, its CPU seconds, this process's CPU seconds)."""
    r0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    r = subprocess.run(["qemu-img", "bench", "-f", "raw", "-t", "none", *args, target],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    r1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if not m:
        raise RuntimeError(f"qemu-img bench failed: {r.stdout}{r.stderr}")
    client = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return float(m.group(1)), client, s1.user - s0.user + s1.system - s0.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mib", type=int, default=1024, help="MiB per run")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices)")
    if nbdfast.load() is None:
        sys.exit(f"native data path unavailable: {nbdfast.why()}")
    n = args.mib
    with tempfile.TemporaryDirectory(prefix="symbiont-bench-") as tmpd:
        tmp = Path(tmpd)
        pool = Pool.create_file(tmp / "pool.img", 256)
        io = IoThread()
        io.start()
        servers = []
        try:
            targets = {"raw": pool.device}
            for kind in KINDS[1:]:
                exp = Export(kind, 128, pool, {i: 255 - i for i in range(128)}, native=True)
                assert exp.native is not None
                exp.native.set_splice(kind == "native")
                srv = NbdServer(exp, tmp / f"{kind}.sock", executor=io.executor)
                io.submit(srv.start())
                servers.append(srv)
                targets[kind] = f"nbd+unix:///{kind}?socket={tmp / f'{kind}.sock'}"
            subprocess.run(["qemu-io", "-f", "raw", "-t", "none", pool.device, "-c", "write -P 0x5a 0 256M"],
                           check=True, capture_output=True)  # fmt: skip
            print(f"# seq 1 MiB QD 16, {n} MiB per run, median of {args.reps}; raw = the loop device's blocks "
                  "128..255, the exports map lbn i -> pbn 255 - i")
            for name, extra in (("read", []), ("write", ["-w"])):
                res: dict[str, list[tuple[float, float, float]]] = {k: [] for k in KINDS}
                for _ in range(args.reps):
                    for kind, target in targets.items():
                        off = ["-o", str(128 << 20)] if kind == "raw" else []
                        res[kind].append(bench(target, [*extra, "-c", str(n), "-s", "1M", "-d", "16", *off]))
                mib_s = {k: statistics.median(n / x[0] for x in v) for k, v in res.items()}
                for kind, v in res.items():
                    print(f"{name:5} {kind:8} {mib_s[kind]:7.0f} MiB/s  ratio {mib_s[kind] / mib_s['raw']:4.2f}  "
                          f"cpu per MiB: client {statistics.median(x[1] for x in v) / n * 1e3:5.3f} ms, "
                          f"server {statistics.median(x[2] for x in v) / n * 1e3:5.3f} ms", flush=True)
        finally:
            for srv in servers:
                io.submit(srv.close())
            io.stop()
            pool.close(detach=True)


if __name__ == "__main__":
    main()
