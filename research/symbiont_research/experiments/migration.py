"""Portkey's experiments on the lab: network vs relay path, adaptive vs fixed send rate.

* ``migration-paths``: a counter container with N MiB of memory migrates between two VMs over
  the guest network and over the hypervisor relay (its serial frames and its shm channel), for each size: migration time, downtime,
  pre-dump/dump/transfer/restore times, host CPU of each QEMU process and of the daemon (the
  seed's table: source and destination machine CPU %), and the application's progress
  (counts per second, from the counter's own time stamps) across the migration.
* ``migration-rate``: the same relay transfer with the adaptive send rate and with fixed
  rates: transfer time, the sender's wasted tries (buffer found full), time slept, CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from symbiont.migration.workload import counter_command, parse_counter
from symbiont_research.experiments.framework import ExperimentError, RunContext, experiment

WORK = "/var/lib/symbiont-work"
PREFIX = "symb-mig-exp-"
PATHS = {  # a path's name in the experiments -> the request's path and relay channel
    "network": {"path": "network"},
    "relay": {"path": "relay", "channel": "serial"},
    "relay-shm": {"path": "relay", "channel": "shm"},
}


@contextlib.contextmanager
def lab(ctx: RunContext, memory_mib: int = 512) -> Iterator[Any]:
    from symbiont_research.lab.session import LabSession

    ctx.stage("lab: image, two VMs with a guest link, symbiontd")
    with LabSession(count=2, period_s=1.0, memory_mib=memory_mib, max_vcpus=2, step=ctx.note,
                    peer_link=True, daemon_overrides={"control": {"agent_timeout_s": 15.0}}) as s:  # fmt: skip
        for vm in s.names:
            s.wait_for(lambda vm=vm: s.client().get(f"/v1/vms/{vm}")["cooperative"], 180, f"{vm} cooperative")
        yield s


def start_counter(s: Any, vm: str, ct: str, mib: int, period: float = 0.1) -> None:
    with s.client() as c:
        c.post(f"/v1/cpu/vms/{vm}/containers", {
            "name": ct, "command": counter_command(ct, mib, f"{WORK}/{ct}/out", period),
            "limits": {"memory_max": f"{mib + 96}M"},
        })  # fmt: skip


def migrate(s: Any, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    with s.client() as c:
        m = c.post("/v1/migration", body)

    def ended() -> dict[str, Any] | None:
        with s.client() as c:
            cur = c.get(f"/v1/migration/{m['id']}")
        return cur if cur["phase"] in ("done", "aborted") and not cur["running"] else None

    return s.wait_for(ended, timeout, f"migration {m['id']}", interval=0.5)


def counter_lines(s: Any, vm: str, ct: str) -> list[tuple[int, float]]:
    from symbiont_research.lab.console import guest_exec

    r = guest_exec(s.host, vm, f"cat {WORK}/{ct}/out", timeout=120)
    return parse_counter(r.output.replace("\r", "") + "\n")


def progress_rows(run: str, lines: list[tuple[int, float]], t_freeze: float) -> list[dict[str, Any]]:
    """Counts per second around the migration, time relative to the freeze (guest clocks)."""
    per: dict[int, int] = {}
    for _, ts in lines:
        per[int(ts - t_freeze) if ts >= t_freeze else int(ts - t_freeze) - 1] = (
            per.get(int(ts - t_freeze) if ts >= t_freeze else int(ts - t_freeze) - 1, 0) + 1
        )
    lo, hi = min(per), max(per)
    return [{"run": run, "t_s": t, "counts": per.get(t, 0)} for t in range(lo, hi + 1)]


def _row(m: dict[str, Any], size: int) -> dict[str, Any]:
    t, cpu = m["timings"], m["result"].get("host_cpu", {})
    moved = m["progress"].get("moved", 0)
    mib = moved / 2**20
    return {
        "size_mib": size, "path": m["path"], "rate": m["rate"], "phase": m["phase"],
        "predump_s": t.get("predump1_s"), "dump_s": t.get("dump_s"),
        "transfer_s": round(sum(v for k, v in t.items() if k.startswith("transfer")), 4),
        "restore_s": t.get("restore_s"), "downtime_s": t.get("downtime_s"), "total_s": t.get("total_s"),
        "moved_mib": round(mib, 3),
        "src_qemu_cpu_pct": cpu.get("source_qemu_cpu_pct"), "dst_qemu_cpu_pct": cpu.get("dest_qemu_cpu_pct"),
        "daemon_cpu_pct": cpu.get("daemon_cpu_pct"),
        "host_cpu_s_per_mib": round(
            sum(cpu.get(k) or 0.0 for k in ("source_qemu_cpu_s", "dest_qemu_cpu_s", "daemon_cpu_s")) / max(mib, 1e-9), 4
        ),
    }  # fmt: skip


@experiment(
    "migration-paths",
    "Portkey: container migration over the guest network vs the hypervisor relay, across memory sizes",
    params={"sizes_mib": "8,32", "paths": "network,relay,relay-shm", "predumps": 1, "warmup_s": 4.0, "settle_s": 4.0},
    param_help={"sizes_mib": "container memory sizes, MiB",
                "paths": "which transfer paths, in order (relay: serial frames; relay-shm: the shm channel)",
                "predumps": "pre-copy iterations", "warmup_s": "counting before the migration",
                "settle_s": "counting after it"},
    needs=("root", "libvirt", "vm"),
)  # fmt: skip
def migration_paths(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    sizes = [int(x) for x in str(p["sizes_mib"]).split(",") if x.strip()]
    paths = [x.strip() for x in str(p["paths"]).split(",") if x.strip()]
    if not sizes or any(x not in PATHS for x in paths):
        raise ExperimentError(f"sizes_mib: MiB list; paths: some of {', '.join(PATHS)}")
    rows: list[dict[str, Any]] = []
    prog: list[dict[str, Any]] = []
    with lab(ctx) as s:
        vm1, vm2 = s.names
        ctx.stage(f"{len(sizes) * len(paths)} migrations", total=len(sizes) * len(paths))
        for size in sizes:
            for path in paths:
                ct = f"c{size}{path[0]}{len(path)}"
                start_counter(s, vm1, ct, size)
                time.sleep(float(p["warmup_s"]) + size / 8)
                m = migrate(s, {"vm": vm1, "ct": ct, "to": vm2, **PATHS[path], "predumps": int(p["predumps"])})
                if m["phase"] != "done":
                    raise ExperimentError(f"migration {m['id']} {m['phase']}: {m['error']}")
                time.sleep(float(p["settle_s"]))
                row = _row(m, size)
                row["path"] = path
                row["channel"] = m["result"].get("channel")
                rows.append(row)
                lines = counter_lines(s, vm2, ct)
                frozen_at = m["progress"].get("frozen_at")
                gaps = [b[1] - a[1] for a, b in zip(lines, lines[1:], strict=False)]
                row["app_pause_s"] = round(max(gaps), 3) if gaps else None
                row["app_restarted"] = [n for n, _ in lines] != list(range(1, len(lines) + 1))
                i = gaps.index(max(gaps)) if gaps else 0
                prog += progress_rows(f"{path} {size} MiB", lines, frozen_at or (lines[i][1] if lines else 0))
                ctx.note(f"{path} {size} MiB: total {row['total_s']} s, downtime {row['downtime_s']} s, "
                         f"src QEMU {row['src_qemu_cpu_pct']} %, dst QEMU {row['dst_qemu_cpu_pct']} %, "
                         f"daemon {row['daemon_cpu_pct']} %")  # fmt: skip
                with s.client() as c:
                    c.call("DELETE", f"/v1/cpu/vms/{vm2}/containers/{ct}")
                ctx.advance()
    ctx.write_csv("migrations.csv", rows)
    ctx.write_csv("progress.csv", prog)
    _plot_paths(ctx, rows, prog)
    return {"migrations": rows}


def _plot_paths(ctx: RunContext, rows: list[dict[str, Any]], prog: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    labels = [f"{r['path']}\n{r['size_mib']} MiB" for r in rows]
    x = range(len(rows))
    w = 0.27
    ax[0].bar([i - w for i in x], [r["src_qemu_cpu_pct"] or 0 for r in rows], w, label="source QEMU")
    ax[0].bar(list(x), [r["dst_qemu_cpu_pct"] or 0 for r in rows], w, label="destination QEMU")
    ax[0].bar([i + w for i in x], [r["daemon_cpu_pct"] or 0 for r in rows], w, label="daemon (relay)")
    ax[0].set_xticks(list(x), labels)
    ax[0].set_ylabel("host CPU % of one core")
    ax[0].set_title("host CPU during the migration")
    ax[0].legend(fontsize=8)
    ax[1].bar([i - w / 2 for i in x], [r["total_s"] or 0 for r in rows], w, label="migration time")
    ax[1].bar([i + w / 2 for i in x], [r["downtime_s"] or 0 for r in rows], w, label="downtime")
    ax[1].set_xticks(list(x), labels)
    ax[1].set_ylabel("s")
    ax[1].set_title("migration time and downtime")
    ax[1].legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for key in ("predump_s", "dump_s", "transfer_s", "restore_s"):
        vals = [r[key] or 0 for r in rows]
        ax[2].bar(list(x), vals, 0.5, bottom=bottom, label=key.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax[2].set_xticks(list(x), labels)
    ax[2].set_title("phases (s)")
    ax[2].legend(fontsize=8)
    for run in dict.fromkeys(r["run"] for r in prog):
        pts = [(r["t_s"], r["counts"]) for r in prog if r["run"] == run]
        ax[3].plot([a for a, _ in pts], [b for _, b in pts], label=run)
    ax[3].axvline(0, color="grey", ls=":")
    ax[3].set_xlabel("s from the freeze")
    ax[3].set_ylabel("counts / s")
    ax[3].set_title("application progress")
    ax[3].legend(fontsize=7)
    fig.suptitle("Portkey on the lab: guest network vs hypervisor relay (virtio-serial)")
    ctx.savefig(fig, "migration_paths.png")


@experiment(
    "migration-rate",
    "Portkey's adaptive send rate vs fixed rates on the relay path: transfer time, wasted tries, CPU",
    params={"size_mib": 32, "fixed_mbps": "16,256", "window_kib": 2048, "warmup_s": 6.0},
    param_help={"size_mib": "container memory, MiB", "fixed_mbps": "fixed rates to compare, Mbit/s",
                "window_kib": "the relay window (send buffer)"},
    needs=("root", "libvirt", "vm"),
)  # fmt: skip
def migration_rate(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    runs: list[tuple[str, float]] = [("adaptive", 64.0)]
    runs += [("fixed", float(x)) for x in str(p["fixed_mbps"]).split(",") if x.strip()]
    rows: list[dict[str, Any]] = []
    with lab(ctx) as s:
        vm1, vm2 = s.names
        ctx.stage(f"{len(runs)} relayed migrations", total=len(runs))
        for i, (mode, mbps) in enumerate(runs):
            src, dst = (vm1, vm2) if i % 2 == 0 else (vm2, vm1)
            ct = f"r{i}"
            start_counter(s, src, ct, int(p["size_mib"]))
            time.sleep(float(p["warmup_s"]))
            m = migrate(s, {"vm": src, "ct": ct, "to": dst, "path": "relay", "rate": mode, "rate_mbps": mbps,
                            "predumps": 0, "window_kib": int(p["window_kib"])})  # fmt: skip
            if m["phase"] != "done":
                raise ExperimentError(f"migration {m['id']} {m['phase']}: {m['error']}")
            sender = [r["sender"] for r in m["result"]["relay"]]
            row = _row(m, int(p["size_mib"]))
            row.update(
                rate_mbps=mbps if mode == "fixed" else None,
                relay_s=round(sum(r["relay_s"] for r in m["result"]["relay"]), 4),
                sends=sum(x["chunks"] for x in sender), wasted_tries=sum(x["retries"] for x in sender),
                slept_s=round(sum(x["slept_s"] for x in sender), 4),
                throughput_mib_s=round(row["moved_mib"] / max(1e-9, sum(r["relay_s"] for r in m["result"]["relay"])), 3),
            )  # fmt: skip
            rows.append(row)
            ctx.note(f"{mode} {mbps:g} Mbit/s: {row['throughput_mib_s']} MiB/s, {row['wasted_tries']} wasted tries, "
                     f"daemon {row['daemon_cpu_pct']} %")  # fmt: skip
            with s.client() as c:
                c.call("DELETE", f"/v1/cpu/vms/{dst}/containers/{ct}")
            ctx.advance()
    ctx.write_csv("rate.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    labels = [r["rate"] if r["rate"] == "adaptive" else f"fixed {r['rate_mbps']:g} Mb/s" for r in rows]
    ax[0].bar(labels, [r["throughput_mib_s"] for r in rows])
    ax[0].set_ylabel("relay MiB/s")
    ax[1].bar(labels, [r["wasted_tries"] for r in rows])
    ax[1].set_ylabel("sends that found the window full")
    ax[2].bar(labels, [r["daemon_cpu_pct"] or 0 for r in rows], label="daemon")
    ax[2].bar(labels, [r["src_qemu_cpu_pct"] or 0 for r in rows], alpha=0.5, label="source QEMU")
    ax[2].set_ylabel("host CPU %")
    ax[2].legend()
    fig.suptitle(f"adaptive vs fixed send rate, {p['size_mib']} MiB container, window {p['window_kib']} KiB")
    ctx.savefig(fig, "migration_rate.png")
    return {"runs": rows}
