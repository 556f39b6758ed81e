"""``symbiont paging``: the host swap tier, page-out, park and wake of VMs."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from symbiont.cli import Ctx, _s, call_and_show, console


@click.group("paging")
def group() -> None:
    """Host paging: the daemon's zram swap tier, guest-guided page-out, park/wake of idle VMs."""


@group.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(ctx: Ctx, as_json: bool) -> None:
    """The swap tier and, per VM, where its host memory is."""
    call_and_show(ctx, "GET", "/v1/paging", as_json, lambda data: console.print(_status_table(data)))


def _status_table(data: dict[str, Any]) -> Table:
    tier = data["tier"]
    if tier.get("device"):
        title = (f"swap tier {tier['device']} ({tier['compressor']}): {tier['used_mib']}/{tier['size_mib']} MiB used, "
                 f"{_s(tier.get('compressed_mib'))} MiB compressed (×{_s(tier.get('ratio'))}), "
                 f"{_s(tier.get('mem_used_mib'))} MiB RAM")
    else:
        title = "no swap tier (paging.enabled is false)"
    t = Table(title=title)
    for col in ("vm", "state", "RSS MiB", "swap MiB", "guest RAM res.", "guest RAM swapped", "code cache res.",
                "code cache swapped", "QEMU other res.", "QEMU other swapped", "parked"):
        t.add_column(col)
    for v in data["vms"]:
        g, c, o = v.get("guest_ram", {}), v.get("code_cache", {}), v.get("qemu_other", {})
        t.add_row(v["name"], _s(v.get("state") or v.get("error")), _s(v.get("rss_mib")), _s(v.get("swap_mib")),
                  _s(g.get("resident_mib")), _s(g.get("swapped_mib")), _s(c.get("resident_mib")),
                  _s(c.get("swapped_mib")), _s(o.get("resident_mib")), _s(o.get("swapped_mib")),
                  "yes" if v["parked"] else "no")
    return t


@group.command("pageout")
@click.argument("vm")
@click.option("--mib", type=int, help="MiB to page out (default: resident − (working set + margin))")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pageout(ctx: Ctx, vm: str, mib: int | None, as_json: bool) -> None:
    """Page out a VM's cold memory into the swap tier (the guest chooses which pages)."""
    call_and_show(ctx, "POST", f"/v1/paging/vms/{vm}/pageout", as_json, lambda r: console.print(
        f"{vm}: paged out {r['paged_mib']} MiB in {r['seconds']} s {r['by_source_mib']}; "
        f"QEMU RSS {r['rss_before_mib']} → {r['rss_after_mib']} MiB, tier {r['tier_used_after_mib']} MiB used"),
        {} if mib is None else {"mib": mib})


@group.command("park")
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def park(ctx: Ctx, vm: str, as_json: bool) -> None:
    """Record the VM's idle working set, pause it and page all of it out."""
    call_and_show(ctx, "POST", f"/v1/paging/vms/{vm}/park", as_json, lambda r: console.print(
        f"{vm}: parked in {r['seconds']} s; RSS {r['before']['rss_mib']} → {r['after']['rss_mib']} MiB, "
        f"idle working set {r['wset_mib']} MiB"))


@group.command("wake")
@click.argument("vm")
@click.option("--prefetch/--no-prefetch", default=True, help="swap the recorded working set in before the request")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def wake(ctx: Ctx, vm: str, prefetch: bool, as_json: bool) -> None:
    """Resume a parked VM (prefetching its working set) and deliver an agent ping."""
    call_and_show(ctx, "POST", f"/v1/paging/vms/{vm}/wake", as_json, lambda r: console.print(
        f"{vm}: awake, answered in {r['latency_s']} s (prefetch {'on' if prefetch else 'off'}: "
        f"{r['prefetched_mib']} MiB in {_s(r['prefetch_s'])} s)"), prefetch="true" if prefetch else "false")
