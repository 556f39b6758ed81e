"""The ssdcache part: elastic SSD caches (SymFlex) served over NBD, one pool per host.

``start`` re-opens the pool recorded in sqlite (re-using the loop device a killed daemon left
attached), zeroes blocks a crash left dirty, and starts an NBD server for every registered
cache, so VMs carry on: QEMU's NBD client reconnects on the guest's next request. Each period
``observe`` samples the exports' counters, syncs the guests (background tasks, through the
agent gateway) and frees a non-persistent cache whose VM stopped; ``decide`` (pure) says
whether the automatic policy is due; ``act`` runs one policy step. ``stop`` closes the
servers and detaches the loop device; registrations, block maps and data stay.

The knob ledger holds nothing of this part, by choice: a cache's registration (its ``size``,
the virtual disk the VM sees) and its block map are the part's own persistent state in sqlite
(``ssd_*`` tables, changed in transactions), not host settings with an original to put back.
"Restoring" a cache's current size on VM removal or daemon stop would mean deflating it,
which destroys the very data a persistent cache exists to keep across restarts; a
non-persistent cache is freed when its VM stops (``observe``) or when it is unregistered.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from symbiont.errors import Invalid, NotFound, Unavailable
from symbiont.part import Part, PartContext, Period
from symbiont.ssdcache.config import CONFIG, SsdCacheConfig
from symbiont.ssdcache.manager import CacheManager, default_runtime_dir, policy_due

log = logging.getLogger(__name__)


class SsdCachePart(Part):
    """The cache manager (pool, block map, NBD servers) driven by the control period."""

    name = "ssdcache"
    config = CONFIG

    def __init__(self, ctx: PartContext, cfg: SsdCacheConfig | None) -> None:
        super().__init__(ctx, cfg if cfg is not None else SsdCacheConfig())
        self.manager: CacheManager | None = None  # None before start and after stop

    def require_manager(self) -> CacheManager:
        """The manager; :class:`Unavailable` (503) while the part is not running."""
        if self.manager is None:
            raise Unavailable("the ssdcache part is not running")
        return self.manager

    def domain_state(self, vm: str) -> str:
        """libvirt's state of ``vm`` ("missing" when no such domain); HostError when libvirt
        cannot say (then the manager decides nothing about that VM this period)."""
        if not self.ctx.host.exists(vm):
            return "missing"
        return self.ctx.host.info(vm).state

    async def start(self) -> None:
        c = self.cfg
        state_dir = self.ctx.cfg.state_dir
        runtime = Path(c.runtime_dir) if c.runtime_dir else default_runtime_dir(state_dir)
        mgr = CacheManager(
            self.ctx.store, runtime, agents=self.ctx.agents, domain_state=self.domain_state,
            release_timeout_s=float(c.release_timeout_s),
            pool_dir=c.pool_dir or Path(state_dir) / "ssdcache-pools",
            allowed_devices=list(c.allowed_devices), max_caches=c.max_caches,
            size_overcommit=c.size_overcommit, reserve_free_mib=c.reserve_free_mib,
            peer_check=self._own_qemu,
        )
        await mgr.start()
        self.manager = mgr
        log.info("ssdcache: %d caches served, sockets in %s", len(mgr.servers), runtime)

    def _own_qemu(self, vm: str) -> Any:
        """The vhost-user socket's gate for ``vm``: only the pid of ``vm``'s own QEMU."""
        host = self.ctx.host
        return lambda pid: host.qemu_pid(vm) == pid

    async def observe(self, period: Period) -> dict[str, Any] | None:
        return await self.manager.observe_period() if self.manager is not None else None

    def decide(self, obs: dict[str, Any] | None) -> bool:
        return obs is not None and policy_due(obs)

    async def act(self, decision: bool) -> None:
        if decision and self.manager is not None:
            await self.manager.policy_step()

    async def stop(self) -> None:
        mgr, self.manager = self.manager, None
        if mgr is not None:
            await mgr.stop()

    def status(self) -> dict[str, Any]:
        mgr = self.manager
        if mgr is None:
            return {"running": False}
        return {"running": True, "pool": mgr.pool_view(), "caches": len(mgr.exports)}

    # -- the elastic disk in a domain (the API's attach/detach), through the host port -------
    # A refusal by libvirt or QEMU is a host.port.HostError (the API answers 409 with it).
    async def attach(self, vm: str, target_dev: str, serial: str, reconnect_delay_s: int,
                     transport: str = "nbd") -> dict[str, Any]:  # fmt: skip
        """Hot-plug the elastic disk: libvirt XML, QMP with NBD reconnect-delay, or a
        vhost-user-blk device on our backend (``transport='vhost-user'``)."""
        mgr = self.require_manager()
        host = self.ctx.host
        if not await self.ctx.blocking(host.exists, vm):
            raise NotFound(f"no libvirt domain {vm!r}")
        if transport == "vhost-user":  # over QMP: libvirt 9.0 drops a hot-plugged disk's <reconnect>
            if reconnect_delay_s:
                raise Invalid("reconnect_delay_s is for transport nbd (vhost-user reconnects by itself)")
            sock = await mgr.serve_vhost(vm, serial)
            try:
                node = await self.ctx.blocking(host.attach_vhost_disk, vm, str(sock), target_dev)
            except Exception:
                await mgr.unserve_vhost(vm)
                raise
            self.ctx.decisions.log("attach", vm, {"target_dev": target_dev, "transport": transport, "via": "qmp"},
                                   {"node": node, "socket": str(sock)})  # fmt: skip
            await mgr.sync_guest(vm)
            return {"attached": vm, "target_dev": target_dev, "transport": transport, "qmp_node": node}
        xml = mgr.disk_xml(vm, target_dev, serial)
        if reconnect_delay_s:
            node = await self.ctx.blocking(host.attach_nbd_disk, vm, str(mgr.socket_path(vm)), mgr.export_name(vm),
                                           target_dev, serial, reconnect_delay_s)
            self.ctx.decisions.log("attach", vm, {"target_dev": target_dev, "via": "qmp",
                                                  "reconnect_delay_s": reconnect_delay_s}, {"node": node})
            await mgr.sync_guest(vm)
            return {"attached": vm, "target_dev": target_dev, "qmp_node": node, "reconnect_delay_s": reconnect_delay_s}
        await self.ctx.blocking(host.attach_disk, vm, xml)
        self.ctx.decisions.log("attach", vm, {"target_dev": target_dev}, {"ok": True})
        await mgr.sync_guest(vm)
        return {"attached": vm, "target_dev": target_dev, "transport": transport, "xml": xml}

    async def detach(self, vm: str, target_dev: str, serial: str, reconnect_delay_s: int,
                     transport: str = "nbd") -> dict[str, Any]:  # fmt: skip
        mgr = self.require_manager()
        host = self.ctx.host
        if not await self.ctx.blocking(host.exists, vm):
            raise NotFound(f"no libvirt domain {vm!r}")
        if transport == "vhost-user":
            await self.ctx.blocking(host.detach_vhost_disk, vm, target_dev)
            await mgr.unserve_vhost(vm)
            self.ctx.decisions.log("detach", vm, {"target_dev": target_dev, "transport": transport}, {"ok": True})
            return {"detached": vm}
        xml = mgr.disk_xml(vm, target_dev, serial)
        if reconnect_delay_s or await self.ctx.blocking(host.nbd_disk_attached, vm, target_dev):
            await self.ctx.blocking(host.detach_nbd_disk, vm, target_dev, timeout=90.0)
            self.ctx.decisions.log("detach", vm, {"target_dev": target_dev, "via": "qmp"}, {"ok": True})
            return {"detached": vm}
        await self.ctx.blocking(host.detach_disk, vm, xml)
        self.ctx.decisions.log("detach", vm, {"target_dev": target_dev}, {"ok": True})
        return {"detached": vm}

