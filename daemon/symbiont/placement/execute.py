"""Executing a plan's migrations through libvirt (live migration between configured hosts).

Why: a plan (Sandpiper moves, idle-VM consolidation) is only useful if it can be carried out.
Each move is a real ``virDomainMigrate3`` from the source host's libvirt connection to the
destination's (managed, client-driven: this process holds both connections), with
``VIR_MIGRATE_LIVE | PERSIST_DEST | UNDEFINE_SOURCE``: the guest keeps running, the
destination keeps its definition and the source forgets it.

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
4. the VM is registered with the destination's daemon (same policy), or re-registered with the
   source's if the migration failed.

Every move is logged as a decision with its inputs and outcome.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    vm: str
    src: str
    dst: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "from": self.src, "to": self.dst, "reason": self.reason}


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


def parse_moves(data: Any, where: str = "plan") -> list[MoveSpec]:
    """The migrations of a plan: ``{"moves": [{vm, from, to, reason}]}`` (``symbiont place plan
    --json`` with hotspots or idle consolidation) or idle ``{"actions": [{kind: move, vm, src, dst}]}``;
    other actions (shrink/grow/stay) are not migrations and are ignored here."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object with a 'moves' list")
    raw: list[tuple[str, Any]] = []
    if "moves" in data:
        if not isinstance(data["moves"], list):
            raise ValueError(f"{where}.moves: expected a list")
        raw += [(f"{where}.moves[{i}]", m) for i, m in enumerate(data["moves"])]
    if "actions" in data:
        if not isinstance(data["actions"], list):
            raise ValueError(f"{where}.actions: expected a list")
        raw += [
            (
                f"{where}.actions[{i}]",
                {"vm": a.get("vm"), "from": a.get("src"), "to": a.get("dst"), "reason": a.get("reason", "")},
            )
            for i, a in enumerate(data["actions"])
            if isinstance(a, Mapping) and a.get("kind") == "move"
        ]
    if "moves" not in data and "actions" not in data:
        raise ValueError(f"{where}: has no 'moves' (nor idle 'actions'): nothing to execute")
    out: list[MoveSpec] = []
    seen: set[str] = set()
    for w, m in raw:
        if not isinstance(m, Mapping):
            raise ValueError(f"{w}: expected an object with vm, from, to")
        for k in ("vm", "from", "to"):
            if not isinstance(m.get(k), str) or not m.get(k):
                raise ValueError(f"{w}.{k}: required, a non-empty string")
        if m["from"] == m["to"]:
            raise ValueError(f"{w}: {m['vm']} goes from {m['from']} to itself")
        if m["vm"] in seen:
            raise ValueError(f"{w}: VM {m['vm']!r} is moved twice in one plan")
        seen.add(m["vm"])
        out.append(MoveSpec(m["vm"], m["from"], m["to"], str(m.get("reason") or "")))
    return out


def check_moves(
    moves: Sequence[MoveSpec], hosts: Mapping[str, HostEntry], locate: Callable[[HostEntry, str], str | None]
) -> list[dict[str, Any]]:
    """Validate the whole plan before anything moves; return what each move would do.

    ``locate(host, vm)`` returns the VM's state on that host ("running", ...) or None when the
    host has no such domain. Raises ValueError naming the first problem.
    """
    if not moves:
        return []
    if not hosts:
        raise ValueError("no hosts configured (placement.hosts): cannot execute migrations")
    for m in moves:
        for role, h in (("from", m.src), ("to", m.dst)):
            if h not in hosts:
                raise ValueError(f"move of {m.vm}: unknown {role} host {h!r}; configured: {', '.join(hosts)}")
    steps = []
    for m in moves:
        state = locate(hosts[m.src], m.vm)
        if state is None:
            raise ValueError(
                f"move of {m.vm}: no domain {m.vm!r} on host {m.src} ({hosts[m.src].libvirt_uri})"
            )
        if state != "running":
            raise ValueError(f"move of {m.vm}: it is {state} on {m.src}; live migration needs a running VM")
        if locate(hosts[m.dst], m.vm) is not None:
            raise ValueError(f"move of {m.vm}: host {m.dst} already has a domain named {m.vm!r}")
        steps.append(
            {
                **m.to_dict(),
                "from_uri": hosts[m.src].libvirt_uri,
                "to_uri": hosts[m.dst].libvirt_uri,
                "migrate_uri": hosts[m.dst].migrate_uri or "(libvirt default)",
                "reregister": bool(hosts[m.dst].daemon),
            }
        )
    return steps


