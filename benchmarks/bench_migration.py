"""Container migration: freeze, total time and host CPU per MiB, relay vs guest network.

One lab of two VMs with a guest link (the lab allocates an unused one), the real daemon and
agents. A counter container holds ``size`` MiB of its own memory and writes ``dirty`` KiB of
it per second (one byte per page). Every row is one migration; the same container goes
there over one path and back over the other, so both paths see the same state:

* sizes (default 8, 32, 128 MiB) at one write rate, iterative pre-copy (stops when a
  pre-dump is below 1 MiB or no longer shrinks), relay and network;
* write rates (default 0.25, 4, 16 MiB/s) at 32 MiB, relay and network;
* the stop-and-copy baseline (no pre-dump: the freeze of before) at 32 MiB, both paths.

Every plan step moves the container over each of ``--paths`` in turn (default: the relay
with its serial frames, the relay with its shm channel, the guest network; the last is the
baseline). Printed: a markdown table (freeze = from the freeze to the restored copy confirmed
running), and per group the ratio of each path to the baseline of host CPU seconds (both QEMU
processes + the daemon) per migrated MiB, measured in the same run. As root:

    .venv/bin/python benchmarks/bench_migration.py
    .venv/bin/python benchmarks/bench_migration.py --sizes 32 --rates "" --no-baseline   # quick
    .venv/bin/python benchmarks/bench_migration.py --grid --rates 4096   # 8/32/128 MiB x 1 and 4 MiB/s
    .venv/bin/python benchmarks/bench_migration.py --sizes 32 --rates "" --no-baseline --reps 3   # 3 groups
    .venv/bin/python benchmarks/bench_migration.py --sizes 32 --rates 256 --no-baseline --reps 2 \\
        --paths relay-serial,relay-shm,network   # the fourth round
    .venv/bin/python benchmarks/bench_migration.py --sizes 32,128 --rates "" --no-baseline \\
        --paths relay-shm,relay-shm-lazy,network   # lazy restore (CRIU lazy pages) beside the eager one
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _common  # noqa: F401

from symbiont.migration.workload import counter_command
from symbiont_research.experiments.migration import _row, migrate
from symbiont_research.lab.session import LabSession

WORK = "/var/lib/symbiont-work"
MiB = 1 << 20


def start(s: LabSession, vm: str, ct: str, mib: int, dirty_kib_s: int) -> None:
    with s.client() as c:
        c.post(f"/v1/cpu/vms/{vm}/containers", {
            "name": ct, "command": counter_command(ct, mib, f"{WORK}/{ct}/out", 0.1, dirty_kib_s),
            "limits": {"memory_max": f"{mib + 96}M"},
        })  # fmt: skip


PATHS = {  # row label -> the request's path and relay channel
    "relay-serial": {"path": "relay", "channel": "serial"},
    "relay-shm": {"path": "relay", "channel": "shm"},
    "relay-shm-lazy": {"path": "relay", "channel": "shm", "lazy": True},  # CRIU lazy pages at the destination
    "network": {"path": "network"},
}


def one(s: LabSession, src: str, dst: str, ct: str, path: str, predumps: int, size: int, dirty: int) -> dict[str, Any]:
    m = migrate(s, {"vm": src, "ct": ct, "to": dst, **PATHS[path], "predumps": predumps})
    if m["phase"] != "done":
        raise SystemExit(f"migration {m['id']} failed: {m['error']}")
    if path.startswith("relay-shm") and m["result"].get("channel") != "shm":
        raise SystemExit(f"migration {m['id']}: no shm channel ({m['result'].get('shm_fallback')})")
    r = _row(m, size)
    r["path"] = path
    pr = m["progress"]
    fs = m["result"].get("freeze_steps") or {}
    xfer = m["result"].get("transfer_cpu") or {}
    relay = m["result"].get("relay") or []
    r.update(
        dirty_kib_s=dirty, predumps=pr.get("predumps", 0), stop=pr.get("precopy_stop"),
        final_mib=round(pr.get("final_bytes", 0) / MiB, 3),
        freeze_s=m["timings"].get("downtime_s"),
        throughput_mib_s=round(r["moved_mib"] / max(1e-9, r["transfer_s"]), 3),
        steps=fs, final_xfer_s=round(sum(fs.get(k, 0.0) for k in ("manifest_s", "send_s", "verify_s")), 3),
        xfer_cpu_s_per_mib=xfer.get("cpu_s_per_mib"), xfer_mib_s=round(xfer.get("bytes", 0) / MiB / max(1e-9, xfer.get("seconds", 0.0)), 2),
    )  # fmt: skip
    print(f"  {path:12s} {size:4d} MiB {dirty:6d} KiB/s predumps {r['predumps']} ({r['stop']}): moved {r['moved_mib']:.1f} "
          f"MiB, final {r['final_mib']:.2f} MiB, freeze {r['freeze_s']:.2f} s (dump {r['dump_s']:.2f}, restore "
          f"{r['restore_s']:.2f}), total {r['total_s']:.1f} s, {r['host_cpu_s_per_mib']:.3f} host CPU s/MiB, "
          f"transfers alone {r['xfer_cpu_s_per_mib']} s/MiB at {r['xfer_mib_s']} MiB/s; pre-dumps MiB "
          f"{[round(b / MiB, 2) for b in pr.get('predump_bytes') or []]}; transfers' CPU s source QEMU "
          f"{xfer.get('source_qemu_cpu_s')} dest QEMU {xfer.get('dest_qemu_cpu_s')} daemon {xfer.get('daemon_cpu_s')} "
          f"for {xfer.get('bytes', 0) / MiB:.1f} MiB; steps {fs}; regions {m['timings'].get('regions_s')} s "
          f"(plugged in {(m['result'].get('shm') or {}).get('plugged')}, host CPU {m['result'].get('shm_cpu_s')} s); chunks "
          f"{sum(x.get('relay_chunks', 0) for x in relay)}, credits {sum(x.get('credits', 0) for x in relay)} "
          f"(+{sum(x.get('credits_coalesced', 0) for x in relay)} folded), sender slept "
          f"{[x['sender'].get('slept_s') for x in relay]} s, per transfer s "
          f"{[v for k, v in m['timings'].items() if k.startswith('transfer')]}", flush=True)  # fmt: skip
    return r


GUEST_COSTS = (  # one line: it is typed into the guest's serial console
    "import hashlib, time, zlib; b = bytes(range(256)) * (16 << 12); n = len(b) >> 20; "
    "t = lambda f: (lambda t0: (f(), (time.perf_counter() - t0) * 1e3 / n)[1])(time.perf_counter()); "
    "print('guest ms/MiB: sha256 %.1f crc32 %.1f copy %.1f' % (t(lambda: hashlib.sha256(b).digest()), "
    "t(lambda: zlib.crc32(b)), t(lambda: bytearray(b))))"
)


def guest_costs(s: LabSession, vm: str) -> None:
    """What one pass over the data costs inside a TCG guest (the checksums and copies of the paths)."""
    from symbiont_research.lab.console import guest_exec

    try:
        r = guest_exec(s.host, vm, f"python3 -c \"{GUEST_COSTS}\"", timeout=120)
        print("-", r.output.strip().splitlines()[-1] if r.output.strip() else r, flush=True)
    except Exception as exc:  # a measurement beside the benchmark: never its end
        print("- guest costs not measured:", exc, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,32,128", help="container memory sizes, MiB")
    ap.add_argument("--dirty", type=int, default=1024, help="write rate for the size sweep, KiB/s")
    ap.add_argument("--rates", default="256,4096,16384", help="more write rates at 32 MiB, KiB/s")
    ap.add_argument("--predumps", type=int, default=4, help="most pre-copy iterations")
    ap.add_argument("--no-baseline", action="store_true", help="skip the stop-and-copy pair")
    ap.add_argument("--grid", action="store_true", help="every size at every write rate (--dirty and --rates)")
    ap.add_argument("--memory-mib", type=int, default=768, help="guest memory")
    ap.add_argument("--reps", type=int, default=1, help="run the whole plan this many times (same lab)")
    ap.add_argument("--paths", default="relay-serial,relay-shm,network",
                    help=f"which paths, in this order, the last one the baseline ({', '.join(PATHS)})")
    args = ap.parse_args()
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if len(paths) < 2 or any(x not in PATHS for x in paths):
        raise SystemExit(f"--paths: two or more of {', '.join(PATHS)}")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    rates = [int(x) for x in args.rates.split(",") if x.strip()]
    plan: list[tuple[int, int, int]] = [(size, args.dirty, args.predumps) for size in sizes]
    if args.grid:
        plan = [(size, r, args.predumps) for r in [args.dirty, *rates] for size in sizes]
    else:
        plan += [(32, r, args.predumps) for r in rates]
    if not args.no_baseline:
        plan.append((32, args.dirty, 0))
    plan = plan * max(1, args.reps)
    rows: list[dict[str, Any]] = []
    with LabSession(count=2, prefix="symb-mig-bench-", period_s=1.0, memory_mib=args.memory_mib, max_vcpus=2,
                    peer_link=True, step=lambda x: print("-", x, flush=True),
                    daemon_overrides={"control": {"agent_timeout_s": 15.0}}) as s:  # fmt: skip
        for vm in s.names:
            s.wait_for(lambda vm=vm: s.client().get(f"/v1/vms/{vm}")["cooperative"], 180, f"{vm} cooperative")
        a, b = s.names
        guest_costs(s, a)
        for i, (size, dirty, predumps) in enumerate(plan):
            ct = f"b{i}"
            start(s, a, ct, size, dirty)
            time.sleep(6 + size / 16)  # allocated and writing
            where = a
            for path in paths:  # there and back: every path moves the same container's state
                other = b if where == a else a
                rows.append(one(s, where, other, ct, path, predumps, size, dirty))
                where = other
            with s.client() as c:
                c.call("DELETE", f"/v1/cpu/vms/{where}/containers/{ct}")
    base = paths[-1]
    print()
    print("| path | size MiB | writes KiB/s | pre-dumps (why stopped) | moved MiB | final dump MiB | freeze s "
          f"| dump s | final transfer s | restore s | total s | host CPU s/MiB (whole) | /{base} | "
          f"host CPU s/MiB (transfers alone) | /{base} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    k = len(paths)
    ratios: dict[str, list[float]] = {p: [] for p in paths[:-1]}
    xratios: dict[str, list[float]] = {p: [] for p in paths[:-1]}
    for j in range(0, len(rows), k):
        group = rows[j : j + k]
        n = group[-1]
        for x in group:
            extra = xextra = ""
            if x is not n:
                ratio = x["host_cpu_s_per_mib"] / max(1e-9, n["host_cpu_s_per_mib"])
                xratio = (x["xfer_cpu_s_per_mib"] or 0.0) / max(1e-9, n["xfer_cpu_s_per_mib"] or 0.0)
                ratios[x["path"]].append(ratio)
                xratios[x["path"]].append(xratio)
                extra, xextra = f"x{ratio:.2f}", f"x{xratio:.2f}"
            print(f"| {x['path']} | {x['size_mib']} | {x['dirty_kib_s']} | {x['predumps']} ({x['stop']}) | "
                  f"{x['moved_mib']:.1f} | {x['final_mib']:.2f} | {x['freeze_s']:.2f} | {x['dump_s']:.2f} | "
                  f"{x['final_xfer_s']:.2f} | {x['restore_s']:.2f} | {x['total_s']:.1f} | "
                  f"{x['host_cpu_s_per_mib']:.3f} | {extra} | {x['xfer_cpu_s_per_mib']} | {xextra} |")  # fmt: skip
    print()
    for p in paths[:-1]:
        r, xr = ratios[p], xratios[p]
        print(f"{p} / {base} host CPU per migrated MiB, whole migration: median x{statistics.median(r):.2f} "
              f"(min x{min(r):.2f}, max x{max(r):.2f}) over {len(r)} runs")
        print(f"{p} / {base} host CPU per MiB, transfers alone: median x{statistics.median(xr):.2f} "
              f"(min x{min(xr):.2f}, max x{max(xr):.2f}) over {len(xr)} runs")
    for p in paths:
        fr = [x["freeze_s"] for x in rows if x["path"] == p]
        tp = [x["xfer_mib_s"] for x in rows if x["path"] == p]
        print(f"{p}: freeze median {statistics.median(fr):.2f} s ({min(fr):.2f}-{max(fr):.2f}); transfers "
              f"median {statistics.median(tp):.2f} MiB/s ({min(tp):.2f}-{max(tp):.2f})")


if __name__ == "__main__":
    main()
