"""``symbiont gpu``: list backends and devices, show the GPU presets, replay a FaaS trace."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from symbiont.gpu.backend import GpuBackend, GpuError, cupy_status, select_backend
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
