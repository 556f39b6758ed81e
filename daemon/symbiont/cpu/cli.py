"""``symbiont ct``: containers inside VMs, vCPU scaling with ratio keeping, nesting-aware balloon.

Every command talks to the daemon's ``/v1/cpu`` API; the daemon forwards container requests
to the guest's agent. Errors are one clear line on stderr, exit status 2 for bad input
(unknown VM or container, out-of-range limits) and 1 when the operation failed.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import click
from rich.table import Table

from symbiont.cli import Ctx, api, call_and_show, console


def _mib(v: Any) -> str:
    if v is None:
        return "max"
    return f"{v / 2**20:.1f}"


def _limits(cpu_weight: int | None, cpu_max: str | None, cpuset: str | None, memory_max: str | None,
            memory_high: str | None, memory_low: str | None, pids_max: int | None, no_reclaim: bool | None,
            cpu_ratio: float | None, mem_shares: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cpu_weight is not None:
        out["cpu_weight"] = cpu_weight
    if cpu_max is not None:
        try:
            out["cpu_max"] = float(cpu_max)
        except ValueError:
            out["cpu_max"] = cpu_max
    for key, val in (("cpuset", cpuset), ("memory_max", memory_max), ("memory_high", memory_high),
                     ("memory_low", memory_low)):
        if val is not None:
            out[key] = int(val) if val.isdigit() else val
    if pids_max is not None:
        out["pids_max"] = pids_max
    if no_reclaim is not None:
        out["no_reclaim"] = no_reclaim
    if cpu_ratio is not None:
        out["cpu_ratio"] = cpu_ratio
    if mem_shares is not None:
        out["mem_shares"] = mem_shares
    return out


def limit_options(fn: Any) -> Any:
    opts = [
        click.option("--cpu-weight", type=int, help="cgroup v2 cpu.weight (1..10000)"),
        click.option("--cpu-max", help="CPUs (e.g. 1.5), 'QUOTA PERIOD' in us, or 'max'"),
        click.option("--cpuset", help="pin to CPUs, e.g. '0-1,3' (must be online)"),
        click.option("--memory-max", help="bytes or e.g. 256M; 'max' for none"),
        click.option("--memory-high", help="bytes or e.g. 200M"),
        click.option("--memory-low", help="bytes or e.g. 64M (reclamation never goes below)"),
        click.option("--pids-max", type=int, help="pids.max"),
        click.option("--no-reclaim/--reclaim", "no_reclaim", default=None,
                     help="flag the container so memory is never reclaimed from it"),
        click.option("--cpu-ratio", type=float, help="ratio-managed CPU share, e.g. 1, 1 and 4 for 1:1:4"),
        click.option("--mem-shares", type=float, help="memory reclamation shares (default 100)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def ct_table(data: dict[str, Any]) -> Table:
    t = Table(title=f"containers (nesting-aware: {data.get('nesting_aware')}, strategy {data.get('cpu_strategy')}, "
                    f"online CPUs {data.get('online')})")
    for col in ("name", "state", "pid", "cpuset", "cpu.max", "weight", "ratio", "CPU s", "mem MiB",
                "high MiB", "no-reclaim", "command"):
        t.add_column(col, overflow="fold")
    for c in data.get("containers", []):
        a, u, lim = c.get("applied", {}), c.get("usage", {}), c.get("limits", {})
        cm = a.get("cpu.max") or [None, None]
        t.add_row(
            c["name"], c["state"], str(c.get("pid") or "-"), str(a.get("cpuset.cpus.effective", "-")),
            "max" if cm[0] is None else f"{cm[0] / cm[1]:.2f}", str(a.get("cpu.weight", "-")),
            str(lim.get("cpu_ratio") or "-"), f"{u.get('cpu_usage_usec', 0) / 1e6:.1f}",
            _mib(u.get("memory_current", 0)), _mib(a.get("memory.high")),
            "yes" if lim.get("no_reclaim") else "-", shlex.join(c.get("command", [])),
        )
    return t


@click.group(name="cpu")
def group() -> None:
    """Containers inside VMs (cgroup v2 + namespaces, managed by the guest agent), vCPU scaling
    with the containers' CPU ratios kept, and nesting-aware memory reclamation."""


ALIASES = ("ct",)  # the group's name until issue 14 (one name per part)


