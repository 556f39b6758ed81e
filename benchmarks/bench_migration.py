"""Relay (virtio-serial through the daemon) vs guest network: transfer MiB/s and host CPU s/MiB.

One lab of two VMs with a guest link; a counter container with ``--mib`` MiB of memory is
migrated back and forth ``--runs`` times over each path (stop-and-copy: no pre-dump, so the
whole image moves while the container is frozen). Reported per path: transfer throughput
(MiB moved / transfer seconds), host CPU seconds (both QEMU processes + the daemon) per
migrated MiB, downtime; and the ratio relay / network measured in the same run. As root:

    .venv/bin/python benchmarks/bench_migration.py --mib 32 --runs 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common  # noqa: F401

from symbiont.lab.session import LabSession
from symbiont.migration.experiments import _row, migrate, start_counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=32, help="container memory, MiB")
    ap.add_argument("--runs", type=int, default=2, help="migrations per path")
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {"network": [], "relay": []}
    with LabSession(count=2, prefix="symb-mig-bench-", period_s=1.0, memory_mib=512, max_vcpus=2,
                    peer_link=(47631, 47632), step=lambda s: print("-", s, flush=True),
                    daemon_overrides={"control": {"agent_timeout_s": 15.0}}) as s:  # fmt: skip
        for vm in s.names:
            s.wait_for(lambda vm=vm: s.client().get(f"/v1/vms/{vm}")["cooperative"], 180, f"{vm} cooperative")
        a, b = s.names
        start_counter(s, a, "bench", args.mib)
        time.sleep(8)
        where = a
        for i in range(args.runs):
            for path in ("network", "relay"):
                dest = b if where == a else a
                m = migrate(s, {"vm": where, "ct": "bench", "to": dest, "path": path, "predumps": 0})
                if m["phase"] != "done":
                    raise SystemExit(f"migration failed: {m['error']}")
                r = _row(m, args.mib)
                r["throughput_mib_s"] = r["moved_mib"] / max(1e-9, r["transfer_s"])
                rows[path].append(r)
                print(f"  run {i + 1} {path:7s} {r['moved_mib']:.1f} MiB in {r['transfer_s']:.2f} s "
                      f"= {r['throughput_mib_s']:.2f} MiB/s, host CPU {r['host_cpu_s_per_mib']:.3f} s/MiB, "
                      f"downtime {r['downtime_s']:.2f} s", flush=True)  # fmt: skip
                where = dest
    print()
    med = {p: {k: statistics.median(r[k] for r in rs) for k in ("throughput_mib_s", "host_cpu_s_per_mib",
                                                                 "downtime_s", "src_qemu_cpu_pct",
                                                                 "dst_qemu_cpu_pct", "daemon_cpu_pct")}
           for p, rs in rows.items()}  # fmt: skip
    for p, v in med.items():
        print(f"{p:7s} median: {v['throughput_mib_s']:.2f} MiB/s, {v['host_cpu_s_per_mib']:.3f} host CPU s/MiB, "
              f"downtime {v['downtime_s']:.2f} s, CPU % src QEMU {v['src_qemu_cpu_pct']:.1f}, "
              f"dst QEMU {v['dst_qemu_cpu_pct']:.1f}, daemon {v['daemon_cpu_pct']:.1f}")  # fmt: skip
    n, r = med["network"], med["relay"]
    print(
        f"relay / network: throughput x{r['throughput_mib_s'] / n['throughput_mib_s']:.2f}, "
        f"host CPU per MiB x{r['host_cpu_s_per_mib'] / max(1e-9, n['host_cpu_s_per_mib']):.2f}"
    )


if __name__ == "__main__":
    main()
