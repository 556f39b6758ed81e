"""The ``symbiont`` command line: the lab, the daemon's API, experiments.

Human tables (rich) by default, ``--json`` for scripts. Errors are one clear line on stderr
and exit status 2 (bad input) or 1 (operation failed).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from symbiont.client import ApiError, Client
from symbiont.config import Config, ConfigError, load_config
from symbiont.plugins import part_modules, research

# Piped output (logs, scripts, CI) gets full rows instead of the 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


class Ctx:
    def __init__(self, config_path: str | None, socket: str | None) -> None:
        self.config_path = config_path
        self._socket = socket
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            try:
                self._cfg = load_config(self.config_path)
            except ConfigError as exc:
                fail(f"config error: {exc}", 2)
        return self._cfg

    def client(self) -> Client:
        return Client(self._socket or self.cfg.socket)


def fail(msg: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {msg}", highlight=False)
    sys.exit(code)


def emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif table is not None:
        console.print(table)


def api(ctx: Ctx, method: str, path: str, body: Any = None, **params: Any) -> Any:
    try:
        with ctx.client() as c:
            return c.call(method, path, json=body, params=params or None)
    except ApiError as exc:
        fail(exc.detail if exc.status == 0 else f"{exc.status} {exc.detail}", 2 if 400 <= exc.status < 500 else 1)


def call_and_show(ctx: Ctx, method: str, path: str, as_json: bool, show: Callable[[Any], object],
                  body: Any = None, **params: Any) -> Any:
    """A command's one round trip: call the API, then print the answer as JSON (``--json``) or
    through ``show`` (a line, a table); returns the answer. One place for what every command did."""
    r = api(ctx, method, path, body, **params)
    if as_json:
        emit(r, True)
    else:
        show(r)
    return r


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", envvar="SYMBIONT_CONFIG", help="YAML config (daemon socket, lab paths).")
@click.option("--socket", envvar="SYMBIONT_SOCKET", help="daemon API socket (default: from the config).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, socket: str | None) -> None:
    """symbiont: symbiotic resource management for VMs.

    The host daemon (symbiontd) decides how much memory, CPU, SSD cache and GPU each VM gets;
    the guest agent decides what to give up. This command drives the daemon's API, the VM lab
    and the experiments.
    """
    ctx.obj = Ctx(config_path, socket)


# -- status / vm -----------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def status(ctx: Ctx, as_json: bool) -> None:
    """Show the daemon's health, host stats, VM summary and where each VM's memory is."""
    st = api(ctx, "GET", "/v1/status")
    vms = api(ctx, "GET", "/v1/vms")
    mem = api(ctx, "GET", "/v1/paging/memory")
    if as_json:
        emit({"status": st, "vms": vms, "memory": mem}, True)
        return
    host = st.get("host", {})
    console.print(
        f"symbiontd {st['version']} pid {st['pid']} up {st['uptime_s']:.0f}s  "
        f"period {st['period_s']}s  loop iterations {st['loop_iterations']}  samples {st['samples']}"
    )
    if host:
        console.print(
            f"host: CPU {host.get('cpu_percent', 0):.0f}%  mem available "
            f"{host.get('mem_available', 0) / 2**30:.1f}/{host.get('mem_total', 0) / 2**30:.1f} GiB  "
            f"PSI mem some10 {host.get('psi', {}).get('memory', {}).get('some_avg10', 0):.2f}"
        )
    console.print(vm_table(vms))
    console.print(memory_table(mem))


def memory_table(mem: dict[str, Any]) -> Table:
    """Each VM's configured memory, each MiB once (docs/paging.md), QEMU's overhead, the host
    footprint, and the last lever that moved for it."""
    cost = mem.get("swap_cost")
    t = Table(title="where each VM's memory is (MiB): configured = ballooned + paged out + shared + private + "
                    f"untouched; host = PSS + swapped × {_s(cost) if cost is not None else 1} (tier's cost)")
    t.add_column("name", no_wrap=True)
    cols = ("state", "configured", "guest used", "ballooned", "shared", "paged out", "private", "untouched",
            "QEMU overhead", "host", "last lever")
    for col in cols:
        t.add_column(col, justify="left" if col in ("state", "last lever") else "right")
    for v in mem.get("vms", []):
        last = v.get("last")
        lever = "-" if not last else (f"{last['part']} {last['action']} {_age(last['age_s'])} ago"
                                      + (f": {last['reason'][:60]}" if last.get("reason") else ""))
        if "error" in v:
            t.add_row(v["name"], _s(v.get("state")), *["-"] * 9, f"[red]{v['error'][:60]}[/red]")
            continue
        state = "[cyan]parked[/cyan]" if v.get("state") == "parked" else _s(v.get("state"))
        t.add_row(v["name"], state, *(_s(v.get(k)) for k in (
            "configured_mib", "guest_used_mib", "ballooned_mib", "shared_mib", "paged_out_mib", "private_mib",
            "untouched_mib", "qemu_overhead_mib", "host_mib")), lever)
    return t


def _age(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def vm_table(vms: list[dict[str, Any]]) -> Table:
    t = Table(title="VMs")
    t.add_column("name", no_wrap=True)
    for col in ("state", "agent", "balloon MiB", "guest MemTotal", "guest avail", "vCPUs", "guest online", "QEMU CPU%"):
        t.add_column(col, justify="right" if col not in ("state", "agent") else "left")
    for v in vms:
        g = v.get("guest", {})
        t.add_row(
            v["name"],
            str(v.get("state") or "?"),
            "[green]cooperative[/green]" if v["cooperative"] else "[red]uncooperative[/red]",
            _s(v.get("balloon_actual_mib") or v.get("balloon_mib")),
            _s(g.get("mem_total_mib")),
            _s(g.get("mem_available_mib")),
            f"{_s(v.get('vcpus'))}/{_s(v.get('max_vcpus'))}",
            _s(g.get("online_cpus")),
            _s(None if v.get("qemu_cpu_percent") is None else round(v["qemu_cpu_percent"])),
        )
    return t


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ping(ctx: Ctx, name: str, as_json: bool) -> None:
    """Ping a VM's agent, waking it first if it is parked (seconds include the wake)."""
    def show(r: dict[str, Any]) -> None:
        w = r.get("wake") or {}
        console.print(f"{name}: answered in {r['seconds'] * 1000:.1f} ms"
                      + (f" (woken: resume {_s(w.get('resume_s'))} s, prefetched {_s(w.get('prefetched_mib'))} MiB)"
                         if r["woke"] else ""))

    call_and_show(ctx, "POST", f"/v1/vms/{name}/ping", as_json, show)


