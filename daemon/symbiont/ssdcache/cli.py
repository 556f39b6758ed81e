"""``symbiont ssdcache`` (alias ``cache``): the elastic SSD pool, per-VM caches, resizing, policies, two-level partitions.

Talks to the daemon's API (``/v1/ssdcache``). Tables by default, ``--json`` for scripts; errors
are one line and exit status 2 (bad input / refused) or 1 (daemon unreachable or failing).
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from symbiont.cli import Ctx, api, call_and_show, console, emit


def _runs(runs: list[list[int]]) -> str:
    return ",".join(f"{s}" if n == 1 else f"{s}-{s + n - 1}" for s, n in runs) or "-"


@click.group(name="ssdcache")
def group() -> None:
    """Elastic SSD caches (SymFlex) and two-level Mem/SSD partitions (DoubleDecker)."""


ALIASES = ("cache",)  # the group's name until issue 14 (one name per part)


# -- pool ------------------------------------------------------------------------------------
@group.group("pool")
def pool() -> None:
    """The shared SSD: a loop device over a file, or a real block device."""


@pool.command("create")
@click.option("--file", "file_", help="backing file for a loop device, in ssdcache.pool_dir (a name, or a path in it)")
@click.option("--size-mib", type=click.IntRange(1), help="size of a new backing file")
@click.option("--device", help="use a real block device instead (listed in ssdcache.allowed_devices)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pool_create(ctx: Ctx, file_: str | None, size_mib: int | None, device: str | None, as_json: bool) -> None:
    """Create the pool (1 MiB blocks)."""
    body = {"file": file_, "size_mib": size_mib, "device": device}
    call_and_show(ctx, "POST", "/v1/ssdcache/pool", as_json, _pool_out, {k: v for k, v in body.items() if v is not None})


@pool.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pool_show(ctx: Ctx, as_json: bool) -> None:
    """Show the pool and its block counts."""
    call_and_show(ctx, "GET", "/v1/ssdcache/pool", as_json, _pool_out)


@pool.command("delete")
@click.option("--remove-file", is_flag=True, help="also delete the backing file")
@click.pass_obj
def pool_delete(ctx: Ctx, remove_file: bool) -> None:
    """Delete the pool (only when no cache is registered, unless the pool file or device is gone)."""
    r = api(ctx, "DELETE", "/v1/ssdcache/pool", remove_file=str(remove_file).lower())
    console.print(f"deleted pool {r['deleted']}")


def _pool_out(p: dict[str, Any]) -> None:
    if not p.get("exists"):
        console.print("no pool (create one: symbiont ssdcache pool create --file PATH --size-mib N)")
        return
    b = p["blocks"]
    console.print(f"pool {p['path']} ({p['kind']}) on {p.get('device', '?')}: {p['nblocks']} blocks of 1 MiB; "
                  f"free {b['free']}, owned {b['owned']}, dirty {b['dirty']}"
                  + (f"  [red]{p['error']}[/red]" if p.get("error") else ""))


# -- caches ----------------------------------------------------------------------------------
@group.command("register")
@click.argument("vm")
@click.option("--size-mib", type=click.IntRange(1), required=True, help="the virtual SSD the VM sees")
@click.option("--current-mib", type=click.IntRange(0), default=0, show_default=True, help="backed part")
@click.option("--persist/--no-persist", default=False, show_default=True)
@click.option("--weight", type=click.IntRange(1), default=100, show_default=True)
@click.option("--min-mib", type=click.IntRange(0), default=0, show_default=True)
@click.option("--max-mib", type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def register(ctx: Ctx, vm: str, size_mib: int, current_mib: int, persist: bool, weight: int, min_mib: int,
             max_mib: int | None, as_json: bool) -> None:
    """Register VM's elastic SSD: <vm-id, size, current-size, persist>."""
    body: dict[str, Any] = {"vm": vm, "size_mib": size_mib, "current_mib": current_mib, "persist": persist,
                            "weight": weight, "min_mib": min_mib}
    if max_mib is not None:
        body["max_mib"] = max_mib
    call_and_show(ctx, "POST", "/v1/ssdcache/caches", as_json, lambda v: _cache_out([v]), body)