def migration_xml(xml: str, vm: str, dst: str, channel_name: str) -> tuple[str, dict[str, str]]:
    """The destination's domain XML: host-specific paths for the agent channel socket and the
    console log (both QEMUs run at once during a migration and would bind/truncate the same
    files). Returns the XML and the paths changed (old -> new)."""
    root = ET.fromstring(xml)
    changed: dict[str, str] = {}
    for ch in root.iterfind("./devices/channel"):
        t, s = ch.find("target"), ch.find("source")
        if ch.get("type") == "unix" and t is not None and t.get("name") == channel_name and s is not None:
            old = s.get("path") or ""
            if old:
                changed[old] = str(PurePosixPath(old).parent / f"{vm}@{dst}.agent.sock")
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
    """Carries out moves with libvirt (and the hosts' daemons); see the module docstring."""

    def __init__(
        self,
        hosts: Mapping[str, HostEntry],
        channel_name: str = "org.symbiont.agent.0",
        unsafe: bool = False,
        log_decision: DecisionFn | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.hosts = dict(hosts)
        self.channel_name = channel_name
        self.unsafe = unsafe
        self.log_decision = log_decision or (lambda *a: None)
        self.progress = progress or (lambda *a: None)
        self._conns: dict[str, Any] = {}

    def close(self) -> None:
        for c in self._conns.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
                pass
        self._conns.clear()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def conn(self, host: HostEntry) -> Any:
        import libvirt

        c = self._conns.get(host.id)
        if c is None:
            try:
                c = self._conns[host.id] = libvirt.open(host.libvirt_uri)
            except libvirt.libvirtError as exc:
                raise ValueError(f"host {host.id}: cannot connect to {host.libvirt_uri}: {exc}") from None
        return c

    def locate(self, host: HostEntry, vm: str) -> str | None:
        import libvirt

        from symbiont.host.libvirt_host import STATE_NAMES

        try:
            dom = self.conn(host).lookupByName(vm)
        except libvirt.libvirtError:
            return None
        return STATE_NAMES.get(dom.state()[0], "unknown")

    def check(self, moves: Sequence[MoveSpec]) -> list[dict[str, Any]]:
        return check_moves(moves, self.hosts, self.locate)

    def execute(self, moves: Sequence[MoveSpec]) -> list[dict[str, Any]]:
        """Check the whole plan, then migrate one VM after the other; stop at the first failure."""
        self.check(moves)
        results = []
        for m in moves:
            res = self.migrate(m)
            results.append(res)
            if not res["ok"]:
                break
        return results

    def migrate(self, m: MoveSpec) -> dict[str, Any]:
        import libvirt

        src, dst = self.hosts[m.src], self.hosts[m.dst]
        inputs: dict[str, Any] = {
            **m.to_dict(),
            "from_uri": src.libvirt_uri,
            "to_uri": dst.libvirt_uri,
            "migrate_uri": dst.migrate_uri,
            "unsafe": self.unsafe,
        }
        t0 = time.monotonic()
        policy = _daemon_unregister(src, m.vm)
        inputs["policy"] = policy
        dom = self.conn(src).lookupByName(m.vm)
        outcome: dict[str, Any] = {"ok": False}
        try:
            dxml, changed = migration_xml(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), m.vm, m.dst, self.channel_name
            )
            inputs["paths_changed"] = changed
            params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: dxml}
            if dst.migrate_uri:
                params[libvirt.VIR_MIGRATE_PARAM_URI] = dst.migrate_uri
                host = dst.migrate_uri.split("://", 1)[-1].split(":", 1)[0].strip("[]/")
                if host:
                    params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = host
            flags = (
                libvirt.VIR_MIGRATE_LIVE
                | libvirt.VIR_MIGRATE_PERSIST_DEST
                | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            )
            if self.unsafe:
                flags |= libvirt.VIR_MIGRATE_UNSAFE
            stats = self._run_with_progress(dom, self.conn(dst), m.vm, params, flags)
            outcome = {"ok": True, "seconds": round(time.monotonic() - t0, 2), **stats}
        except (libvirt.libvirtError, ValueError) as exc:
            msg = (exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else None) or str(exc)
            outcome = {"ok": False, "error": msg, "seconds": round(time.monotonic() - t0, 2)}
        home = dst if outcome["ok"] else src
        if policy is not None:
            outcome["registered_on"] = home.id if _daemon_register(home, m.vm, policy, outcome) else None
        self.log_decision("migrate", m.vm, inputs, outcome)
        return {**m.to_dict(), **outcome}

    def _run_with_progress(
        self, dom: Any, dconn: Any, vm: str, params: dict[str, Any], flags: int
    ) -> dict[str, Any]:
        """``migrate3`` in a thread while the job statistics feed the progress callback."""
        import libvirt

        err: list[BaseException] = []
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["dom"] = dom.migrate3(dconn, params, flags)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                err.append(exc)

        th = threading.Thread(target=run, name=f"migrate-{vm}", daemon=True)
        th.start()
        last: dict[str, Any] = {}
        while True:
            th.join(0.5)
            alive = th.is_alive()
            try:
                # Once done, the source keeps the completed job's statistics (while it still knows
                # the domain: with UNDEFINE_SOURCE it may not, and the last poll stands).
                js = dom.jobStats(0 if alive else libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            except libvirt.libvirtError:
                js = {}
            if js.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
                last = js
                total = float(js.get("memory_total", 0) or 0)
                done = float(js.get("memory_processed", 0) or 0)
                if total:
                    self.progress(vm, done, total)
            if not alive:
                break
        if err:
            raise err[0]
        return {
            "memory_total_bytes": last.get("memory_total"),
            "memory_processed_bytes": last.get("memory_processed"),
            "iterations": last.get("memory_iteration"),
        }


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


def _daemon_unregister(host: HostEntry, vm: str) -> dict[str, Any] | None:
    """Unregister ``vm`` from ``host``'s daemon (restoring its knobs); return its policy, or None."""
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
    return dict(view.get("policy") or {})


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
