"""Other hosts' libvirt, for live migration between them (the placement part's door).

Why here: libvirt is imported only under ``symbiont/host/`` (issue 14). A plan's move is a
managed, client-driven ``virDomainMigrate3`` between two libvirt connections this process
holds (:class:`symbiont.placement.execute.Executor` decides what moves and keeps the books;
this module only talks to libvirt). Connections are opened per URI on first use and kept
until :meth:`RemoteLibvirt.close`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import libvirt

from symbiont.host.libvirt_host import STATE_NAMES
from symbiont.host.port import HostError

ProgressFn = Callable[[float, float], None]  # bytes processed, bytes total


class RemoteLibvirt:
    """Connections to the libvirt of the hosts a plan moves VMs between."""

    def __init__(self) -> None:
        self._conns: dict[str, Any] = {}

    def conn(self, uri: str) -> Any:
        """The (kept) connection to ``uri``; :class:`HostError` when it cannot be opened.
        Raw libvirt objects leave host/ only for the cluster controller's reconciliation."""
        c = self._conns.get(uri)
        if c is None:
            try:
                c = self._conns[uri] = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                raise HostError(f"cannot connect to {uri}: {exc}") from None
        return c

    def close(self) -> None:
        for c in self._conns.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
                pass
        self._conns.clear()

    def state(self, uri: str, vm: str) -> str | None:
        """``vm``'s state name on the host at ``uri`` (running, shutoff, ...), None if absent."""
        try:
            dom = self.conn(uri).lookupByName(vm)
        except libvirt.libvirtError:
            return None
        return STATE_NAMES.get(dom.state()[0], "unknown")

    def migratable_xml(self, uri: str, vm: str) -> str:
        """The domain XML a destination can define (``VIR_DOMAIN_XML_MIGRATABLE``)."""
        try:
            return self.conn(uri).lookupByName(vm).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        except libvirt.libvirtError as exc:
            raise HostError(f"domain {vm!r} on {uri}: {exc.get_error_message() or exc}") from None

    # -- the cluster controller's crash reconciliation (symbiont.cluster.controller) -------------
    def _dom(self, uri: str, vm: str) -> Any:
        try:
            return self.conn(uri).lookupByName(vm)
        except libvirt.libvirtError as exc:
            raise HostError(f"domain {vm!r} on {uri}: {exc.get_error_message() or exc}") from None

    def abort_job(self, uri: str, vm: str) -> bool:
        """Cancel ``vm``'s job (a migration a source libvirtd still sends); False when libvirt
        refuses (no such domain, no job): the caller only wants nothing left streaming."""
        try:
            self.conn(uri).lookupByName(vm).abortJob()
        except libvirt.libvirtError:
            return False
        return True

    def remove(self, uri: str, vm: str) -> None:
        """Drop a duplicate copy of ``vm``: destroy it if active, undefine it if persistent."""
        dom = self._dom(uri, vm)
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError as exc:
            raise HostError(f"removing {vm!r} on {uri}: {exc.get_error_message() or exc}") from None

    def resume_if_paused(self, uri: str, vm: str) -> bool:
        """Resume ``vm`` if paused (a migration killed mid-way leaves it so); True if it was."""
        dom = self._dom(uri, vm)
        try:
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                return False
            dom.resume()
        except libvirt.libvirtError as exc:
            raise HostError(f"resuming {vm!r} on {uri}: {exc.get_error_message() or exc}") from None
        return True

    def ensure_persistent(self, uri: str, vm: str) -> bool:
        """Define a transient ``vm`` from its migratable XML (an incoming copy is transient until
        the migration finishes); True if it had to."""
        dom = self._dom(uri, vm)
        try:
            if dom.isPersistent():
                return False
            self.conn(uri).defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        except libvirt.libvirtError as exc:
            raise HostError(f"defining {vm!r} on {uri}: {exc.get_error_message() or exc}") from None
        return True

    def migrate(self, src_uri: str, dst_uri: str, vm: str, dest_xml: str, migrate_uri: str = "",
                unsafe: bool = False, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Live-migrate ``vm`` (LIVE | PERSIST_DEST | UNDEFINE_SOURCE, UNSAFE if asked) with
        ``dest_xml``; QEMU listens on ``migrate_uri``'s host when one is given. Returns the job's
        last statistics; :class:`HostError` with libvirt's message on failure."""
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml}
        if migrate_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
            host = migrate_uri.split("://", 1)[-1].split(":", 1)[0].strip("[]/")
            if host:
                params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = host
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        try:
            dom = self.conn(src_uri).lookupByName(vm)
            return _run_with_progress(dom, self.conn(dst_uri), vm, params, flags, progress or (lambda d, t: None))
        except libvirt.libvirtError as exc:
            raise HostError(exc.get_error_message() or str(exc)) from None


def quiet_errors() -> None:
    """Stop libvirt printing its errors on stderr: they arrive as exceptions all the same."""
    libvirt.registerErrorHandler(lambda _c, _e: None, None)


def _run_with_progress(dom: Any, dconn: Any, vm: str, params: dict[str, Any], flags: int,
                       progress: ProgressFn) -> dict[str, Any]:
    """``migrate3`` in a thread while the job statistics feed ``progress``."""
    err: list[BaseException] = []

    def run() -> None:
        try:
            dom.migrate3(dconn, params, flags)
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
                progress(done, total)
        if not alive:
            break
    if err:
        raise err[0]
    return {
        "memory_total_bytes": last.get("memory_total"),
        "memory_processed_bytes": last.get("memory_processed"),
        "iterations": last.get("memory_iteration"),
    }