@cli.command("console")
@click.argument("name")
@click.pass_obj
def console_(ctx: Ctx, name: str) -> None:
    """Attach to a VM's serial console (virsh console), waking it first if it is parked.

    The wake goes through the daemon's ping (the VM is resumed with its working set swapped in
    and answers its agent) before virsh attaches: a console on a paused VM would show nothing."""
    import os
    import shutil

    try:
        with ctx.client() as c:
            r = c.call("POST", f"/v1/vms/{name}/ping")
        if r.get("woke"):
            err.print(f"{name}: woken in {r['seconds']:.3f} s", highlight=False)
    except ApiError as exc:  # 409: no agent to answer — the VM was woken all the same
        if exc.status != 409:
            fail(exc.detail if exc.status == 0 else f"{exc.status} {exc.detail}", 2 if 400 <= exc.status < 500 else 1)
    virsh = shutil.which("virsh")
    if virsh is None:
        fail("virsh not found: install libvirt-clients", 1)
    os.execv(virsh, [virsh, "-c", ctx.cfg.libvirt_uri, "console", name])


@cli.group()
def vm() -> None:
    """Register, inspect and steer VMs through the daemon."""


@vm.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def vm_list(ctx: Ctx, as_json: bool) -> None:
    """List registered VMs with live stats."""
    call_and_show(ctx, "GET", "/v1/vms", as_json, lambda vms: console.print(vm_table(vms)))


@vm.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def vm_show(ctx: Ctx, name: str, as_json: bool) -> None:
    """Show one VM: policy, agent session, stats, knobs the daemon changed."""
    call_and_show(ctx, "GET", f"/v1/vms/{name}", as_json, _show_vm)


