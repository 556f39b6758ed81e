"""Executing a plan's migrations through libvirt (live migration between configured hosts).

Why: a plan (Sandpiper moves, idle-VM consolidation) is only useful if it can be carried out.
Each move is a real ``virDomainMigrate3`` from the source host's libvirt connection to the
destination's (managed, client-driven: this process holds both connections), with
``VIR_MIGRATE_LIVE | PERSIST_DEST | UNDEFINE_SOURCE``: the guest keeps running, the
destination keeps its definition and the source forgets it. The libvirt calls live in
:mod:`symbiont.host.migrate` (host/ is the only door to libvirt); this module keeps the books.

Hosts come from the config (``placement.hosts``: id, libvirt URI, optional daemon socket and
migration URI). Before anything moves the whole plan is checked — every host known, every VM
running on its ``from`` host and absent from its ``to`` host, no VM twice — and any error
changes nothing. Then, per move:

1. if the source host runs a daemon and the VM is registered there, it is unregistered (which
   restores every knob that daemon turned, while the VM is still there to restore them on),
2. the domain XML for the destination (``dxml``) gets host-specific paths for what both QEMUs
   would otherwise open at once during the migration: the agent's virtio-serial socket and the
   serial console log (the disk is shared storage and stays the same file),
3. the migration runs, with progress from the source's job statistics,
4. the VM is registered with the destination's daemon (same policy; see :func:`parked_policy`), or re-registered with the
   source's if the migration failed.

An idle plan (seeds/004) also has balloon steps: ``shrink`` (to the working set, before the move
to the idle host) and ``grow`` (back to full size, after the move home). They run, in plan order,
through the daemon of the host the VM is on at that point (``PUT /v1/vms/{vm}/memory``), which
saves the balloon's original value in its sqlite before moving it. A source daemon restores its
knobs when it lets go of a VM (step 1), so a move that follows a shrink of the same VM carries the
shrunk size (what the source daemon's balloon knob holds then, which may be a newer floor than the
plan's): the destination's daemon sets it again right after the migration. Such a move parks
the VM: its registration at the destination records its home host and full size (the source's
saved balloon original), which a later wake-up moves it back to and grows it to.

Every step is logged as a decision with its inputs and outcome.
"""

from __future__ import annotations

import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

HOST_KEYS = ("id", "libvirt_uri", "daemon", "migrate_uri")


@dataclass(frozen=True)
class HostEntry:
    """One configured host: where its libvirt is, and optionally its daemon and migration URI."""

    id: str
    libvirt_uri: str
    daemon: str = ""  # socket path (or http URL) of that host's symbiontd; empty: none
    migrate_uri: str = ""  # where the destination QEMU listens, e.g. tcp://10.0.0.2; empty: libvirt's default


@dataclass(frozen=True)
class MoveSpec:
    """A live migration; ``balloon_mib``: the balloon target to set again on the destination (the
    size an earlier shrink step of the plan gave the VM)."""

    vm: str
    src: str
    dst: str
    reason: str = ""
    balloon_mib: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": "move",
            "vm": self.vm,
            "from": self.src,
            "to": self.dst,
            "reason": self.reason,
        }
        if self.balloon_mib is not None:
            d["balloon_mib"] = self.balloon_mib
        return d


@dataclass(frozen=True)
class MemorySpec:
    """A balloon step of an idle plan: ``shrink``/``grow`` ``vm`` on ``host`` to ``mem_mib``."""

    kind: str
    vm: str
    host: str
    mem_mib: int
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "vm": self.vm,
            "host": self.host,
            "mem_to": self.mem_mib,
            "reason": self.reason,
        }


Step = MoveSpec | MemorySpec
MEM_KINDS = ("shrink", "grow")
MEM_RANGE = (64, 1 << 22)  # what PUT /v1/vms/{vm}/memory accepts, MiB


