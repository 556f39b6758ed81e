"""``symbiont migration`` (list, show) and ``symbiont ct migrate VM CT --to VM2``.

``ct migrate`` is attached to the container group of the CPU part (``symbiont ct``), where a
user looks for it; it starts the migration through ``/v1/migration`` and follows its phases
with a progress display until it is ``done`` (exit 0) or ``aborted`` (exit 1: the container
still runs on the source).
"""

from __future__ import annotations

import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from symbiont.cli import Ctx, api, call_and_show, console, emit, fail
from symbiont.cpu.cli import group as ct_group

STEPS = ("check", "predump", "dump", "transfer", "restore", "confirm", "cleanup", "done")


def _table(ms: list[dict[str, Any]]) -> Table:
    t = Table(title="migrations")
    for col in (
        "id",
        "container",
        "from",
        "to",
        "path",
        "rate",
        "phase",
        "MiB",
        "downtime s",
        "total s",
        "error",
    ):
        t.add_column(col, overflow="fold")
    for m in ms:
        tm = m.get("timings", {})
        moved = m.get("progress", {}).get("moved")
        t.add_row(
            m["id"], m["ct"], m["vm"], m["dest"], m["path"], m["rate"], m["phase"],
            "" if moved is None else f"{moved / 2**20:.1f}", str(tm.get("downtime_s", "")),
            str(tm.get("total_s", "")), m.get("error", "")[:80],
        )  # fmt: skip
    return t


def show_result(m: dict[str, Any]) -> None:
    console.print(_table([m]))
    tm = m.get("timings", {})
    console.print("phases (s): " + ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in tm.items()))
    cpu = m.get("result", {}).get("host_cpu") or {}
    if cpu:
        console.print(
            "host CPU %: source QEMU {s}, destination QEMU {d}, daemon {a} over {w} s".format(
                s=cpu.get("source_qemu_cpu_pct"), d=cpu.get("dest_qemu_cpu_pct"),
                a=cpu.get("daemon_cpu_pct"), w=cpu.get("wall_s"),
            )
        )  # fmt: skip


def follow(ctx: Ctx, mid: str, timeout: float = 1800.0) -> dict[str, Any]:
    """Poll a migration until it ends, showing its phase and bytes moved."""
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:  # fmt: skip
        task = prog.add_task(f"migration {mid}", total=len(STEPS), info="")
        while True:
            m = api(ctx, "GET", f"/v1/migration/{mid}")
            phase = m["phase"]
            moved = m.get("progress", {}).get("moved", 0)
            prog.update(
                task, completed=STEPS.index(phase) + 1 if phase in STEPS else len(STEPS),
                info=f"{phase}  {moved / 2**20:.1f} MiB moved",
            )  # fmt: skip
            if phase in ("done", "aborted") and not m.get("running"):
                return m
            if time.monotonic() > deadline:
                fail(f"migration {mid} still in phase {phase} after {timeout:.0f} s", 1)
            time.sleep(0.5)


@ct_group.command("migrate")
@click.argument("vm")
@click.argument("name")
@click.option("--to", "dest", required=True, help="destination VM")
@click.option(
    "--path",
    type=click.Choice(["relay", "network"]),
    default="relay",
    help="relay: images over virtio-serial through the daemon (Portkey); network: guest TCP",
)
@click.option(
    "--channel",
    type=click.Choice(["serial", "shm"]),
    default=None,
    help="relay data channel: shm (the default: a shared region per VM, one host copy) or serial frames",
)
@click.option(
    "--rate", type=click.Choice(["adaptive", "fixed"]), default="adaptive", help="relay send pacing"
)
@click.option(
    "--rate-mbps",
    type=float,
    default=64.0,
    show_default=True,
    help="fixed send rate, and the adaptive sender's first bandwidth estimate",
)
@click.option(
    "--predumps", type=int, default=4, show_default=True, help="at most this many pre-copy iterations, fewer once converged (0: stop-and-copy)"
)
@click.option("--window-kib", type=int, default=16384, show_default=True, help="relay window (send buffer)")
@click.option("--lazy", is_flag=True,
              help="lazy restore: the container runs before its memory is back (CRIU lazy pages); meant to "
                   "keep the freeze from growing with its size, measured slower under TCG (off by default)")  # fmt: skip
@click.option("--no-wait", is_flag=True, help="start it and print its id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ct_migrate(ctx: Ctx, vm: str, name: str, dest: str, path: str, channel: str | None, rate: str, rate_mbps: float,
               predumps: int, window_kib: int, lazy: bool, no_wait: bool, as_json: bool) -> None:  # fmt: skip
    """Migrate container NAME from VM to another VM with CRIU (pre-copy, dump, transfer, restore)."""
    body = {"vm": vm, "ct": name, "to": dest, "path": path, "rate": rate, "rate_mbps": rate_mbps,
            "predumps": predumps, "window_kib": window_kib}  # fmt: skip
    if channel is not None:
        body["channel"] = channel
    if lazy:
        body["lazy"] = True
    m = api(ctx, "POST", "/v1/migration", body)
    if no_wait:
        emit(m, as_json, _table([m]))
        return
    m = follow(ctx, m["id"])
    if as_json:
        emit(m, True)
    else:
        show_result(m)
    if m["phase"] != "done":
        fail(f"migration {m['id']} aborted: {m.get('error')} (the container still runs on {vm})", 1)


@click.group(name="migration")
def group() -> None:
    """Container migrations between VMs (start one with 'symbiont ct migrate')."""


@group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def mig_list(ctx: Ctx, as_json: bool) -> None:
    """The migration journal, newest first."""
    call_and_show(ctx, "GET", "/v1/migration", as_json, lambda data: console.print(_table(data["migrations"])))


@group.command("show")
@click.argument("mid")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def mig_show(ctx: Ctx, mid: str, as_json: bool) -> None:
    """One migration: phases, timings, bytes, host CPU."""
    call_and_show(ctx, "GET", f"/v1/migration/{mid}", as_json, show_result)


@group.command("recover")
@click.pass_obj
def mig_recover(ctx: Ctx) -> None:
    """Resolve unfinished migrations now (the daemon also does it every period)."""
    emit(api(ctx, "POST", "/v1/migration/recover"), True)
