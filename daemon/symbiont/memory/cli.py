"""``symbiont mem``: the ESX memory policy — show ρ, f, targets; tune shares, τ, bounds."""

from __future__ import annotations

import click
from rich.table import Table


def _cli():
    from symbiont import cli as main_cli

    return main_cli


@click.group("memory")
def group() -> None:
    """Memory: share-based allocation with an idle-memory tax (ESX), symbiotic ballooning."""


ALIASES = ("mem",)  # the group's name until issue 14 (one name per part)


@group.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def show(ctx, as_json: bool) -> None:
    """Per VM: shares, τ, f (active fraction), ρ, target, actual, used, floor, pressure."""
    m = _cli()
    data = m.api(ctx, "GET", "/v1/memory")
    t = Table(title=f"memory policy ({'enabled' if data['enabled'] else 'disabled'}; "
                    f"budget {data['budget_mib']:.0f} MiB, {data['periods']} periods)")
    for col in ("vm", "shares", "τ", "f", "ρ", "target", "actual", "used", "floor", "pressure", "u",
                "last decision"):
        t.add_column(col, overflow="fold")
    for v in data["vms"]:
        t.add_row(v["name"], m._s(v["shares"]), m._s(v["tax_rate"]), f"{v['f']:.2f}",
                  "-" if v["rho"] is None else f"{v['rho']:.3g}", m._s(v["target_mib"]), m._s(v["actual_mib"]),
                  m._s(v["used_mib"]), m._s((v.get("floor") or {}).get("floor_mib")), "yes" if v["pressure"] else "no", f"{v['unshared_fraction']:.2f}",
                  (v.get("last_decision") or {}).get("reason", "-"))
    m.emit(data, as_json, t)


@group.command("set")
@click.argument("vm")
@click.option("--shares", type=int)
@click.option("--tau", "tax_rate", type=float, help="idle-memory tax rate in [0, 1)")
@click.option("--min-mib", type=int)
@click.option("--max-mib", type=int)
@click.pass_obj
def set_vm(ctx, vm: str, shares, tax_rate, min_mib, max_mib) -> None:
    """Change a VM's memory policy parameters at run time."""
    m = _cli()
    body = {k: v for k, v in {"shares": shares, "tax_rate": tax_rate, "min_mib": min_mib,
                              "max_mib": max_mib}.items() if v is not None}
    if not body:
        m.fail("nothing to set: give --shares, --tau, --min-mib or --max-mib", 2)
    r = m.api(ctx, "PUT", f"/v1/memory/vms/{vm}", body)
    m.console.print(f"{vm}: memory policy {r['memory']}")


@group.command("policy")
@click.option("--enable/--disable", default=None, help="run the policy every control period")
@click.option("--budget-mib", type=int, help="memory all VMs may use together (0: host memory - reserve)")
@click.option("--free-target-mib", type=int)
@click.option("--tau", "tax_rate", type=float, help="default idle-memory tax rate")
@click.pass_obj
def policy(ctx, enable, budget_mib, free_target_mib, tax_rate) -> None:
    """Turn the policy on/off and set the host-wide parameters."""
    m = _cli()
    body = {k: v for k, v in {"enabled": enable, "budget_mib": budget_mib, "free_target_mib": free_target_mib,
                              "tax_rate": tax_rate}.items() if v is not None}
    r = m.api(ctx, "PUT", "/v1/memory/policy", body)
    m.console.print(f"memory policy {'enabled' if r['enabled'] else 'disabled'}, budget {r['budget_mib']:.0f} MiB")
