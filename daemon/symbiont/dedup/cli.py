"""``symbiont dedup``: KSM status and policy through the daemon, and local tools (no daemon).

Through the daemon's API: ``status``, ``vms``, ``policy``, ``restore``, ``scan``.
Local, on this host: ``ksm`` (read KSM), ``estimate`` (hash a process's memory: a QEMU guest's
RAM or any process's mergeable mappings), ``backends``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from symbiont.dedup.backends import BACKENDS, PAGE_SIZE, BackendError, available_backends, select_backend

POLICY_NAMES = ["off", "stock", "ksmtuned", "hint", "fixed", "advisor"]


def _console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _api(ctx: Any, method: str, path: str, body: Any = None, **params: Any) -> Any:
    from symbiont.cli import api  # the main CLI's error handling (imported late: no cycle)

    return api(ctx, method, path, body, **params)


def _mib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _params(items: tuple[str, ...], what: str) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise click.BadParameter(f"{it!r}: expected key=value", param_hint=what)
        try:
            out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
        except ValueError:
            raise click.BadParameter(f"{it!r}: the value must be a number", param_hint=what) from None
    return out


@click.group(name="dedup")
def group() -> None:
    """Page sharing: KSM control (opt-in policies), the hashing engine, per-VM shared memory."""


@group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status_cmd(ctx: Any, as_json: bool) -> None:
    """KSM counters and settings, the active policy and its last decision."""
    st = _api(ctx, "GET", "/v1/dedup/status")
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    con = _console()
    pol = st["policy"]
    con.print(f"policy [bold]{pol['policy']}[/bold] (from {pol['source']})"
              + (f" — BLOCKED: {st['blocked']}" if st["blocked"] else ""))  # fmt: skip
    k = st.get("ksm") or {}
    t = Table(title="KSM")
    for col in ("run", "pages_to_scan", "sleep_ms", "shared", "sharing", "unshared", "volatile", "full_scans",
                "saved MiB", "ksmd CPU s"):  # fmt: skip
        t.add_column(col)
    s = k.get("settings", {})
    t.add_row(str(s.get("run")), str(s.get("pages_to_scan")), str(s.get("sleep_millisecs")),
              str(k.get("pages_shared")), str(k.get("pages_sharing")), str(k.get("pages_unshared")),
              str(k.get("pages_volatile")), str(k.get("full_scans")), _mib(k.get("saved_bytes")),
              f"{k.get('ksmd_cpu_s') or 0:.2f}")  # fmt: skip
    con.print(t)
    if st.get("decision"):
        con.print(f"last decision: {st['decision']['reason']}")
    if st.get("originals"):
        con.print(f"saved originals (restored on stop): {st['originals']}")
    for v in st.get("tenants", []):
        if v["status"] != "shared":
            con.print(f"tenant {v['vm']}: {v['status']} — {v['reason']}")


@group.command("vms")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def vms_cmd(ctx: Any, as_json: bool) -> None:
    """Each registered VM's shared and unshared guest memory and sharing potential."""
    vms = _api(ctx, "GET", "/v1/dedup/vms")
    if as_json:
        click.echo(json.dumps(vms, indent=2, default=str))
        return
    t = Table(title="VM page sharing")
    for col in ("vm", "running", "mergeable", "cross-VM", "resident MiB", "shared MiB", "unshared MiB",
                "unshared %", "potential MiB"):  # fmt: skip
        t.add_column(col)
    for v in vms:
        est = v.get("estimate") or {}
        uf = v.get("unshared_fraction")
        t.add_row(v["name"], "yes" if v["running"] else "no", str(v["mergeable"]), "yes" if v["cross_vm"] else "no",
                  _mib(v["guest_rss_bytes"]), _mib(v["shared_bytes"]), _mib(v["unshared_bytes"]),
                  "-" if uf is None else f"{100 * uf:.1f}", _mib(est.get("potential_bytes")))  # fmt: skip
    _console().print(t)