def parse_hosts(entries: Sequence[Any], where: str = "placement.hosts") -> dict[str, HostEntry]:
    """Host entries (from the config) by id; errors name the entry and key."""
    out: dict[str, HostEntry] = {}
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"{where}: must be a list of hosts")
    for i, e in enumerate(entries):
        w = f"{where}[{i}]"
        if not isinstance(e, Mapping):
            raise ValueError(f"{w}: must be a mapping with keys {', '.join(HOST_KEYS)}")
        unknown = [k for k in e if k not in HOST_KEYS]
        if unknown:
            raise ValueError(f"{w}.{unknown[0]}: unknown key (known: {', '.join(HOST_KEYS)})")
        for k in ("id", "libvirt_uri"):
            if not isinstance(e.get(k), str) or not e.get(k):
                raise ValueError(f"{w}.{k}: required, a non-empty string")
        for k in ("daemon", "migrate_uri"):
            if k in e and not isinstance(e[k], str):
                raise ValueError(f"{w}.{k}: must be a string")
        if e["id"] in out:
            raise ValueError(f"{w}.id: host {e['id']!r} is listed twice")
        out[e["id"]] = HostEntry(e["id"], e["libvirt_uri"], e.get("daemon", ""), e.get("migrate_uri", ""))
    return out