def _show_vm(v: dict[str, Any]) -> None:
    console.print(vm_table([v]))
    a = v["agent"]
    console.print(f"agent: connected={a['connected']} handshakes={a['handshakes']} "
                  f"protocol_errors={a['protocol_errors']} timeouts={a['timeouts']} caps={(a['hello'] or {}).get('caps')}")
    if a["last_error"]:
        console.print(f"last agent error: {a['last_error']}")
    console.print(f"policy: {json.dumps(v['policy'])}")
    for k in v["knobs"]:
        console.print(f"knob {k['knob']}: {k['original']} -> {k['current']} (restored on unregister/stop)")


@vm.command("register")
@click.argument("name")
@click.option("--shares", type=int, default=1000, show_default=True, help="memory shares (ESX S)")
@click.option("--min-mib", type=int, help="never balloon below this")
@click.option("--max-mib", type=int, help="never give more than this")
@click.option("--min-vcpus", type=int)
@click.option("--max-vcpus", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def vm_register(ctx: Ctx, name: str, shares: int, min_mib: int | None, max_mib: int | None,
                min_vcpus: int | None, max_vcpus: int | None, as_json: bool) -> None:
    """Register a libvirt domain with its policy parameters."""
    body = {"name": name, "memory": {"shares": shares, "min_mib": min_mib, "max_mib": max_mib},
            "cpu": {"min_vcpus": min_vcpus, "max_vcpus": max_vcpus}}
    call_and_show(ctx, "POST", "/v1/vms", as_json, lambda _: console.print(f"registered {name}"), body)


@vm.command("unregister")
@click.argument("name")
@click.pass_obj
def vm_unregister(ctx: Ctx, name: str) -> None:
    """Unregister a VM; every knob the daemon changed on it is restored."""
    api(ctx, "DELETE", f"/v1/vms/{name}")
    console.print(f"unregistered {name}")


@vm.command("memory")
@click.argument("name")
@click.argument("target_mib", type=int)
@click.pass_obj
def vm_memory(ctx: Ctx, name: str, target_mib: int) -> None:
    """Set a VM's balloon target (MiB the guest keeps)."""
    r = api(ctx, "PUT", f"/v1/vms/{name}/memory", {"target_mib": target_mib})
    console.print(f"{name}: balloon {r['before_mib']} -> {r['target_mib']} MiB")


@vm.command("vcpus")
@click.argument("name")
@click.argument("count", type=int)
@click.pass_obj
def vm_vcpus(ctx: Ctx, name: str, count: int) -> None:
    """Hot-plug/unplug vCPUs; the guest agent onlines/offlines them."""
    r = api(ctx, "PUT", f"/v1/vms/{name}/vcpus", {"count": count})
    online = (r.get("guest") or {}).get("online")
    console.print(f"{name}: vCPUs {r['before']} -> {r['vcpus']}; guest online CPUs: {online}")


# -- config ----------------------------------------------------------------------------------
@cli.group("config")
def config_group() -> None:
    """Validate or print configuration."""


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate a config file; errors name the key."""
    try:
        load_config(path)
    except ConfigError as exc:
        fail(str(exc), 2)
    console.print(f"{path}: OK")


@config_group.command("default")
def config_default() -> None:
    """Print the default configuration as YAML."""
    from symbiont.config import dump_default_config

    click.echo(dump_default_config(), nl=False)


def _add_part_groups() -> None:
    research_cli = research("cli")  # image, lab, experiment: only where symbiont_research is installed
    for group in getattr(research_cli, "groups", ()):
        if group.name not in cli.commands:
            cli.add_command(group)
    for part, mod in part_modules("cli").items():
        group = getattr(mod, "group", None)
        if isinstance(group, click.Command) and (group.name or part) not in cli.commands:
            cli.add_command(group, name=group.name or part)
            for alias in getattr(mod, "ALIASES", ()):  # a part's former name, kept for a release
                if alias not in cli.commands:
                    cli.add_command(group, name=alias)


def main() -> None:
    _add_part_groups()
    cli()
