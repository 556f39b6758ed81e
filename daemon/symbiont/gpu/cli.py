"""``symbiont gpu``: list backends and devices, show the GPU presets, replay a FaaS trace locally;
and, through the daemon's API (``/v1/gpu``, needs ``gpu.enabled``), register GPUs, set client
quotas, migrate clients, submit trace workloads and read their results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from symbiont.gpu.backend import GpuBackend, GpuError, cupy_status, select_backend
from symbiont.gpu.calibration import CALIBRATIONS, DEFAULT_CALIBRATION
from symbiont.gpu.faas import DROP_MODES, SCHEDULERS, BackgroundLoad, TraceError, load_trace, run_trace
from symbiont.gpu.simulated import GPU_TYPES, SCHED_MODES, DeviceConfig


class GpuCliError(click.ClickException):
    """A user error: printed as one clear line, exit status 2."""

    exit_code = 2


def _console() -> Console:
    # piped or captured output gets a wide table rather than rich's 80-column default
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _devices(gpus: str, sched: str) -> list[DeviceConfig]:
    names = [g.strip() for g in gpus.split(",") if g.strip()]
    if not names:
        raise GpuCliError("--gpus needs at least one GPU type")
    try:
        return [DeviceConfig(n, sched=sched) for n in names]
    except GpuError as exc:
        raise GpuCliError(str(exc)) from None


def _select(backend: str, gpus: str, sched: str, seed: int = 0) -> GpuBackend:
    try:
        return select_backend(backend, devices=_devices(gpus, sched), seed=seed)
    except (GpuError, ValueError) as exc:
        raise GpuCliError(str(exc)) from None


@click.group(name="gpu")
def group() -> None:
    """GPU: elastic endpoints (Flyt), deadline-aware FaaS on sliced vGPUs, heterogeneous dispatch."""


@group.command("list")
@click.option("--backend", type=click.Choice(["auto", "cupy", "simulated"]), default="auto", show_default=True)
@click.option("--gpus", default="A100", show_default=True, help="Simulated devices: comma-separated GPU types.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(backend: str, gpus: str, as_json: bool) -> None:
    """Show which backends are usable here and the devices of the selected one."""
    ok, why = cupy_status()
    b = _select(backend, gpus, "spatial")
    if as_json:
        click.echo(json.dumps({"cupy": {"available": ok, "reason": why}, **b.describe()}, indent=2))
        return
    con = _console()
    t = Table(title="GPU backends")
    for col in ("backend", "available", "why"):
        t.add_column(col)
    t.add_row("cupy", "yes" if ok else "no", why)
    t.add_row("simulated", "yes", "discrete-event model (always available)")
    con.print(t)
    d = Table(title=f"devices of the '{b.name}' backend")
    for col in ("index", "name", "type", "SMs", "memory GiB", "peak TFLOP/s", "server", "sharing"):
        d.add_column(col)
    for info in b.devices():
        g = info.gpu_type
        d.add_row(str(info.index), info.name, g.name, str(g.sm_count), f"{g.mem_bytes / 2**30:.1f}",
                  f"{g.peak_flops / 1e12:.2f}", info.server, info.sched)  # fmt: skip
    con.print(d)


@group.command("types")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def types_cmd(as_json: bool) -> None:
    """The simulated GPU presets and the spec-sheet constants behind them."""
    rows = [t.as_dict() for t in GPU_TYPES.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="simulated GPU types (see CALIBRATION in docs/gpu.md)")
    cols = ("name", "sm_count", "fp32_lanes_per_sm", "clock_ghz", "peak_tflops", "mem_gib", "mem_bw_gbs",
            "pcie_bw_gbs", "pcie_latency_us", "launch_overhead_us")  # fmt: skip
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    con = _console()
    con.print(t)
    for r in rows:
        con.print(f"[bold]{r['name']}[/bold]: {r['source']}")
    # the simulator charges these host costs, not launch_overhead_us (gpu/calibration.py)
    for cal in CALIBRATIONS.values():
        d = cal.as_dict()
        default = " (default)" if cal.name == DEFAULT_CALIBRATION else ""
        con.print(f"calibration [bold]{cal.name}[/bold]{default}: launch {d['launch_us']} us, poll {d['poll_us']} us, "
                  f"FLOP efficiency {cal.flops_efficiency}, share change at {cal.share_change} boundary; {cal.source}")


@group.command("run-trace")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="edf-slice", show_default=True)
@click.option("--compare", is_flag=True, help="Run every scheduler on the trace and compare.")
@click.option("--drop", type=click.Choice(DROP_MODES), default=None,
              help="Drop tasks known infeasible (default: off for baselines, estimated for edf-slice*).")
@click.option("--backend", type=click.Choice(["auto", "cupy", "simulated"]), default="auto", show_default=True)
@click.option("--gpu", default="A100", show_default=True, help="Simulated GPU type.")
@click.option("--sharing", type=click.Choice(SCHED_MODES), default="timeslice-best-effort", show_default=True,
              help="How the simulated GPU is shared with the background VMs.")
@click.option("--share", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--background-vms", type=click.IntRange(0, 64), default=0, show_default=True)
@click.option("--duty", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tasks-csv", type=click.Path(path_type=Path), help="Write per-task results here.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def run_trace_cmd(
    trace: Path,
    scheduler: str,
    compare: bool,
    drop: str | None,
    backend: str,
    gpu: str,
    sharing: str,
    share: float,
    background_vms: int,
    duty: float,
    seed: int,
    tasks_csv: Path | None,
    as_json: bool,
) -> None:
    """Replay a function workload from TRACE (CSV: arrival_ms, deadline_ms, gflop[, task, function, blocks];
    deadline_ms is relative to the arrival) and report tasks meeting their deadline."""
    try:
        tasks = load_trace(trace)
    except TraceError as exc:
        raise GpuCliError(f"{trace}: {exc}") from None
    bg = BackgroundLoad(vms=background_vms, duty=duty, seed=seed + 1) if background_vms else None
    results = []
    for name in SCHEDULERS if compare else (scheduler,):
        b = _select(backend, gpu, sharing, seed)
        try:
            results.append(run_trace(b, tasks, name, share=share, drop=drop, background=bg))
        except GpuError as exc:
            raise GpuCliError(str(exc)) from None
    if tasks_csv is not None:
        import csv

        rows = [dict(scheduler=r.scheduler, **row) for r in results for row in r.rows]
        try:
            with tasks_csv.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        except OSError as exc:
            raise GpuCliError(f"cannot write {tasks_csv}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps([r.summary() for r in results], indent=2))
        return
    t = Table(title=f"{len(tasks)} tasks from {trace.name} on {b.devices()[0].name} ({b.name}, {sharing}, "
                    f"{background_vms} background VM)")  # fmt: skip
    cols = ("scheduler", "drop", "met", "missed", "dropped", "goodput", "wasted GFLOP", "wasted %", "slices",
            "makespan ms")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="right" if c not in ("scheduler", "drop") else "left")
    for r in results:
        t.add_row(r.scheduler, r.drop, str(r.met), str(r.missed), str(r.dropped), f"{r.goodput:.3f}",
                  f"{r.wasted_gflop:.2f}", f"{100 * r.wasted_fraction:.1f}", str(r.slices),
                  f"{r.makespan_s * 1e3:.2f}")  # fmt: skip
    _console().print(t)


# -- through the daemon's API ------------------------------------------------------------------
def _api(method: str, path: str, body: Any = None) -> Any:
    from symbiont.cli import Ctx, api

    ctx = click.get_current_context().find_object(Ctx)
    if ctx is None:  # the group invoked on its own (tests): default socket
        ctx = Ctx(None, None)
    return api(ctx, method, path, body)


def _gpus_table(gpus: list[dict[str, Any]]) -> Table:
    t = Table(title="GPUs of the daemon")
    for c in ("id", "kind", "type", "server", "sharing", "SMs", "memory GiB", "clients"):
        t.add_column(c)
    for g in gpus:
        t.add_row(g["id"], g["kind"], g["type"], g["server"], g["sched"], str(g["sm_count"]),
                  f"{g['mem_bytes'] / 2**30:.1f}", str(len(g.get("clients", []))))  # fmt: skip
    return t


@group.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus_cmd(as_json: bool) -> None:
    """GPUs registered with the daemon (configured and added through the API)."""
    gpus = [_api("GET", f"/v1/gpu/gpus/{g['id']}") for g in _api("GET", "/v1/gpu/gpus")]
    if as_json:
        click.echo(json.dumps(gpus, indent=2))
        return
    _console().print(_gpus_table(gpus))


@group.command("register")
@click.argument("gpu_type", required=False)
@click.option("--server", default="server0", show_default=True, help="Server the simulated GPU sits in.")
@click.option("--sharing", type=click.Choice(SCHED_MODES), default="spatial", show_default=True)
@click.option("--cuda", "cuda_index", type=click.IntRange(0), help="Register CUDA device INDEX instead.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def register_cmd(gpu_type: str | None, server: str, sharing: str, cuda_index: int | None, as_json: bool) -> None:
    """Register a simulated GPU of GPU_TYPE (A100, V100, T4, H100) or a CUDA device (--cuda N)."""
    if (gpu_type is None) == (cuda_index is None):
        raise GpuCliError("give a GPU type or --cuda INDEX (one of them)")
    body: dict[str, Any] = ({"kind": "cupy", "index": cuda_index} if cuda_index is not None
                            else {"kind": "simulated", "type": gpu_type, "server": server, "sharing": sharing})  # fmt: skip
    g = _api("POST", "/v1/gpu/gpus", body)
    if as_json:
        click.echo(json.dumps(g, indent=2))
        return
    _console().print(f"registered {g['id']}: {g['kind']} {g['type']} in {g['server']} ({g['sched']})")


def _clients_table(clients: list[dict[str, Any]]) -> Table:
    t = Table(title="GPU endpoint clients")
    for c in ("client", "gpu", "share", "effective", "critical", "memory used / quota", "buffers", "state"):
        t.add_column(c)
    for c in clients:
        if c.get("state") == "orphaned":
            t.add_row(c["client"], c["gpu"], f"{c['sm_share']:.3g}", "-", str(c["critical"]),
                      f"- / {c['mem_bytes']}", "-", f"orphaned: {c['reason']}")  # fmt: skip
            continue
        t.add_row(c["client"], c["gpu"], f"{c['sm_share']:.3g}", f"{c['effective_share']:.3g}", str(c["critical"]),
                  f"{c['mem_used']} / {c['mem_quota']}", str(c["buffers"]), "active")  # fmt: skip
    return t


@group.command("clients")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def clients_cmd(as_json: bool) -> None:
    """Endpoint clients with their quotas (persisted; re-applied when the daemon restarts)."""
    clients = _api("GET", "/v1/gpu/clients")
    if as_json:
        click.echo(json.dumps(clients, indent=2))
        return
    _console().print(_clients_table(clients))


@group.command("quota")
@click.argument("client")
@click.option("--gpu", help="GPU id (needed when the client is new).")
@click.option("--share", type=click.FloatRange(0.0, 1.0, min_open=True), help="SM share (vertical scaling).")
@click.option("--mem-mib", type=click.IntRange(1), help="Device-memory quota in MiB.")
@click.option("--critical/--no-critical", default=None, help="A critical client's share is a guarantee.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def quota_cmd(client: str, gpu: str | None, share: float | None, mem_mib: int | None, critical: bool | None,
              as_json: bool) -> None:  # fmt: skip
    """Create CLIENT with quotas, or change them; a share change is a vertical scaling (timed)."""
    body = {"gpu": gpu, "sm_share": share, "mem_bytes": None if mem_mib is None else mem_mib << 20,
            "critical": critical}  # fmt: skip
    r = _api("PUT", f"/v1/gpu/clients/{client}", {k: v for k, v in body.items() if v is not None})
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    c = r["client"]
    verb = "created" if r["created"] else "updated"
    line = f"{verb} {c['client']} on {c['gpu']}: share {c['sm_share']:.3g} (effective {c['effective_share']:.3g})"
    sc = r.get("scale")
    if sc:
        eff = "pending" if sc["effect_s"] is None else f"{1e3 * (sc['control_wall_s'] + sc['effect_s']):.3f} ms"
        line += f"; scaled {sc['old_share']:.3g} -> {sc['new_share']:.3g} in {eff}"
    _console().print(line)


@group.command("delete")
@click.argument("client")
def delete_cmd(client: str) -> None:
    """Remove CLIENT: its device memory is freed and its quotas forgotten."""
    _api("DELETE", f"/v1/gpu/clients/{client}")
    _console().print(f"deleted {client}")


@group.command("migrate")
@click.argument("client")
@click.argument("gpu")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def migrate_cmd(client: str, gpu: str, as_json: bool) -> None:
    """Horizontal scaling: move CLIENT with its device buffers to GPU."""
    r = _api("POST", f"/v1/gpu/clients/{client}/migrate", {"gpu": gpu})
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    _console().print(f"moved {client} {r['src_gpu']} -> {r['dst_gpu']}: {r['nbytes']} bytes in {r['buffers']} "
                     f"buffers, downtime {1e3 * r['downtime_s']:.3f} ms")  # fmt: skip


@group.command("submit")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--gpu", required=True, help="GPU id to run on.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="edf-slice", show_default=True)
@click.option("--drop", type=click.Choice(DROP_MODES), default=None)
@click.option("--share", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--background-vms", type=click.IntRange(0, 64), default=0, show_default=True)
@click.option("--duty", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def submit_cmd(trace: Path, gpu: str, scheduler: str, drop: str | None, share: float, background_vms: int,
               duty: float, seed: int, as_json: bool) -> None:  # fmt: skip
    """Run the FaaS workload in TRACE (CSV, as for run-trace) on the daemon; results are kept there."""
    try:
        text = trace.read_text()
    except OSError as exc:
        raise GpuCliError(f"cannot read trace {trace}: {exc.strerror or exc}") from None
    body = {"gpu": gpu, "scheduler": scheduler, "drop": drop, "share": share, "trace_csv": text,
            "background_vms": background_vms, "duty": duty, "seed": seed}  # fmt: skip
    r = _api("POST", "/v1/gpu/workloads", body)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    s = r["summary"]
    _console().print(f"{r['id']} on {r['gpu']} ({s['scheduler']}): {s['met']} of {s['tasks']} tasks met their "
                     f"deadline, {s['missed']} missed, {s['dropped']} dropped")  # fmt: skip


@group.command("workloads")
@click.argument("workload", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def workloads_cmd(workload: str | None, as_json: bool) -> None:
    """Workloads the daemon ran (or one of them, with per-task results)."""
    if workload is not None:
        w = _api("GET", f"/v1/gpu/workloads/{workload}")
        if as_json:
            click.echo(json.dumps(w, indent=2))
            return
        t = Table(title=f"{w['id']} on {w['gpu']}: {w['status']}")
        cols = list(w["tasks"][0]) if w["tasks"] else []
        for c in cols:
            t.add_column(c)
        for row in w["tasks"]:
            t.add_row(*(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols))
        _console().print(t)
        return
    ws = _api("GET", "/v1/gpu/workloads")
    if as_json:
        click.echo(json.dumps(ws, indent=2))
        return
    t = Table(title="GPU workloads")
    for c in ("id", "gpu", "status", "scheduler", "tasks", "met", "missed", "dropped", "goodput"):
        t.add_column(c)
    for w in ws:
        s = w["summary"] or {}
        t.add_row(w["id"], w["gpu"], w["status"], str(s.get("scheduler", "-")), str(s.get("tasks", "-")),
                  str(s.get("met", "-")), str(s.get("missed", "-")), str(s.get("dropped", "-")),
                  f"{s['goodput']:.3f}" if "goodput" in s else "-")  # fmt: skip
    _console().print(t)