def parse_plan(data: Any, where: str = "plan") -> list[Step]:
    """The steps of a plan, in order: ``{"moves": [{vm, from, to, reason}]}`` (``symbiont place plan
    --json``, Sandpiper or idle) and idle ``actions`` (top level, or under ``idle`` as ``place plan``
    writes them: ``{kind: shrink|move|grow|stay, vm, src, dst, mem_to}``). Moves that an action list
    repeats come from the actions, so shrink/move/grow keep their order; ``stay`` is informational.
    A move that follows a shrink of the same VM carries the shrunk size (``balloon_mib``)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object with a 'moves' list")
    actions: Any = None
    awhere = f"{where}.actions"
    if "actions" in data:
        actions = data["actions"]
    elif isinstance(data.get("idle"), Mapping) and "actions" in data["idle"]:
        actions, awhere = data["idle"]["actions"], f"{where}.idle.actions"
    if "moves" not in data and actions is None:
        raise ValueError(f"{where}: has no 'moves' (nor idle 'actions'): nothing to execute")
    raw: list[tuple[str, Any]] = []
    if "moves" in data:
        if not isinstance(data["moves"], list):
            raise ValueError(f"{where}.moves: expected a list")
        raw += [(f"{where}.moves[{i}]", m) for i, m in enumerate(data["moves"])]
    if actions is not None:
        if not isinstance(actions, list):
            raise ValueError(f"{awhere}: expected a list")
        in_actions = {
            (a.get("vm"), a.get("src"), a.get("dst"))
            for a in actions
            if isinstance(a, Mapping) and a.get("kind") == "move"
        }
        raw = [
            (w, m)
            for w, m in raw
            if not (isinstance(m, Mapping) and (m.get("vm"), m.get("from"), m.get("to")) in in_actions)
        ]
        for i, a in enumerate(actions):
            w = f"{awhere}[{i}]"
            if not isinstance(a, Mapping):
                raise ValueError(f"{w}: expected an object with kind, vm")
            kind = a.get("kind")
            if kind == "move":
                raw.append((w, {"vm": a.get("vm"), "from": a.get("src"), "to": a.get("dst"),
                                "reason": a.get("reason", ""), "balloon_mib": a.get("balloon_mib")}))  # fmt: skip
            elif kind in MEM_KINDS:
                raw.append((w, a))
            elif kind != "stay":
                raise ValueError(f"{w}.kind: {kind!r} is not one of move, {', '.join(MEM_KINDS)}, stay")
    out: list[Step] = []
    seen: set[str] = set()
    shrunk: dict[str, int] = {}
    for w, m in raw:
        if not isinstance(m, Mapping):
            raise ValueError(f"{w}: expected an object with vm, from, to")
        if m.get("kind") in MEM_KINDS:
            out.append(_memory_step(w, m))
            if m["kind"] == "shrink":
                shrunk[m["vm"]] = out[-1].mem_mib  # type: ignore[union-attr]
            else:
                shrunk.pop(m["vm"], None)
            continue
        for k in ("vm", "from", "to"):
            if not isinstance(m.get(k), str) or not m.get(k):
                raise ValueError(f"{w}.{k}: required, a non-empty string")
        if m["from"] == m["to"]:
            raise ValueError(f"{w}: {m['vm']} goes from {m['from']} to itself")
        if m["vm"] in seen:
            raise ValueError(f"{w}: VM {m['vm']!r} is moved twice in one plan")
        seen.add(m["vm"])
        carried = shrunk.pop(m["vm"], None)
        bal = _mib(f"{w}.balloon_mib", m["balloon_mib"]) if m.get("balloon_mib") is not None else carried
        out.append(MoveSpec(m["vm"], m["from"], m["to"], str(m.get("reason") or ""), bal))
    return out


def _mib(where: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: expected a number of MiB")
    n = int(math.ceil(v))
    if not MEM_RANGE[0] <= n <= MEM_RANGE[1]:
        raise ValueError(f"{where}: {n} MiB outside {MEM_RANGE[0]}..{MEM_RANGE[1]}")
    return n


def _memory_step(w: str, a: Mapping[str, Any]) -> MemorySpec:
    for k in ("vm", "src"):
        if not isinstance(a.get(k), str) or not a.get(k):
            raise ValueError(f"{w}.{k}: required, a non-empty string")
    return MemorySpec(
        a["kind"], a["vm"], a["src"], _mib(f"{w}.mem_to", a.get("mem_to")), str(a.get("reason") or "")
    )


def parse_moves(data: Any, where: str = "plan") -> list[MoveSpec]:
    """Only the migrations of a plan (see :func:`parse_plan`)."""
    return [s for s in parse_plan(data, where) if isinstance(s, MoveSpec)]


def check_moves(
    moves: Sequence[MoveSpec], hosts: Mapping[str, HostEntry], locate: Callable[[HostEntry, str], str | None]
) -> list[dict[str, Any]]:
    """:func:`check_plan` for a plan of migrations only."""
    return check_plan(moves, hosts, locate)


ViewFn = Callable[[HostEntry, str], "dict[str, Any] | None"]  # host, vm -> that daemon's view, or None


def check_plan(
    steps: Sequence[Step],
    hosts: Mapping[str, HostEntry],
    locate: Callable[[HostEntry, str], str | None],
    view: ViewFn | None = None,
) -> list[dict[str, Any]]:
    """Validate the whole plan before anything changes; return what each step would do.

    ``locate(host, vm)`` returns the VM's state on that host ("running", ...) or None when the
    host has no such domain. ``view(host, vm)`` returns that host's daemon's view of the VM (its
    policy and maximum memory) or None when it is not registered there; balloon steps need it.
    Steps are followed in order, so a step sees where earlier moves put the VM. Raises
    ValueError naming the first problem.
    """
    if not steps:
        return []
    if not hosts:
        raise ValueError("no hosts configured (placement.hosts): cannot execute migrations")
    for s in steps:
        if isinstance(s, MoveSpec):
            for role, h in (("from", s.src), ("to", s.dst)):
                if h not in hosts:
                    raise ValueError(
                        f"move of {s.vm}: unknown {role} host {h!r}; configured: {', '.join(hosts)}"
                    )
        else:
            if s.host not in hosts:
                raise ValueError(
                    f"{s.kind} of {s.vm}: unknown host {s.host!r}; configured: {', '.join(hosts)}"
                )
            if not hosts[s.host].daemon:
                raise ValueError(
                    f"{s.kind} of {s.vm}: host {s.host} has no daemon configured (placement.hosts[].daemon) "
                    "to move the balloon through"
                )
    where: dict[str, str] = {}  # vm -> host, after the moves so far
    views: dict[str, dict[str, Any] | None] = {}  # vm -> a daemon's view (policy, max memory)
    origin: dict[str, str] = {}  # vm -> the host it runs on before the plan
    out = []
    for s in steps:
        if isinstance(s, MoveSpec):
            if s.vm in where and where[s.vm] != s.src:
                raise ValueError(f"move of {s.vm}: the plan has it on {where[s.vm]} by then, not on {s.src}")
            if s.vm not in where:
                _running(s.vm, s.src, hosts, locate, "move")
                if locate(hosts[s.dst], s.vm) is not None:
                    raise ValueError(f"move of {s.vm}: host {s.dst} already has a domain named {s.vm!r}")
                origin[s.vm] = s.src
            where[s.vm] = s.dst
            out.append(
                {
                    **s.to_dict(),
                    "from_uri": hosts[s.src].libvirt_uri,
                    "to_uri": hosts[s.dst].libvirt_uri,
                    "migrate_uri": hosts[s.dst].migrate_uri or "(libvirt default)",
                    "reregister": bool(hosts[s.dst].daemon),
                }
            )
            continue
        if s.vm in where:
            if where[s.vm] != s.host:
                raise ValueError(
                    f"{s.kind} of {s.vm}: the plan has it on {where[s.vm]} by then, not on {s.host}"
                )
        else:
            _running(s.vm, s.host, hosts, locate, s.kind)
            where[s.vm] = s.host
            v = view(hosts[s.host], s.vm) if view is not None else None
            if v is None:
                raise ValueError(
                    f"{s.kind} of {s.vm}: not registered with host {s.host}'s daemon ({hosts[s.host].daemon})"
                )
            views[s.vm] = v
        if s.vm not in views:  # moved earlier in the plan: its policy comes from where it started
            first = hosts[origin[s.vm]]
            views[s.vm] = view(first, s.vm) if view is not None and first.daemon else None
        v = views.get(s.vm)
        rng: list[int] | None = None
        if v is not None:
            mem = (v.get("policy") or {}).get("memory") or {}
            top = int(v.get("max_memory_mib") or MEM_RANGE[1])
            rng = [int(mem.get("min_mib") or 64), min(int(mem.get("max_mib") or top), top)]
            if not rng[0] <= s.mem_mib <= rng[1]:
                raise ValueError(
                    f"{s.kind} of {s.vm}: {s.mem_mib} MiB outside its range {rng[0]}..{rng[1]} MiB"
                )
            fl = v.get("memory_floor") or {}
            if s.kind == "shrink" and isinstance(fl.get("floor_mib"), int) and s.mem_mib < fl["floor_mib"]:
                # Below what the guest needs now (its daemon would refuse it): the shrink goes to
                # the floor instead. A plan made a little earlier is a little stale (the guest's
                # used memory moves); a 75 MiB shrink of a 512 MiB guest is never carried out.
                if fl["floor_mib"] > rng[1]:
                    raise ValueError(
                        f"{s.kind} of {s.vm}: its guest floor {fl['floor_mib']} MiB is above "
                        f"its range {rng[0]}..{rng[1]} MiB"
                    )
                out.append(
                    {
                        **s.to_dict(),
                        "daemon": hosts[s.host].daemon,
                        "range_mib": rng,
                        "clamped_to": fl["floor_mib"],
                        "clamp_reason": f"{s.mem_mib} MiB is below the guest's safe floor "
                        f"({fl.get('reason') or fl['floor_mib']})",
                    }
                )
                continue
        out.append({**s.to_dict(), "daemon": hosts[s.host].daemon, "range_mib": rng})
    return out


def clamped_steps(
    steps: Sequence[Step], checked: Sequence[Mapping[str, Any]]
) -> list[tuple[Step, dict | None]]:
    """The steps as they run: a shrink that :func:`check_plan` found below the guest's floor goes
    to the floor (with ``{"clamped_from", "clamp_reason"}`` for its result), and a later move of
    the same VM carries the clamped size to its destination."""
    out: list[tuple[Step, dict | None]] = []
    size: dict[str, int] = {}
    for s, c in zip(steps, checked, strict=True):
        if isinstance(s, MemorySpec):
            size.pop(s.vm, None)
            if c.get("clamped_to") is not None:
                size[s.vm] = int(c["clamped_to"])
                out.append(
                    (
                        replace(s, mem_mib=int(c["clamped_to"])),
                        {"clamped_from": s.mem_mib, "clamp_reason": c["clamp_reason"]},
                    )
                )
                continue
        elif s.vm in size and s.balloon_mib is not None and s.balloon_mib < size[s.vm]:
            out.append((replace(s, balloon_mib=size[s.vm]), None))
            continue
        out.append((s, None))
    return out


def _running(vm: str, host: str, hosts: Mapping[str, HostEntry], locate: Callable[[HostEntry, str], str | None],
             what: str) -> None:  # fmt: skip
    state = locate(hosts[host], vm)
    if state is None:
        raise ValueError(f"{what} of {vm}: no domain {vm!r} on host {host} ({hosts[host].libvirt_uri})")
    if state != "running":
        need = "live migration" if what == "move" else "the balloon"
        raise ValueError(f"{what} of {vm}: it is {state} on {host}; {need} needs a running VM")


def migration_xml(xml: str, vm: str, dst: str, channel_name: str) -> tuple[str, dict[str, str]]:
    """The destination's domain XML: host-specific paths for the channel sockets (the agent's
    and any other, such as the GPU port) and the console log (both QEMUs run at once during a migration and would bind/truncate the same
    files). Returns the XML and the paths changed (old -> new)."""
    root = ET.fromstring(xml)
    changed: dict[str, str] = {}
    for ch in root.iterfind("./devices/channel"):
        t, s = ch.find("target"), ch.find("source")
        if ch.get("type") == "unix" and t is not None and s is not None and s.get("path"):
            old = s.get("path") or ""
            if t.get("name") == channel_name:
                changed[old] = str(PurePosixPath(old).parent / f"{vm}@{dst}.agent.sock")
            else:  # the VM's other lab channels (the GPU port): VM[@HOST].x.sock -> VM@DST.x.sock
                m = re.fullmatch(rf"{re.escape(vm)}(?:@[^./]*)?\.(.+)", PurePosixPath(old).name)
                if m:
                    changed[old] = str(PurePosixPath(old).parent / f"{vm}@{dst}.{m.group(1)}")
    for serial in root.iterfind("./devices/serial"):
        lg = serial.find("log")
        if lg is not None and lg.get("file"):
            old = lg.get("file") or ""
            changed[old] = str(PurePosixPath(old).parent / f"console@{dst}.log")
    for old, new in changed.items():
        if len(new.encode()) > 107 and new.endswith(".sock"):
            raise ValueError(f"{vm}: channel socket path {new} is too long for a unix socket")
        xml = xml.replace(f"'{old}'", f"'{new}'").replace(f'"{old}"', f'"{new}"')
    return xml, changed


ProgressFn = Callable[[str, float, float], None]  # vm, bytes processed, bytes total
DecisionFn = Callable[[str, str | None, dict[str, Any], dict[str, Any]], None]  # action, vm, inputs, outcome


class Executor:
    """Carries out moves (through the host port's :class:`symbiont.host.migrate.RemoteLibvirt`)
    and balloon steps (through the hosts' daemons); see the module docstring."""

    def __init__(
        self,
        hosts: Mapping[str, HostEntry],
        channel_name: str = "org.symbiont.agent.0",
        unsafe: bool = False,
        log_decision: DecisionFn | None = None,
        progress: ProgressFn | None = None,
        remote: Any = None,
    ) -> None:
        self.hosts = dict(hosts)
        self.channel_name = channel_name
        self.unsafe = unsafe
        self.log_decision = log_decision or (lambda *a: None)
        self.progress = progress or (lambda *a: None)
        if remote is None:
            from symbiont.host.migrate import RemoteLibvirt

            remote = RemoteLibvirt()
        self.remote = remote  # RemoteLibvirt: the only code here that talks to libvirt

    def close(self) -> None:
        self.remote.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def locate(self, host: HostEntry, vm: str) -> str | None:
        from symbiont.host.port import HostError

        try:
            return self.remote.state(host.libvirt_uri, vm)
        except HostError as exc:
            raise ValueError(f"host {host.id}: {exc}") from None

    def view(self, host: HostEntry, vm: str) -> dict[str, Any] | None:
        """``host``'s daemon's view of ``vm`` (policy, balloon, knobs), None if not registered there."""
        if not host.daemon:
            return None
        from symbiont.client import ApiError

        try:
            with _client(host.daemon) as c:
                view = dict(c.get(f"/v1/vms/{vm}"))
                try:  # the guest floor (issue 16 item 12); a daemon without the memory part has none
                    view["memory_floor"] = dict(c.get(f"/v1/memory/vms/{vm}/floor"))
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                return view
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise ValueError(f"host {host.id}: daemon at {host.daemon}: {exc}") from None

    def check(self, steps: Sequence[Step]) -> list[dict[str, Any]]:
        return check_plan(steps, self.hosts, self.locate, self.view)

    def execute(self, steps: Sequence[Step]) -> list[dict[str, Any]]:
        """Check the whole plan, then run one step after the other; stop at the first failure."""
        checked = self.check(steps)
        results = []
        for s, clamp in clamped_steps(steps, checked):
            res = self.migrate(s) if isinstance(s, MoveSpec) else self.set_memory(s)
            if clamp is not None:
                res = {**res, **clamp}
            results.append(res)
            if not res["ok"]:
                break
        return results

    def set_memory(self, s: MemorySpec) -> dict[str, Any]:
        """A balloon step through the daemon of the host the VM is on (it saves the original first)."""
        host = self.hosts[s.host]
        inputs: dict[str, Any] = {**s.to_dict(), "daemon": host.daemon}
        t0 = time.monotonic()
        outcome = _daemon_set_memory(host, s.vm, s.mem_mib)
        outcome["seconds"] = round(time.monotonic() - t0, 2)
        self.log_decision(s.kind, s.vm, inputs, outcome)
        return {**s.to_dict(), **outcome}

    def migrate(self, m: MoveSpec) -> dict[str, Any]:
        from symbiont.host.port import HostError

        src, dst = self.hosts[m.src], self.hosts[m.dst]
        inputs: dict[str, Any] = {
            **m.to_dict(),
            "from_uri": src.libvirt_uri,
            "to_uri": dst.libvirt_uri,
            "migrate_uri": dst.migrate_uri,
            "unsafe": self.unsafe,
        }
        t0 = time.monotonic()
        view = _daemon_unregister(src, m.vm)
        if m.balloon_mib is not None and (held := _balloon_set(view)) is not None and held != m.balloon_mib:
            # The move carries the size the source daemon really set, not the plan's: the steps
            # may run as separate plans (``place execute --yes``, the cluster controller), each
            # checked against the guest floor of its own moment, so the shrink may have gone to a
            # floor newer than the one the plan (or its dry run) saw.
            inputs["planned_balloon_mib"] = m.balloon_mib
            m = replace(m, balloon_mib=held)
            inputs["balloon_mib"] = held
        policy = dict(view.get("policy") or {}) if view is not None else None
        inputs["policy"] = policy
        dst_policy = parked_policy(policy, view, m) if policy is not None else None
        outcome: dict[str, Any] = {"ok": False}
        try:
            dxml, changed = migration_xml(
                self.remote.migratable_xml(src.libvirt_uri, m.vm), m.vm, m.dst, self.channel_name
            )
            inputs["paths_changed"] = changed
            stats = self.remote.migrate(
                src.libvirt_uri, dst.libvirt_uri, m.vm, dxml, dst.migrate_uri, self.unsafe,
                lambda done, total: self.progress(m.vm, done, total),
            )
            outcome = {"ok": True, "seconds": round(time.monotonic() - t0, 2), **stats}
        except (HostError, ValueError) as exc:
            outcome = {"ok": False, "error": str(exc), "seconds": round(time.monotonic() - t0, 2)}
        home = dst if outcome["ok"] else src
        if policy is not None and dst_policy is not None:
            pol = dst_policy if outcome["ok"] else policy
            outcome["registered_on"] = home.id if _daemon_register(home, m.vm, pol, outcome) else None
        if m.balloon_mib is not None and outcome["ok"]:
            # The source daemon restored the balloon when it let go; the destination's sets the
            # plan's shrunk size again (and keeps the full size as the knob's original).
            if outcome.get("registered_on") == dst.id:
                outcome["balloon"] = _daemon_set_memory(dst, m.vm, m.balloon_mib)
            else:
                outcome["balloon"] = {"ok": False, "error": f"not registered with host {dst.id}'s daemon"}
        self.log_decision("migrate", m.vm, inputs, outcome)
        return {**m.to_dict(), **outcome}


def _client(spec: str) -> Any:
    """An API client for a daemon given as a unix socket path or an http(s) URL."""
    if spec.startswith(("http://", "https://")):
        import httpx

        from symbiont.client import Client

        c = Client.__new__(Client)
        c.socket_path = spec
        c._http = httpx.Client(base_url=spec, timeout=60.0)
        return c
    from symbiont.client import Client

    return Client(spec)


def parked_policy(policy: dict[str, Any], view: Mapping[str, Any], m: MoveSpec) -> dict[str, Any]:
    """The policy to register ``m.vm`` with at the destination. A move that carries a shrunk
    balloon parks the VM (idle consolidation): its registration records where it came from and its
    full size (``extra.placement = {home, full_mem_mib}``, in the destination daemon's sqlite), which
    a wake-up plan moves it back to and grows it to. Any other move ends the parking."""
    extra = dict(policy.get("extra") or {})
    old = extra.get("placement") if isinstance(extra.get("placement"), Mapping) else {}
    if m.balloon_mib is not None:
        full = old.get("full_mem_mib")
        if full is None:
            knob = [k for k in view.get("knobs") or [] if k.get("knob") == "balloon_mib"]
            full = knob[0]["original"] if knob else view.get("balloon_mib") or view.get("max_memory_mib")
        extra["placement"] = {"home": old.get("home") or m.src, "full_mem_mib": full}
    else:
        extra.pop("placement", None)
    return {**policy, "extra": extra}


def _balloon_set(view: Mapping[str, Any] | None) -> int | None:
    """The balloon size a daemon's view says it set (its ``balloon_mib`` knob), or None."""
    for k in (view or {}).get("knobs") or []:
        if isinstance(k, Mapping) and k.get("knob") == "balloon_mib":
            cur = k.get("current")
            return cur if isinstance(cur, int) and not isinstance(cur, bool) else None
    return None


def _daemon_unregister(host: HostEntry, vm: str) -> dict[str, Any] | None:
    """Unregister ``vm`` from ``host``'s daemon (restoring its knobs); return its view (policy,
    knobs, balloon) from just before, or None."""
    if not host.daemon:
        return None
    from symbiont.client import ApiError

    with _client(host.daemon) as c:
        try:
            view = c.get(f"/v1/vms/{vm}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise ValueError(f"host {host.id}: daemon at {host.daemon}: {exc}") from None
        c.delete(f"/v1/vms/{vm}")
    return dict(view)


def _daemon_register(host: HostEntry, vm: str, policy: dict[str, Any], outcome: dict[str, Any]) -> bool:
    if not host.daemon:
        return False
    from symbiont.client import ApiError

    try:
        with _client(host.daemon) as c:
            c.post("/v1/vms", {"name": vm, **policy})
        return True
    except ApiError as exc:
        outcome["register_error"] = f"host {host.id}: {exc}"
        return False


def _daemon_set_memory(host: HostEntry, vm: str, mib: int) -> dict[str, Any]:
    """``PUT /v1/vms/{vm}/memory`` on ``host``'s daemon: ``{ok, before_mib, target_mib}`` or ``{ok, error}``."""
    from symbiont.client import ApiError

    try:
        with _client(host.daemon) as c:
            r = c.put(f"/v1/vms/{vm}/memory", {"target_mib": int(mib)})
        return {"ok": True, "before_mib": r.get("before_mib"), "target_mib": r.get("target_mib")}
    except ApiError as exc:
        return {"ok": False, "error": f"host {host.id}: {exc}"}