@group.command("list")
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ct_list(ctx: Ctx, vm: str, as_json: bool) -> None:
    """List VM's containers with limits in force and usage."""
    call_and_show(ctx, "GET", f"/v1/cpu/vms/{vm}/containers", as_json, lambda data: console.print(ct_table(data)))


@group.command("show")
@click.argument("vm")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ct_show(ctx: Ctx, vm: str, name: str, as_json: bool) -> None:
    """Show one container: limits, the cgroup files in force, usage, PSI."""
    call_and_show(ctx, "GET", f"/v1/cpu/vms/{vm}/containers/{name}", as_json, _show_ct)


def _show_ct(data: dict[str, Any]) -> None:
    console.print(ct_table({"containers": [data]}))
    console.print(f"cgroup {data.get('cgroup')}  log {data.get('log')}")
    console.print(f"limits: {json.dumps(data.get('limits'))}")
    console.print(f"in force: {json.dumps(data.get('applied'))}")
    u = data.get("usage", {})
    console.print(f"memory.pressure: {json.dumps(u.get('memory_pressure'))}  cpu.pressure: {json.dumps(u.get('cpu_pressure'))}")


@group.command("create", context_settings={"ignore_unknown_options": True})
@click.argument("vm")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@limit_options
@click.option("--hostname", help="UTS host name inside (default: the container's name)")
@click.option("--netns", is_flag=True, help="also a private network namespace")
@click.option("--no-start", is_flag=True, help="create only; 'ct start' later")
@click.option("--migratable", is_flag=True,
              help="start COMMAND so that CRIU can dump it ('ct migrate'): own session, stdio in the container")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ct_create(ctx: Ctx, vm: str, name: str, command: tuple[str, ...], hostname: str | None, netns: bool,
              no_start: bool, migratable: bool, as_json: bool, **lim: Any) -> None:
    """Create (and start) container NAME in VM running COMMAND (use -- before the command)."""
    argv = list(command)
    if migratable:
        from symbiont.migration.workload import migratable_command

        argv = migratable_command(name, argv)
    body: dict[str, Any] = {"name": name, "command": argv, "limits": _limits(**lim), "netns": netns,
                            "start": not no_start}
    if hostname:
        body["hostname"] = hostname
    call_and_show(ctx, "POST", f"/v1/cpu/vms/{vm}/containers", as_json, lambda data: console.print(
        f"{vm}/{name}: {data['state']} (pid {data.get('pid')}), cgroup {data.get('cgroup')}"), body)


@group.command("start")
@click.argument("vm")
@click.argument("name")
@click.pass_obj
def ct_start(ctx: Ctx, vm: str, name: str) -> None:
    """Start a created or stopped container."""
    data = api(ctx, "POST", f"/v1/cpu/vms/{vm}/containers/{name}/start")
    console.print(f"{vm}/{name}: {data['state']} (pid {data.get('pid')})")


@group.command("stop")
@click.argument("vm")
@click.argument("name")
@click.pass_obj
def ct_stop(ctx: Ctx, vm: str, name: str) -> None:
    """Stop a container (SIGTERM, then cgroup.kill)."""
    data = api(ctx, "POST", f"/v1/cpu/vms/{vm}/containers/{name}/stop")
    console.print(f"{vm}/{name}: {data['state']}")


@group.command("destroy")
@click.argument("vm")
@click.argument("name")
@click.pass_obj
def ct_destroy(ctx: Ctx, vm: str, name: str) -> None:
    """Stop and remove a container; the agent restores the cgroup values it changed for it."""
    data = api(ctx, "DELETE", f"/v1/cpu/vms/{vm}/containers/{name}")
    console.print(f"{vm}/{name}: destroyed; restored {json.dumps(data.get('restored'))}")


@group.command("set")
@click.argument("vm")
@click.argument("name")
@limit_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ct_set(ctx: Ctx, vm: str, name: str, as_json: bool, **lim: Any) -> None:
    """Change a container's limits (all validated first: on any error nothing changes)."""
    limits = _limits(**lim)
    if not limits:
        raise click.UsageError("give at least one limit option")
    call_and_show(ctx, "PATCH", f"/v1/cpu/vms/{vm}/containers/{name}", as_json,
                  lambda data: console.print(f"{vm}/{name}: in force {json.dumps(data.get('applied'))}"), limits)


