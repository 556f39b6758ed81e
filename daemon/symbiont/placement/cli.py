"""``symbiont place``: plan placements from files, list heuristics, generate and replay traces.

Errors in the input (a bad file, an unknown heuristic, a negative demand) print one line
``error: ...`` on stderr and exit with status 2; a request that is valid but cannot be placed is
not an error — the plan lists it with the reason.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np

from symbiont.placement import heuristics
from symbiont.placement.inventory import load_inventory, load_requests
from symbiont.placement.planner import MODES, Plan, plan
from symbiont.placement.simulator import DETECTION, SimConfig, simulate
from symbiont.placement.traces import MIXES, generate, read_csv, standard_hosts, write_csv

EXAMPLES = Path(__file__).parent / "examples"


def _fail(msg: str) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ValueError, OSError) as exc:
        _fail(str(exc))


def _console() -> Any:
    from rich.console import Console

    return Console(width=160)


@click.group(name="placement", context_settings={"help_option_names": ["-h", "--help"]})
def group() -> None:
    """Cluster placement: multi-dimensional packing with constraints, and its simulator.

    Example files: daemon/symbiont/placement/examples/ (hosts.yaml, vms.yaml, trace.csv).
    """


ALIASES = ("place",)  # the group's name until issue 14 (one name per part)


@group.command("heuristics")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def heuristics_cmd(as_json: bool) -> None:
    """List the placement heuristics with their formulas."""
    items = [
        {"name": h.name, "formula": h.formula, "description": h.doc} for h in heuristics.HEURISTICS.values()
    ]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    from rich.table import Table

    t = Table(
        title="placement heuristics (r: request, a: host's free capacity before placing, E: capacity x overcommit, ^: divided by E)"
    )
    for col in ("name", "formula", "description"):
        t.add_column(col)
    for it in items:
        t.add_row(it["name"], it["formula"], it["description"])
    _console().print(t)


@group.command("plan")
@click.option("--inventory", "-i", type=click.Path(dir_okay=False), help="hosts YAML")
@click.option("--requests", "-r", "requests_path", type=click.Path(dir_okay=False), help="requests YAML")
@click.option(
    "--from-daemon",
    "daemons",
    multiple=True,
    help="take a host (capacity, VMs, usage samples) from this daemon's socket or http URL; repeatable",
)
@click.option(
    "--hotspots",
    type=click.Choice(["black-box", "gray-box"]),
    default=None,
    help="live: Sandpiper hotspot detection on the daemons' samples, and moves off hot hosts",
)
@click.option(
    "--threshold", "thresholds", default="cpu=0.75,mem=0.75", show_default=True, help="hotspot thresholds"
)
@click.option("--k", "k", type=int, default=3, show_default=True, help="hotspot: k of the last n samples")
@click.option("--n", "n", type=int, default=5, show_default=True, help="hotspot: k of the last n samples")
@click.option("--idle-host", default=None, help="live: consolidate idle VMs (seeds/004) onto this host")
@click.option("--idle-cpu", type=float, default=0.05, show_default=True, help="idle: CPU fraction below this")
@click.option("--idle-window", type=int, default=12, show_default=True, help="idle: for this many samples")
@click.option("--idle-wss-mib", type=float, default=64.0, show_default=True, help="idle: working set at most")
@click.option(
    "--wake-cpu",
    type=float,
    default=None,
    help="idle: wake VMs on the idle host at this CPU fraction [max(0.2, --idle-cpu)]",
)
@click.option(
    "--heuristic", "-H", default="best-fit", show_default=True, help="see 'symbiont place heuristics'"
)
@click.option("--mode", type=click.Choice(MODES), default="batch", show_default=True)
@click.option("--now", type=float, default=None, help="current time, for deadlines (a finite number)")
@click.option("--bound", is_flag=True, help="also compute a lower bound on hosts (volume/L2/clique, MILP/LP)")
@click.option(
    "--bound-time",
    type=click.FloatRange(0, 600),
    default=2.0,
    show_default=True,
    help="--bound: seconds at most",
)
@click.option("--improve", is_flag=True, help="after the heuristic, a local search that empties hosts")
@click.option(
    "--improve-time",
    type=click.FloatRange(0, 600),
    default=1.0,
    show_default=True,
    help="--improve: seconds at most",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="write a PNG of utilisation per host before and after",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plan_cmd(
    inventory: str | None,
    requests_path: str | None,
    daemons: tuple[str, ...],
    hotspots: str | None,
    thresholds: str,
    k: int,
    n: int,
    idle_host: str | None,
    idle_cpu: float,
    idle_window: int,
    idle_wss_mib: float,
    wake_cpu: float | None,
    heuristic: str,
    mode: str,
    now: float | None,
    bound: bool,
    bound_time: float,
    improve: bool,
    improve_time: float,
    plot_path: str | None,
    as_json: bool,
) -> None:
    """Plan where new VMs go, with a reason for every rejection.

    From files (-i hosts.yaml -r vms.yaml) or from live daemons (--from-daemon, one per host),
    where --hotspots and --idle-host also plan migrations; 'symbiont place execute' runs them.
    """
    if now is not None and not math.isfinite(now):
        _fail(f"--now {now}: not a finite time (NaN or infinity would disable deadlines)")
    if daemons:
        _live_plan(
            daemons, inventory, requests_path, heuristic, mode, now, as_json,
            {"mode": hotspots, "thresholds": _guard(lambda: _kv_floats(thresholds, "--threshold")), "k": k, "n": n}
            if hotspots else None,
            {"idle_host": idle_host, "cpu_threshold": idle_cpu, "window": idle_window, "wss_max_mib": idle_wss_mib,
             "wake_cpu": wake_cpu} if idle_host else None,
        )  # fmt: skip
        return
    if hotspots or idle_host:
        _fail("--hotspots and --idle-host need live data: add --from-daemon")
    if not inventory or not requests_path:
        _fail("give --inventory and --requests, or --from-daemon")
    inv = _guard(lambda: load_inventory(inventory))
    reqs = _guard(lambda: load_requests(requests_path))
    p: Plan = _guard(
        lambda: plan(
            inv.hosts,
            reqs,
            heuristic,
            mode,
            inv.existing,
            inv.quotas,
            now,
            improve=improve,
            improve_time=improve_time,
        )
    )
    out = p.to_dict()
    if bound:
        out["lower_bound"] = _guard(lambda: _bound(inv, p, reqs, bound_time))
    if plot_path:
        _guard(lambda: _plot_util(p, plot_path))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    _print_plan(p, out.get("lower_bound"))
    if plot_path:
        click.echo(f"wrote {plot_path}")


def _bound(inv: Any, p: Plan, reqs: list[Any], bound_time: float) -> dict[str, Any]:
    from symbiont.placement.bound import plan_bound
    from symbiont.placement.state import ClusterState

    st = ClusterState(inv.hosts, inv.quotas)
    placed = set(p.placements)
    vms = [r for r in reqs if r.id in placed] + [r for r, _ in inv.existing]
    arr = np.array([st.demand_of(r) for r in vms]).reshape(len(vms), len(st.dims))
    return plan_bound([r.id for r in vms], arr, st.effective, p.hosts_used, time_limit=bound_time)


def _print_plan(p: Plan, lb: dict[str, Any] | None) -> None:
    from rich.table import Table

    con = _console()
    t = Table(title=f"plan: {p.heuristic}, {p.mode} mode")
    t.add_column("vm")
    t.add_column("host")
    t.add_column("reason")
    for d in p.decisions:
        t.add_row(d.request_id, d.host or "[red]rejected[/red]", d.reason)
    con.print(t)
    u = Table(title="allocated / physical capacity per host (before -> after)")
    u.add_column("host")
    for d in p.dims:
        u.add_column(d, justify="right")
    for h in p.host_ids:
        b, a = p.utilisation_before[h], p.utilisation_after[h]
        u.add_row(h, *[f"{100 * b[d]:.0f}% -> {100 * a[d]:.0f}%" for d in p.dims])
    con.print(u)
    n = len(p.decisions)
    line = (
        f"placed {n - len(p.rejected)} of {n}; hosts used {p.hosts_used_before} -> {p.hosts_used}; "
        f"{1e6 * p.seconds / max(n, 1):.0f} us per decision"
    )
    if lb is not None:
        line += f"; lower bound {lb['value']} ({lb['method']}), hosts used / bound = {lb['ratio']}"
    con.print(line)


def _plot_util(p: Plan, path: str) -> None:
    """The PNG is drawn by the research package (matplotlib stays out of the daemon's)."""
    from symbiont.plugins import research

    plots = research("plots")
    if plots is None:
        _fail("--plot needs the research package symbiont_research (matplotlib plots), not installed here")
    plots.placement_utilisation(p, path)


@group.command("simulate")
@click.option("--trace", "-t", "trace_path", required=True, type=click.Path(dir_okay=False), help="trace CSV")
@click.option(
    "--inventory",
    "-i",
    type=click.Path(dir_okay=False),
    default=None,
    help="hosts YAML (VMs listed there are ignored)",
)
@click.option(
    "--hosts",
    "n_hosts",
    type=int,
    default=10,
    show_default=True,
    help="standard hosts (48 cores, 512 GiB, 25 Gbit/s) when no inventory is given",
)
@click.option("--overcommit", default="", help="overcommit for standard hosts, e.g. cpu=2,mem=1.5")
@click.option("--heuristic", "-H", default="best-fit", show_default=True)
@click.option(
    "--detection",
    type=click.Choice(DETECTION),
    default="off",
    show_default=True,
    help="Sandpiper hotspot detection",
)
@click.option("--interval", type=float, default=5.0, show_default=True, help="step in minutes")
@click.option(
    "--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="write per-step series here"
)
@click.option("--json", "as_json", is_flag=True)
def simulate_cmd(
    trace_path: str,
    inventory: str | None,
    n_hosts: int,
    overcommit: str,
    heuristic: str,
    detection: str,
    interval: float,
    csv_path: str | None,
    as_json: bool,
) -> None:
    """Replay a trace through a placement policy: hosts used, rejections, overload, migrations."""
    tr = _guard(lambda: read_csv(trace_path))
    if inventory:
        hosts = _guard(lambda: load_inventory(inventory)).hosts
    else:
        oc = _guard(lambda: _kv_floats(overcommit))
        if n_hosts < 1:
            _fail("--hosts must be at least 1")
        hosts = _guard(lambda: standard_hosts(n_hosts, tr.dims, oc))
    res = _guard(
        lambda: simulate(tr, hosts, SimConfig(heuristic=heuristic, detection=detection, interval=interval))
    )
    s = res.summary()
    if csv_path:
        import csv

        with open(csv_path, "w", newline="") as fh:
            rows = res.rows()
            w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["time"])
            w.writeheader()
            w.writerows(rows)
    if as_json:
        s["rejections"] = [d.to_dict() for d in res.rejected]
        s["moves"] = [{"time": t, **m.to_dict()} for t, m in res.migrations]
        click.echo(json.dumps(s, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"simulation of {trace_path}: {len(hosts)} hosts, {heuristic}, detection {detection}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in s.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    con = _console()
    con.print(t)
    for d in res.rejected[:10]:
        con.print(f"rejected {d.request_id}: {d.reason}")
    if len(res.rejected) > 10:
        con.print(f"... and {len(res.rejected) - 10} more rejections")


def _kv_floats(s: str, opt: str = "--overcommit") -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in s.split(","))):
        if "=" not in part:
            raise ValueError(f"{opt} {part!r}: expected resource=ratio")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"{opt} {part!r}: {v!r} is not a number") from None
    return out