@group.command("policy")
@click.argument("policy", type=click.Choice(POLICY_NAMES))
@click.option("--pages", "pages_to_scan", type=click.IntRange(1, 1_000_000), help="fixed: pages_to_scan")
@click.option("--sleep", "sleep_millisecs", type=click.IntRange(1, 600_000), help="fixed: sleep_millisecs")
@click.option("--max-page-sharing", type=click.IntRange(2, 1 << 20), help="set while the policy is active")
@click.option("--use-zero-pages", type=click.IntRange(0, 1), help="set while the policy is active")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="auto", show_default=True)
@click.option("--scan-interval", "scan_interval_s", type=click.FloatRange(1, 86400), default=30.0, show_default=True)
@click.option("--hint", "hint", multiple=True, metavar="KEY=VALUE", help="hint policy parameter (repeatable)")
@click.option("--ksmtuned", "ksmtuned", multiple=True, metavar="KEY=VALUE", help="ksmtuned parameter (repeatable)")
@click.option("--advisor", "advisor", multiple=True, metavar="KEY=VALUE",
              help="KSM advisor parameter: target_scan_time, max_cpu, min_pages_to_scan, max_pages_to_scan")
@click.option("--unmerge-on-stop", is_flag=True, help="unmerge everything when restoring (if KSM was off)")
@click.pass_obj
def policy_cmd(ctx: Any, policy: str, pages_to_scan: int | None, sleep_millisecs: int | None,
               max_page_sharing: int | None, use_zero_pages: int | None, backend: str, scan_interval_s: float,
               hint: tuple[str, ...], ksmtuned: tuple[str, ...], advisor: tuple[str, ...],
               unmerge_on_stop: bool) -> None:  # fmt: skip
    """Opt in to a KSM policy (host-wide); 'off' restores the host's settings."""
    if policy == "off":
        _api(ctx, "DELETE", "/v1/dedup/policy")
        click.echo("dedup policy cleared; KSM settings restored")
        return
    body = {"policy": policy, "pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs,
            "max_page_sharing": max_page_sharing, "use_zero_pages": use_zero_pages, "backend": backend,
            "scan_interval_s": scan_interval_s, "hint": _params(hint, "--hint"),
            "ksmtuned": _params(ksmtuned, "--ksmtuned"), "advisor": _params(advisor, "--advisor"),
            "unmerge_on_stop": unmerge_on_stop}  # fmt: skip
    st = _api(ctx, "PUT", "/v1/dedup/policy", body)
    d = st.get("decision") or {}
    click.echo(f"policy {st['policy']['policy']}: {d.get('reason', 'applied')}")


@group.command("restore")
@click.pass_obj
def restore_cmd(ctx: Any) -> None:
    """Same as 'policy off': forget the API's policy and put every KSM value back."""
    _api(ctx, "DELETE", "/v1/dedup/policy")
    click.echo("KSM settings restored")


def _print_report(rep: dict[str, Any], regions: int) -> None:
    con = _console()
    con.print(f"scanned {rep['pages']} resident pages ({_mib(rep['bytes'])} MiB): saveable "
              f"{rep['saveable_pages']} pages ({_mib(rep['saveable_bytes'])} MiB, "
              f"{100 * rep['saveable_fraction']:.1f}%), of which cross-VM {rep['cross_saveable_pages']}, "
              f"zero pages {rep['zero_pages']}; remaining to merge {rep['remaining_pages']}")  # fmt: skip
    t = Table(title="per source")
    for col in ("source", "pages", "dup", "intra saveable", "cross", "zero", "merged", "potential MiB"):
        t.add_column(col)
    for s in rep["sources"]:
        t.add_row(s["name"], str(s["pages"]), str(s["dup_pages"]), str(s["intra_saveable_pages"]),
                  str(s["cross_pages"]), str(s["zero_pages"]), str(s["merged_pages"]), _mib(s["potential_bytes"]))  # fmt: skip
    con.print(t)
    if regions and rep["regions"]:
        r = Table(title=f"largest candidate regions (top {regions})")
        for col in ("source", "start", "pages", "zero", "cross"):
            r.add_column(col)
        for g in rep["regions"][:regions]:
            r.add_row(g["source"], g["start"], str(g["pages"]), str(g["zero_pages"]), str(g["cross_pages"]))
        con.print(r)
    tm = rep["timings"]
    con.print(f"backend {rep['backend']['name']}: read {tm['read_s']:.3f} s, hash {tm['hash_s']:.3f} s, "
              f"sort {tm['sort_s']:.3f} s, confirm {tm['confirm_s']:.3f} s, total {tm['total_s']:.3f} s"
              + (f", device {tm['device_s']:.4f} s" if tm.get("device_s") else ""))  # fmt: skip