@group.command("logs")
@click.argument("vm")
@click.argument("name")
@click.pass_obj
def ct_logs(ctx: Ctx, vm: str, name: str) -> None:
    """The tail of a container's output."""
    data = api(ctx, "GET", f"/v1/cpu/vms/{vm}/containers/{name}/logs")
    click.echo(data.get("tail", ""), nl=False)


@group.command("mode")
@click.argument("vm")
@click.option("--aware/--agnostic", "aware", default=None, help="nesting-aware management or the baseline")
@click.option("--strategy", type=click.Choice(["pin-share", "quota"]), help="how ratios are kept")
@click.pass_obj
def ct_mode(ctx: Ctx, vm: str, aware: bool | None, strategy: str | None) -> None:
    """Show or set how the agent manages its containers (nesting-aware or agnostic)."""
    if aware is None and strategy is None:
        data = api(ctx, "GET", f"/v1/cpu/vms/{vm}/mode")
    else:
        body: dict[str, Any] = {}
        if aware is not None:
            body["nesting_aware"] = aware
        if strategy:
            body["cpu_strategy"] = strategy
        data = api(ctx, "PUT", f"/v1/cpu/vms/{vm}/mode", body)
    console.print(f"{vm}: nesting-aware {data['nesting_aware']}, CPU strategy {data['cpu_strategy']}")


@group.command("vcpus")
@click.argument("vm")
@click.argument("count", type=int, required=False)
@click.option("--libvirt-unplug", is_flag=True,
              help="scale down also through libvirt's unplug (times out under TCG; see docs/cpu.md)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ct_vcpus(ctx: Ctx, vm: str, count: int | None, libvirt_unplug: bool, as_json: bool) -> None:
    """Show VM's vCPUs (libvirt, guest, record) or scale to COUNT, keeping containers' ratios."""
    def shown(data: dict[str, Any]) -> None:
        rec = data.get("record") or {}
        console.print(f"{vm}: guest online {data['guest_online']} {data['online']}, libvirt {data['libvirt']}"
                      f"/{data['max']}, offlined in the guest {data.get('offlined_in_guest')}; "
                      f"last requested {rec.get('requested', '-')}, QEMU {rec.get('qemu') or '-'}, "
                      f"unplug timeouts {rec.get('unplug_timeouts', 0)}")

    def scaled(data: dict[str, Any]) -> None:
        t = data.get("timings", {})
        console.print(f"{vm}: {data['before']['guest_online']} -> {data['after']['guest_online']} vCPUs online "
                      f"{data['after']['online']}; libvirt {data['after']['libvirt']} ({data['libvirt']}); "
                      f"ratios in force after {t.get('ratios_in_force_s', 0):.3f} s")

    if count is None:
        call_and_show(ctx, "GET", f"/v1/cpu/vms/{vm}/vcpus", as_json, shown)
    else:
        call_and_show(ctx, "PUT", f"/v1/cpu/vms/{vm}/vcpus", as_json, scaled,
                      {"count": count, "libvirt_unplug": libvirt_unplug})


@group.command("balloon")
@click.argument("vm")
@click.argument("target_mib", type=int)
@click.option("--aware/--stock", "aware", default=True, show_default=True,
              help="reclaim from containers by shares first, or the stock balloon only")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ct_balloon(ctx: Ctx, vm: str, target_mib: int, aware: bool, as_json: bool) -> None:
    """Move VM's balloon to TARGET_MIB, reclaiming from containers first (nesting-aware)."""
    call_and_show(ctx, "PUT", f"/v1/cpu/vms/{vm}/memory", as_json, lambda data: _show_balloon(vm, data),
                  {"target_mib": target_mib, "nesting_aware": aware})


def _show_balloon(vm: str, data: dict[str, Any]) -> None:
    rec = data.get("reclaim") or {}
    console.print(f"{vm}: balloon {data['before_mib']} -> {data['target_mib']} MiB; containers freed "
                  f"{rec.get('freed', 0) / 2**20:.1f} MiB of {rec.get('needed', 0) / 2**20:.1f} needed")
    for name, row in (rec.get("containers") or {}).items():
        console.print(f"  {name}: {row.get('status')} {row.get('freed', 0) / 2**20:.1f} MiB "
                      f"({_mib(row.get('usage_before'))} -> {_mib(row.get('usage_after'))} MiB)")