@group.command("generate")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="trace CSV to write")
@click.option("--vms", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mix", type=click.Choice(MIXES), default="azure", show_default=True)
@click.option("--dims", default="cpu,mem,net", show_default=True)
@click.option("--horizon", type=float, default=1440.0, show_default=True, help="minutes")
@click.option("--no-usage", is_flag=True, help="only arrivals and departures")
def generate_cmd(out: str, vms: int, seed: int, mix: str, dims: str, horizon: float, no_usage: bool) -> None:
    """Write a seeded synthetic trace (distributions: see symbiont.placement.traces.generate)."""
    dl = tuple(d.strip() for d in dims.split(",") if d.strip())
    tr = _guard(lambda: generate(vms, seed=seed, mix=mix, dims=dl, horizon=horizon, usage=not no_usage))
    _guard(lambda: write_csv(tr, out))
    click.echo(f"wrote {out}: {vms} VMs, {len(tr.events)} events")


def _fetch_inventory(spec: str) -> dict[str, Any]:
    from symbiont.client import ApiError
    from symbiont.placement.execute import _client

    try:
        with _client(spec) as c:
            return c.get("/v1/placement/inventory")
    except ApiError as exc:
        raise ValueError(f"--from-daemon {spec}: {exc}") from None


def _live_plan(
    daemons: tuple[str, ...],
    inventory: str | None,
    requests_path: str | None,
    heuristic: str,
    mode: str,
    now: float | None,
    as_json: bool,
    hotspots: dict[str, Any] | None,
    idle: dict[str, Any] | None,
) -> None:
    from symbiont.placement.inventory import load_yaml
    from symbiont.placement.live import plan_live

    invs = [_guard(lambda d=d: _fetch_inventory(d)) for d in daemons]
    if inventory:
        raw = _guard(lambda: load_inventory(inventory) and load_yaml(inventory))
        invs += [{"host": h} for h in raw.get("hosts", [])]
    reqs = _guard(lambda: load_requests(requests_path)) if requests_path else []
    out = _guard(lambda: plan_live(invs, reqs, heuristic, mode, now, hotspots, idle))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    from rich.table import Table

    con = _console()
    t = Table(title="live hosts: allocated / capacity")
    for col in ("host", "capacity", "VMs", "alloc cpu", "alloc mem"):
        t.add_column(col)
    for inv in invs:
        h = inv["host"]
        ua = out["plan"]["utilisation_before"].get(h["id"], {})
        cap = ", ".join(f"{r} {v:.4g}" for r, v in h["capacity"].items())
        t.add_row(
            h["id"],
            cap,
            str(len(h.get("vms", []))),
            f"{100 * ua.get('cpu', 0):.0f}%",
            f"{100 * ua.get('mem', 0):.0f}%",
        )
    con.print(t)
    if out["plan"]["decisions"]:
        d = Table(title=f"placements: {heuristic}, {mode} mode")
        for col in ("vm", "host", "reason"):
            d.add_column(col)
        for x in out["plan"]["decisions"]:
            d.add_row(x["vm"], x.get("host") or "[red]rejected[/red]", x.get("reason", ""))
        con.print(d)
    if "hotspots" in out:
        hs = out["hotspots"]
        for h in hs["hotspots"]:
            con.print(f"hotspot {h['host']} ({hs['mode']}): {'; '.join(h['reasons'])}")
        if not hs["hotspots"]:
            con.print(f"no hotspots ({hs['mode']})")
        for u in hs["unresolved"]:
            con.print(f"[red]unresolved[/red] {u}")
    if "idle" in out:
        for a in out["idle"]["actions"]:
            con.print(f"idle: {a['kind']} {a['vm']}: {a['reason']}")
    m = Table(title="migrations (run them with 'symbiont place execute PLAN.json')")
    for col in ("vm", "from", "to", "reason"):
        m.add_column(col)
    for x in out["moves"]:
        m.add_row(x["vm"], x["from"], x["to"], x["reason"])
    con.print(m if out["moves"] else "no migrations planned")


@group.command("inventory")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def inventory_cmd(obj: Any, as_json: bool) -> None:
    """What the daemon would feed the planner: capacity, VM allocations, usage samples."""
    from symbiont.client import ApiError

    try:
        with obj.client() as c:
            inv = c.get("/v1/placement/inventory")
    except ApiError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(inv, indent=2))
        return
    from rich.table import Table

    h = inv["host"]
    t = Table(title=f"host {h['id']}: " + ", ".join(f"{r} {v:.4g}" for r, v in h["capacity"].items())
              + f" (from {inv.get('capacity_source', '?')})")  # fmt: skip
    for col in (
        "vm",
        "alloc cpu",
        "alloc mem GiB",
        "black-box cpu/mem",
        "gray-box cpu/mem",
        "wss MiB",
        "samples",
    ):
        t.add_column(col)
    for v in h["vms"]:
        b = inv["usage"]["black-box"].get(v["id"]) or []
        g = inv["usage"]["gray-box"].get(v["id"]) or []
        a = inv["activity"].get(v["id"], {})
        t.add_row(
            v["id"],
            f"{v['demand']['cpu']:.4g}",
            f"{v['demand']['mem']:.3g}",
            f"{b[-1][0]:.3f} / {b[-1][1]:.3f}" if b else "-",
            f"{g[-1][0]:.3f} / {g[-1][1]:.3f}" if g else "-",
            str(a.get("wss_mib") if a.get("wss_mib") is not None else "-"),
            f"{len(b)} / {len(g)}",
        )
    _console().print(t)