@group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_cmd(ctx: Ctx, as_json: bool) -> None:
    """List the registered caches."""
    call_and_show(ctx, "GET", "/v1/ssdcache/caches", as_json, _cache_out)


@group.command("show")
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def show(ctx: Ctx, vm: str, as_json: bool) -> None:
    """Show one cache: backed blocks, I/O counters, the guest's view, the last resize."""
    call_and_show(ctx, "GET", f"/v1/ssdcache/caches/{vm}", as_json, _show_cache)


def _show_cache(v: dict[str, Any]) -> None:
    _cache_out([v])
    io = v.get("io") or {}
    console.print(f"socket {v['socket']}  backed {_runs(v['backed'])}  revoked {_runs(v['revoked'])}")
    console.print(f"I/O: {io.get('reads', 0)} reads, {io.get('writes', 0)} writes, {io.get('flushes', 0)} flushes, "
                  f"{io.get('unbacked_errors', 0)} refused (unbacked), {io.get('protocol_errors', 0)} dropped clients")
    if v.get("last_resize"):
        r = v["last_resize"]
        console.print(f"last resize: {r['before_mib']} -> {r['current_mib']} MiB, chosen by {r['chosen_by']}, "
                      f"{r['total_ms']} ms")


@group.command("resize")
@click.argument("vm")
@click.argument("current_mib", type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def resize(ctx: Ctx, vm: str, current_mib: int, as_json: bool) -> None:
    """Inflate or deflate VM's cache to CURRENT_MIB backed MiB (the guest picks what to give back)."""
    call_and_show(ctx, "PUT", f"/v1/ssdcache/caches/{vm}/size", as_json, lambda r: console.print(
        f"{vm}: {r['before_mib']} -> {r['current_mib']} MiB (blocks {_runs(_compress(r['lbns']))}, "
        f"chosen by {r['chosen_by']}, {r['total_ms']} ms)"), {"current_mib": current_mib})


def _compress(lbns: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for v in sorted(lbns):
        if out and out[-1][0] + out[-1][1] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


@group.command("set")
@click.argument("vm")
@click.option("--weight", type=click.IntRange(1))
@click.option("--persist/--no-persist", default=None)
@click.option("--min-mib", type=click.IntRange(0))
@click.option("--max-mib", type=click.IntRange(0))
@click.pass_obj
def set_cmd(ctx: Ctx, vm: str, weight: int | None, persist: bool | None, min_mib: int | None,
            max_mib: int | None) -> None:
    """Change a cache's weight, persist flag or bounds."""
    body = {"weight": weight, "persist": persist, "min_mib": min_mib, "max_mib": max_mib}
    v = api(ctx, "PATCH", f"/v1/ssdcache/caches/{vm}", {k: x for k, x in body.items() if x is not None})
    _cache_out([v])


@group.command("unregister")
@click.argument("vm")
@click.pass_obj
def unregister(ctx: Ctx, vm: str) -> None:
    """Unregister VM's cache; its blocks are zeroed and freed."""
    r = api(ctx, "DELETE", f"/v1/ssdcache/caches/{vm}")
    console.print(f"unregistered {vm}; {r['freed_blocks']} blocks zeroed and freed")


@group.command("attach")
@click.argument("vm")
@click.option("--target-dev", default="vdb", show_default=True)
@click.option("--reconnect-delay", type=click.IntRange(0, 3600), default=0, show_default=True,
              help="seconds QEMU's NBD client waits for a restarted daemon (attached over QMP: libvirt 9.0 "
                   "cannot set it); 0: the libvirt path")  # fmt: skip
@click.option("--transport", type=click.Choice(["nbd", "vhost-user"]), default="nbd", show_default=True,
              help="nbd: QEMU's NBD client; vhost-user: a vhost-user-blk device on the daemon's C backend, "
                   "which does the I/O straight into guest memory (the domain needs shared memfd RAM)")
@click.pass_obj
def attach(ctx: Ctx, vm: str, target_dev: str, reconnect_delay: int, transport: str) -> None:
    """Hot-plug VM's elastic SSD into its running libvirt domain."""
    api(ctx, "POST", f"/v1/ssdcache/caches/{vm}/attach", {"target_dev": target_dev,
                                                          "reconnect_delay_s": reconnect_delay,
                                                          "transport": transport})  # fmt: skip
    how = f" (QMP, reconnect-delay {reconnect_delay} s)" if reconnect_delay else ""
    how += " over vhost-user" if transport == "vhost-user" else ""
    console.print(f"attached {vm}'s elastic SSD as {target_dev}{how}")


# -- policy ----------------------------------------------------------------------------------
@group.group("policy")
def policy() -> None:
    """Automatic sizing: share-based or throughput-proportional."""


@policy.command("show")
@click.pass_obj
def policy_show(ctx: Ctx) -> None:
    """Show the sizing policy's settings."""
    emit(api(ctx, "GET", "/v1/ssdcache/policy"), True)


@policy.command("set")
@click.option("--mode", type=click.Choice(["manual", "shares", "throughput"]))
@click.option("--capacity-mib", type=click.IntRange(0))
@click.option("--ratio", multiple=True, help="throughput mode target ratio, VM=R (repeat)")
@click.option("--gain", type=click.FloatRange(0, 1, min_open=True))
@click.pass_obj
def policy_set(ctx: Ctx, mode: str | None, capacity_mib: int | None, ratio: tuple[str, ...],
               gain: float | None) -> None:
    """Change the sizing policy (it runs every control period unless the mode is manual)."""
    body: dict[str, Any] = {"mode": mode, "capacity_mib": capacity_mib, "gain": gain}
    if ratio:
        tr = {}
        for item in ratio:
            vm, _, r = item.partition("=")
            try:
                tr[vm] = float(r)
            except ValueError:
                raise click.BadParameter(f"{item!r}: expected VM=RATIO", param_hint="--ratio") from None
        body["target_ratio"] = tr
    emit(api(ctx, "PUT", "/v1/ssdcache/policy", {k: v for k, v in body.items() if v is not None}), True)


@policy.command("plan")
@click.option("--mode", type=click.Choice(["shares", "throughput"]))
@click.pass_obj
def policy_plan(ctx: Ctx, mode: str | None) -> None:
    """What the policy would do now (nothing is changed)."""
    emit(api(ctx, "GET", "/v1/ssdcache/policy/plan", **({"mode": mode} if mode else {})), True)


@policy.command("apply")
@click.option("--mode", type=click.Choice(["shares", "throughput"]))
@click.pass_obj
def policy_apply(ctx: Ctx, mode: str | None) -> None:
    """Run the policy once and resize the caches."""
    emit(api(ctx, "POST", "/v1/ssdcache/policy/apply", {"mode": mode} if mode else {}), True)


def _cache_out(vs: list[dict[str, Any]]) -> None:
    t = Table(title="elastic SSD caches")
    for col in ("vm", "size MiB", "current MiB", "persist", "weight", "min..max", "reads", "writes", "refused",
                "guest"):
        t.add_column(col, justify="left" if col in ("vm", "guest") else "right")
    for v in vs:
        io = v.get("io") or {}
        g = v.get("guest", {})
        st = g.get("status") or {}
        guest = (f"hit {st.get('hit_rate', 0):.0%} {st.get('ops_per_s', 0):.0f} op/s" if st
                 else ("acked" if g.get("acked_epoch", -1) >= 0 else "-"))
        t.add_row(v["vm"], str(v["size_mib"]), str(v["current_mib"]), "yes" if v["persist"] else "no",
                  str(v["weight"]), f"{v['min_mib']}..{v['max_mib'] if v['max_mib'] is not None else v['size_mib']}",
                  str(io.get("reads", 0)), str(io.get("writes", 0)), str(io.get("unbacked_errors", 0)), guest)
    console.print(t)


# -- DoubleDecker ----------------------------------------------------------------------------
@group.group("twolevel")
def twolevel() -> None:
    """DoubleDecker: <T, W> partitions of a Mem tier and an SSD tier, per VM and per container."""


@twolevel.command("setup")
@click.option("--mem-mib", type=click.IntRange(0), required=True)
@click.option("--ssd-mib", type=click.IntRange(0), default=0, show_default=True)
@click.pass_obj
def twolevel_setup(ctx: Ctx, mem_mib: int, ssd_mib: int) -> None:
    """Create or re-size the hypervisor cache."""
    _tl_out(api(ctx, "PUT", "/v1/ssdcache/twolevel", {"mem_mib": mem_mib, "ssd_mib": ssd_mib}))


@twolevel.command("set")
@click.argument("vm")
@click.argument("tw")
@click.option("--container", help="set a container's <T, W> inside VM (the VM level)")
@click.pass_obj
def twolevel_set(ctx: Ctx, vm: str, tw: str, container: str | None) -> None:
    """Set <T, W>, written TYPE:WEIGHT (mem:60, ssd:100) or mem=50,ssd=10 for both tiers."""
    body: dict[str, Any]
    if ":" in tw:
        t, _, w = tw.partition(":")
        body = {"type": t.lower(), "weight": _weight(w)}
    else:
        body = {}
        for part in tw.split(","):
            t, _, w = part.partition("=")
            body[t.strip().lower()] = _weight(w)
    path = f"/v1/ssdcache/twolevel/vms/{vm}" + (f"/containers/{container}" if container else "")
    _tl_out(api(ctx, "PUT", path, body))


def _weight(w: str) -> int:
    try:
        return int(w)
    except ValueError:
        raise click.BadParameter(f"weight {w!r} is not an integer", param_hint="TW") from None


@twolevel.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def twolevel_show(ctx: Ctx, as_json: bool) -> None:
    call_and_show(ctx, "GET", "/v1/ssdcache/twolevel", as_json, _tl_out)


@twolevel.command("guest")
@click.argument("vm")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def twolevel_guest(ctx: Ctx, vm: str, as_json: bool) -> None:
    """The VM level as the guest runs it: its containers' quotas and occupancy (pages)."""
    call_and_show(ctx, "GET", f"/v1/ssdcache/twolevel/vms/{vm}/guest", as_json, lambda v: _guest_out(vm, v))


def _guest_out(vm: str, v: dict[str, Any]) -> None:
    t = Table(title=f"{vm}: share mem {v['share']['mem']} / ssd {v['share']['ssd']} pages "
                    f"(SSD tier capacity {v['ssd_capacity']}), {v['clients']} producers")  # fmt: skip
    for col in ("container", "mem quota", "mem used", "ssd quota", "ssd used", "puts", "gets", "hits", "demoted"):
        t.add_column(col, justify="left" if col == "container" else "right")
    for name, c in v["containers"].items():
        t.add_row(name, str(c["quota"]["mem"]), str(c["used"]["mem"]), str(c["quota"]["ssd"]), str(c["used"]["ssd"]),
                  str(c["puts"]), str(c["gets"]), str(c["hits"]), str(c["demoted"]))
    console.print(t)


def _tl_out(v: dict[str, Any]) -> None:
    if v.get("exists") is False:
        console.print("no two-level cache (symbiont ssdcache twolevel setup --mem-mib N [--ssd-mib M])")
        return
    cap = v["capacity_pages"]
    t = Table(title=f"two-level cache: mem {cap['mem']} pages, ssd {cap['ssd']} pages (4 KiB)")
    for col in ("partition", "mem quota", "mem used", "ssd quota", "ssd used", "hits", "misses"):
        t.add_column(col, justify="left" if col == "partition" else "right")
    for name, p in v["partitions"].items():
        t.add_row(name, str(p["quota"]["mem"]), str(p["used"]["mem"]), str(p["quota"]["ssd"]),
                  str(p["used"]["ssd"]), str(p["hits"]), str(p["misses"]))
    console.print(t)