@group.command("scan")
@click.option("--vm", "vms", multiple=True, help="VM to scan (repeatable; default: all running)")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None)
@click.option("--regions", type=click.IntRange(0, 1000), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def scan_cmd(ctx: Any, vms: tuple[str, ...], backend: str | None, regions: int, as_json: bool) -> None:
    """Hash the VMs' guest RAM now: sharing potential per VM and across VMs."""
    rep = _api(ctx, "POST", "/v1/dedup/scan", {"vms": list(vms) or None, "backend": backend, "regions": regions})
    if as_json:
        click.echo(json.dumps(rep, indent=2, default=str))
        return
    _print_report(rep, regions)


@group.command("ksm")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ksm_cmd(as_json: bool) -> None:
    """Read this host's KSM directly (no daemon): settings, counters, ksmd CPU."""
    from symbiont.host.ksm import Ksm, KsmdCpu, KsmError

    k = Ksm()
    try:
        k.require()
        data = {"settings": k.settings(), "stats": k.stats().as_dict(), "ksmd_cpu_s": KsmdCpu().seconds()}
    except KsmError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    con = _console()
    for section in ("settings", "stats"):
        t = Table(title=section)
        t.add_column("name")
        t.add_column("value")
        for key, val in data[section].items():
            t.add_row(key, str(val))
        con.print(t)
    con.print(f"ksmd CPU: {data['ksmd_cpu_s']} s")


@group.command("estimate")
@click.option("--pid", "pids", type=int, multiple=True, required=True, help="process to read (repeatable)")
@click.option("--ram-mib", type=click.IntRange(1, 1 << 22), default=None,
              help="QEMU guest RAM size: read only the guest-RAM mapping of each pid")  # fmt: skip
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="auto", show_default=True)
@click.option("--gpu-type", default="A100", show_default=True, help="simulated-gpu: the modelled GPU")
@click.option("--regions", type=click.IntRange(0, 1000), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def estimate_cmd(pids: tuple[int, ...], ram_mib: int | None, backend: str, gpu_type: str, regions: int,
                 as_json: bool) -> None:  # fmt: skip
    """Sharing potential of live processes (root): QEMU guest RAM with --ram-mib, else every
    mergeable (MADV_MERGEABLE) mapping of each process."""
    from symbiont.dedup.engine import Engine, EngineError
    from symbiont.dedup.memsource import ProcessMemorySource, mergeable_mappings

    sources = []
    try:
        for pid in pids:
            if ram_mib:
                sources.append(ProcessMemorySource.guest_ram(f"pid{pid}", pid, ram_mib << 20))
            else:
                maps = mergeable_mappings(pid)
                if not maps:
                    raise click.ClickException(f"process {pid} has no mergeable mappings (use --ram-mib for QEMU)")
                sources.append(ProcessMemorySource(f"pid{pid}", pid, [(m.start, m.end) for m in maps]))
        be = select_backend(backend, gpu_type)
        rep = Engine(be).scan(sources).as_dict(regions=regions)
    except (EngineError, BackendError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        for s in sources:
            s.close()
    if as_json:
        click.echo(json.dumps(rep, indent=2, default=str))
        return
    _print_report(rep, regions)


@group.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backends_cmd(as_json: bool) -> None:
    """Which hashing backends are usable here."""
    b = available_backends()
    if as_json:
        click.echo(json.dumps(b, indent=2))
        return
    t = Table(title="hashing backends")
    for col in ("backend", "available", "why"):
        t.add_column(col)
    for name, info in b.items():
        t.add_row(name, "yes" if info["available"] else "no", info["reason"])
    _console().print(t)
    click.echo(f"auto selects: {select_backend('auto').name}; page size {PAGE_SIZE}")
