"""``symbiont cluster``: bring a multi-host lab up/down, run the cluster controller, execute plans."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

DEFAULT_DIR = "results/cluster"


def _fail(msg: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


@click.group("cluster")
def group() -> None:
    """A multi-host lab on this machine, and the cluster controller (docs/cluster.md)."""


def _step(s: str) -> None:
    from datetime import datetime

    click.echo(f"[{datetime.now():%H:%M:%S}] {s}", err=True)


@group.command("up")
@click.option("--hosts", "n_hosts", type=int, default=2, show_default=True, help="lab hosts (namespaces)")
@click.option("--vms-per-host", default="1", show_default=True, help="a number, or one per host: 2,0,1")
@click.option("--memory-mib", type=int, default=256, show_default=True)
@click.option("--name", default="symc", show_default=True, help="prefix of namespaces, links and VMs")
@click.option("--subnet", default="10.213.0.0/24", show_default=True, help="private, only inside the namespaces")
@click.option("--dir", "work_dir", default=DEFAULT_DIR, show_default=True, help="state file, inventory, logs")
@click.option("--period", type=float, default=1.0, show_default=True, help="the host daemons' control period")
@click.option("--cpu-overcommit", type=float, default=1.0, show_default=True,
              help="vCPUs per core each host's daemon offers plans (placement.overcommit.cpu)")
def up_cmd(n_hosts: int, vms_per_host: str, memory_mib: int, name: str, subnet: str, work_dir: str,
           period: float, cpu_overcommit: float) -> None:  # fmt: skip
    """Bring up H lab hosts (netns + libvirtd + symbiontd each) on a bridge, with VMs booted."""
    from symbiont.cluster.lab import ClusterError, ClusterLab, parse_counts

    try:
        lab = ClusterLab(hosts=n_hosts, vms_per_host=parse_counts(vms_per_host, n_hosts), name=name,
                         subnet=subnet, work_dir=Path(work_dir), memory_mib=memory_mib, period_s=period,
                         overcommit={"cpu": cpu_overcommit}, step=_step)  # fmt: skip
        state = lab.up()
    except ClusterError as exc:
        _fail(str(exc))
    for e in state["hosts"]:
        click.echo(f"{e['id']}: {e['address']} libvirt {e['libvirt_uri']} daemon {e['daemon']} "
                   f"VMs {', '.join(e['vms']) or '-'}")  # fmt: skip


@group.command("down")
@click.option("--name", default="symc", show_default=True)
@click.option("--dir", "work_dir", default=DEFAULT_DIR, show_default=True)
def down_cmd(name: str, work_dir: str) -> None:
    """Stop the lab's daemons and libvirtds, remove its VMs and namespaces."""
    from symbiont.cluster.lab import ClusterError, ClusterLab, load_state

    try:
        st = load_state(work_dir) or {}
        lab = ClusterLab(hosts=max(len(st.get("hosts", [])), 1), vms_per_host=[0] * max(len(st.get("hosts", [])), 1),
                         name=st.get("name", name), work_dir=Path(work_dir), step=_step)  # fmt: skip
        out = lab.down()
    except ClusterError as exc:
        _fail(str(exc))
    click.echo(f"removed: daemons {out['daemons']}, VMs {out['vms']}, libvirtds {out['instances']}, "
               f"namespaces {out['namespaces']}")  # fmt: skip


def _controller(cluster: str | None, daemons: tuple[str, ...], journal: str | None, **kw: Any) -> Any:
    from symbiont.cluster.controller import Controller, ControllerConfig, hosts_from_cluster

    if cluster:
        hosts, netns, unsafe = hosts_from_cluster(cluster)
        kw.setdefault("unsafe", unsafe)
    elif daemons:
        hosts, netns = {}, ""
    else:
        _fail("give --cluster DIR (a lab from 'cluster up') or --hosts SOCK...")
    cfg = ControllerConfig(hosts=hosts, daemons=list(daemons), netns=netns,
                           journal=Path(journal or _default_journal(cluster)), **kw)  # fmt: skip
    return Controller(cfg)


def _default_journal(cluster: str | None) -> Path:
    base = Path(cluster or ".")
    return (base.parent if base.is_file() else base) / "controller.sqlite"


_common = [
    click.option("--cluster", "cluster", default=None,
                 help="a lab's folder (its cluster.yaml), or a YAML file with real hosts: hosts: [{id, libvirt_uri, daemon, migrate_uri}]"),
    click.option("--hosts", "daemons", multiple=True, help="a host daemon's socket (or URL); repeat"),
    click.option("--journal", default=None, help="sqlite journal (default: <cluster>/controller.sqlite)"),
]


