"""The research groups of the ``symbiont`` command: ``image``, ``lab`` and ``experiment``.

They live here, not in :mod:`symbiont.cli`, so that the daemon's package carries no lab or
experiment code; :func:`symbiont.cli._add_part_groups` adds :data:`groups` when this package
is installed (found through :func:`symbiont.plugins.research`).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from symbiont.cli import Ctx, console, emit, err, fail
from symbiont.config import Config


# -- image / lab -----------------------------------------------------------------------------
@click.group()
def image() -> None:
    """The golden guest image (debootstrap, cached by recipe hash)."""


@image.command("build")
@click.option("--force", is_flag=True, help="rebuild even if the recipe is unchanged")
@click.pass_obj
def image_build(ctx: Ctx, force: bool) -> None:
    """Build (or reuse) the golden Debian bookworm image with the guest agent."""
    img = build_image_with_progress(ctx.cfg, force)
    console.print(f"image {img.recipe_digest} {'reused' if img.reused else 'built'}: {img.dir}")


def build_image_with_progress(cfg: Config, force: bool = False):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from symbiont_research.lab.image import ImageError, build_image, make_recipe

    try:
        recipe = make_recipe(cfg.lab.mirror)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err) as p:
            task = p.add_task("image", total=None)
            return build_image(
                Path(cfg.lab.images_dir), Path(cfg.lab.cache_dir), recipe, force,
                step=lambda s: p.update(task, description=f"image: {s}"),
            )
    except ImageError as exc:
        fail(str(exc))


@click.group()
def lab() -> None:
    """Lab VMs through libvirt: each boots from its own overlay on the golden image."""


@lab.command("up")
@click.argument("count", type=click.IntRange(1, 64))
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait for each agent's hello")
@click.option("--timeout", type=float, default=300, show_default=True)
@click.option("--prefix", help="VM name prefix (default: lab.vm_prefix of the config)")
@click.option("--peer-link", is_flag=True,
              help="give VMs 1 and 2 a private L2 link inside a network namespace (migration network path)")
@click.option("--reclaim", is_flag=True, help="take over same-named domains whose owner run is provably dead")
@click.pass_obj
def lab_up(ctx: Ctx, count: int, wait: bool, timeout: float, prefix: str | None, peer_link: bool,
           reclaim: bool) -> None:
    """Boot COUNT lab VMs (builds the image first if needed).

    The VMs belong to the lab of their prefix: 'lab up'/'lab down' with the same prefix reuse
    and remove them; domains of another run (an experiment, another prefix) are refused."""
    from symbiont.host.libvirt_host import ensure_libvirtd
    from symbiont_research.lab import vms
    from symbiont_research.lab.peerlink import PeerLinkError

    cfg = _lab_cfg(ctx, prefix)
    started = ensure_libvirtd()
    if started:
        console.print(f"started {', '.join(started)}")
    img = build_image_with_progress(cfg)
    host = _host(ctx)
    try:
        made = vms.lab_up(host, cfg, img, count, on_vm=lambda n: console.print(f"{n}: started"),
                          peer_link=peer_link, reclaim=reclaim)
        if peer_link:
            from symbiont_research.lab.peerlink import PeerLink

            link = PeerLink(vms.lab_peer_ids(cfg.lab.vm_prefix))
            console.print(f"peer link: {made[0].name} <-> {made[1].name} on a bridge in netns {link.netns}")
        if wait:
            for vm in made:
                t0 = time.monotonic()
                with console.status(f"{vm.name}: waiting for the agent's hello"):
                    hello = vms.wait_for_agent(vm.channel, timeout)
                console.print(f"{vm.name}: agent {hello.get('version')} up ({time.monotonic() - t0:.1f}s), caps {hello.get('caps')}")
    except (vms.LabError, PeerLinkError) as exc:
        fail(str(exc))


@lab.command("down")
@click.option("--prefix", help="VM name prefix (default: lab.vm_prefix of the config)")
@click.option("--reclaim", is_flag=True,
              help="also remove domains under the prefix whose owner run is provably dead (crashed experiments)")
@click.pass_obj
def lab_down(ctx: Ctx, prefix: str | None, reclaim: bool) -> None:
    """Remove every VM 'lab up' made (domains, overlays, sockets, peer link) and nothing else.

    Domains of other runs under the same prefix (a running experiment's) are left alone and named."""
    from symbiont_research.lab import vms

    try:
        removed, kept = vms.lab_down(_host(ctx), _lab_cfg(ctx, prefix), reclaim=reclaim)
    except vms.LabError as exc:
        fail(str(exc))
    console.print(f"removed {len(removed)} lab VMs: {', '.join(removed) or '-'}")
    for line in kept:
        err.print(f"kept {line}", highlight=False)


def _lab_cfg(ctx: Ctx, prefix: str | None) -> Config:
    import dataclasses

    if prefix is None:
        return ctx.cfg
    if not prefix or "/" in prefix:
        fail(f"--prefix {prefix!r}: must be a plain name", 2)
    return dataclasses.replace(ctx.cfg, lab=dataclasses.replace(ctx.cfg.lab, vm_prefix=prefix))


@lab.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def lab_list(ctx: Ctx, as_json: bool) -> None:
    """List the lab's VMs as libvirt sees them."""
    from symbiont_research.lab import vms

    rows = vms.list_lab(_host(ctx), ctx.cfg)
    t = Table(title="lab VMs")
    for col in ("name", "state", "type", "memory MiB", "vCPUs", "owner", "channel"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["state"], r["type"], f"{r['memory_mib']}/{r['max_memory_mib']}",
                  f"{r['vcpus']}/{r['max_vcpus']}", f"{r['owner']} [{r['owner_state']}]", str(r["channel"]))
    emit(rows, as_json, t)


def _host(ctx: Ctx):
    from symbiont.host.libvirt_host import LibvirtError, LibvirtHost
    from symbiont.host.system import quiet_libvirt_errors

    quiet_libvirt_errors()
    try:
        return LibvirtHost(ctx.cfg.libvirt_uri)
    except LibvirtError as exc:
        fail(f"{exc} (is libvirtd running? 'symbiont lab up' starts it)")


# -- experiments -----------------------------------------------------------------------------
@click.group()
def experiment() -> None:
    """Run experiments: each writes results/NAME/TIMESTAMP/ with CSV, PNG and run.json."""


@experiment.command("list")
@click.option("--json", "as_json", is_flag=True)
def experiment_list(as_json: bool) -> None:
    """List experiments with their parameters."""
    from symbiont_research.experiments.framework import registry

    reg = registry()
    rows = [{"name": e.name, "part": e.part, "needs": sorted(e.needs), "summary": e.summary,
             "params": dict(e.params)} for e in reg.values()]
    t = Table(title="experiments")
    for col in ("name", "part", "needs", "summary", "parameters (defaults)"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["name"], r["part"], ",".join(r["needs"]) or "-", r["summary"],
                  " ".join(f"{k}={v}" for k, v in r["params"].items()))
    emit(rows, as_json, t)


@experiment.command("run")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a parameter (repeatable)")
@click.option("--results", default="results", show_default=True, help="results root folder")
@click.option("--no-progress", is_flag=True, help="no progress bar (for logs)")
def experiment_run(name: str, overrides: tuple[str, ...], results: str, no_progress: bool) -> None:
    """Run experiment NAME; see 'symbiont experiment list' for names and parameters."""
    from symbiont_research.experiments.framework import ExperimentError, run_experiment

    try:
        out, summary = run_experiment(name, overrides, Path(results), show_progress=not no_progress)
    except ExperimentError as exc:
        fail(str(exc), 2)
    console.print(f"[bold]{name}[/bold] done: {out}")
    for k, v in summary.items():
        console.print(f"  {k}: {v}")


groups = [image, lab, experiment]