@group.command("execute")
@click.argument("plan_path", type=click.Path(dir_okay=False))
@click.option(
    "--yes", is_flag=True, help="carry out the migrations (default: dry run, show what would happen)"
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def execute_cmd(obj: Any, plan_path: str, yes: bool, as_json: bool) -> None:
    """Carry out a plan: live-migrate its VMs between the daemon's configured hosts (placement.hosts)
    and run its idle balloon steps (shrink/grow) through the hosts' daemons, in plan order.

    Dry run by default. The daemon checks the whole plan first (hosts known, each VM running on
    its 'from' host, registered where its balloon moves); an error there changes nothing. With
    --yes the steps run one at a time.
    """
    import threading

    from symbiont.client import ApiError, Client

    try:
        data = json.loads(Path(plan_path).read_text())
    except (OSError, ValueError) as exc:
        _fail(f"{plan_path}: {exc}")
    try:
        with obj.client() as c:
            dry = c.post("/v1/placement/execute", {"plan": data, "dry_run": True})
    except ApiError as exc:
        _fail(str(exc))
    steps = dry["steps"]
    if not yes:
        if as_json:
            click.echo(json.dumps(dry, indent=2))
            return
        from rich.table import Table

        t = Table(title="dry run: these steps would run, in order (add --yes)")
        for col in ("step", "vm", "where", "via", "reason"):
            t.add_column(col)
        for s in steps:
            if s["kind"] == "move":
                bal = f", then balloon {s['balloon_mib']} MiB" if s.get("balloon_mib") else ""
                t.add_row("move", s["vm"], f"{s['from']} ({s['from_uri']}) -> {s['to']} ({s['to_uri']})",
                          f"{s['migrate_uri']}{', re-register' if s['reregister'] else ''}{bal}",
                          s["reason"])  # fmt: skip
            else:
                t.add_row(
                    s["kind"], s["vm"], f"{s['host']}: balloon to {s['mem_to']} MiB", s["daemon"], s["reason"]
                )
        _console().print(t if steps else "nothing to do")
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    results: list[dict[str, Any]] = []
    sock = obj.client().socket_path
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
        console=_console(), disable=as_json,
    ) as prog:  # fmt: skip
        for s in steps:
            if s["kind"] == "move":
                desc = f"{s['vm']}: {s['from']} -> {s['to']}"
                one = {"moves": [{k: s[k] for k in ("vm", "from", "to", "reason", "balloon_mib") if k in s}]}
            else:
                desc = f"{s['vm']}: {s['kind']} to {s['mem_to']} MiB on {s['host']}"
                one = {"actions": [{"kind": s["kind"], "vm": s["vm"], "src": s["host"], "mem_to": s["mem_to"],
                                    "reason": s["reason"]}]}  # fmt: skip
            task = prog.add_task(desc, total=None)
            box: dict[str, Any] = {}

            def run(one: dict[str, Any] = one, box: dict[str, Any] = box) -> None:
                try:
                    with Client(sock, timeout=3600) as c:
                        box["res"] = c.post("/v1/placement/execute", {"plan": one, "dry_run": False})
                except ApiError as exc:
                    box["err"] = str(exc)

            th = threading.Thread(target=run, daemon=True)
            th.start()
            while th.is_alive():
                th.join(0.5)
                try:
                    with Client(sock, timeout=5) as c:
                        pr = c.get("/v1/placement/migrations")["running"].get(s["vm"])
                except ApiError:
                    pr = None
                if pr and pr.get("total_bytes"):
                    prog.update(task, total=pr["total_bytes"], completed=pr["processed_bytes"])
            if "err" in box:
                results.append({**s, "ok": False, "error": box["err"]})
                break
            r = box["res"]["results"][0]
            results.append(r)
            prog.update(task, total=1, completed=1 if r["ok"] else 0)
            if not r["ok"]:
                break
    if as_json:
        click.echo(json.dumps({"results": results}, indent=2))
    else:
        for r in results:
            state = "[green]ok[/green]" if r["ok"] else f"[red]failed[/red]: {r.get('error')}"
            extra = f", registered on {r['registered_on']}" if r.get("registered_on") else ""
            bal = r.get("balloon")
            if bal:
                extra += (
                    f", balloon {bal['target_mib']} MiB"
                    if bal["ok"]
                    else f", [red]balloon: {bal['error']}[/red]"
                )
            what = (
                f"{r['from']} -> {r['to']}"
                if r["kind"] == "move"
                else f"{r['kind']} to {r['mem_to']} MiB on {r['host']}"
            )
            _console().print(f"{r['vm']}: {what} {state} in {r.get('seconds', '?')} s{extra}")
    if any(not r["ok"] for r in results):
        sys.exit(1)