def _opts(f: Any) -> Any:
    for o in reversed(_common):
        f = o(f)
    return f


@group.command("controller")
@_opts
@click.option("--dry-run", is_flag=True, help="plan and log decisions, change nothing")
@click.option("--period", type=float, default=10.0, show_default=True, help="seconds between rounds")
@click.option("--rounds", type=int, default=0, help="stop after N rounds (0: run until SIGTERM)")
@click.option("--max-migrations", type=int, default=2, show_default=True, help="per round")
@click.option("--cooldown", type=float, default=120.0, show_default=True, help="seconds before a VM moves again")
@click.option("--idle-host", default="", help="the host idle VMs are consolidated on (empty: no idle plans)")
@click.option("--idle-window", type=int, default=12, show_default=True,
              help="idle: CPU below --idle-cpu in this many newest agent samples")
@click.option("--idle-cpu", type=float, default=0.05, show_default=True, help="idle: CPU fraction of the vCPUs")
@click.option("--idle-wss-max", type=float, default=64.0, show_default=True,
              help="idle: working set (guest memory in use, MiB) at most this")
@click.option("--wake-samples", type=int, default=2, show_default=True,
              help="a parked VM wakes when this many newest CPU samples reach wake_cpu (one can be noise)")
@click.option("--cpu-threshold", type=float, default=0.75, show_default=True, help="hotspot CPU fraction")
@click.option("--mem-threshold", type=float, default=0.75, show_default=True, help="hotspot memory fraction")
@click.option("--mode", type=click.Choice(["black-box", "gray-box"]), default="gray-box", show_default=True,
              help="gray-box: the hypervisor's series where present, else the guest agent's")
def controller_cmd(cluster: str | None, daemons: tuple[str, ...], journal: str | None, dry_run: bool,
                   period: float, rounds: int, max_migrations: int, cooldown: float, idle_host: str,
                   idle_window: int, idle_cpu: float, idle_wss_max: float, wake_samples: int, cpu_threshold: float,
                   mem_threshold: float, mode: str) -> None:  # fmt: skip
    """Poll every host's daemon, detect hotspots (Sandpiper) and idle VMs, execute plans, forever."""
    import logging
    import signal
    import threading

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        ctl = _controller(cluster, daemons, journal, dry_run=dry_run, period_s=period,
                          max_migrations=max_migrations, cooldown_s=cooldown, idle_host=idle_host,
                          idle={"window": idle_window, "cpu_threshold": idle_cpu, "wss_max_mib": idle_wss_max,
                                "wake_samples": wake_samples},
                          thresholds={"cpu": cpu_threshold, "mem": mem_threshold}, mode=mode)  # fmt: skip
    except ValueError as exc:
        _fail(str(exc))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for rnd in ctl.run(stop, rounds=rounds or None):
        click.echo(json.dumps(rnd, default=str))


@group.command("execute")
@_opts
@click.argument("plan_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--yes", is_flag=True, help="really execute (default: check and show)")
def execute_cmd(cluster: str | None, daemons: tuple[str, ...], journal: str | None, plan_path: str,
                yes: bool) -> None:  # fmt: skip
    """Check a plan (moves, idle actions) against the live cluster and execute it, journaled."""
    try:
        ctl = _controller(cluster, daemons, journal, dry_run=not yes)
        if yes:  # a dry run changes nothing, not even what a dead controller left
            ctl.resume()
        res = ctl.execute_plan(json.loads(Path(plan_path).read_text()), source=f"file {plan_path}")
    except (ValueError, json.JSONDecodeError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(res, indent=2, default=str))
    if res["state"] == "refused":
        sys.exit(2)
    if res["state"] == "failed":
        sys.exit(1)


@group.command("resume")
@_opts
def resume_cmd(cluster: str | None, daemons: tuple[str, ...], journal: str | None) -> None:
    """Finish or roll back what a killed controller left half done (also done at every start)."""
    try:
        ctl = _controller(cluster, daemons, journal)
        click.echo(json.dumps(ctl.resume(), indent=2, default=str))
    except ValueError as exc:
        _fail(str(exc))


@group.command("journal")
@_opts
@click.option("--limit", type=int, default=50, show_default=True)
def journal_cmd(cluster: str | None, daemons: tuple[str, ...], journal: str | None, limit: int) -> None:
    """The controller's decisions (newest last) with their inputs."""
    from symbiont.cluster.journal import Journal

    path = Path(journal or _default_journal(cluster))
    if not path.exists():
        _fail(f"{path}: no journal")
    with Journal(path) as j:
        click.echo(json.dumps({"plans": j.plans(limit), "decisions": j.decisions(limit), "hosts": j.hosts()},
                              indent=2, default=str))  # fmt: skip
