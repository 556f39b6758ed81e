"""The GPU part: with ``gpu.enabled``, the daemon owns the GPU endpoint.

``start`` selects the backend (``gpu.backend``: CuPy when a CUDA device is present, else the
simulator; ``cupy`` without a GPU fails the start with the reason), reloads GPUs, clients with
their quotas and workloads from sqlite (:class:`~symbiont.gpu.manager.GpuManager`), and serves
the endpoint protocol (:mod:`symbiont.gpu.endpoint`) on ``gpu.endpoint_socket`` (default
``gpu-endpoint.sock`` next to the API socket; mode ``gpu.socket_mode``, group
``socket_group``). Applications on the host connect there. Applications in a VM use the
VM's virtio-serial channel ``org.symbiont.gpu.0`` (when its domain has one): each period
(``observe``) the part connects to the host end of that channel (found through the host port)
for every registered VM that has it and relays the stream into the endpoint server, bound to
the client named like the VM (an untrusted guest can speak only for its own client, never as
admin, and its frames are limited to ``agent.max_binary_bytes`` of payload). A VM's relay ends
when the VM is unregistered.
``stop`` closes the socket (open connections end) and drops the device contexts: the part
turns no knob on the host, so the ledger has nothing of it, and the quotas stay in sqlite.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
from pathlib import Path
from typing import Any

from symbiont.errors import Unavailable
from symbiont.gpu.config import CONFIG, GpuConfig
from symbiont.gpu.endpoint import EndpointServer
from symbiont.gpu.manager import GpuManager
from symbiont.host.port import HostError
from symbiont.part import Part, PartContext, Period

log = logging.getLogger(__name__)

GPU_CHANNEL = "org.symbiont.gpu.0"
DISABLED = "the GPU part is disabled: set gpu.enabled: true in the daemon's config"


def endpoint_path(cfg: Any) -> Path:
    sect = cfg.gpu
    return Path(sect.endpoint_socket) if sect.endpoint_socket else Path(cfg.socket).parent / "gpu-endpoint.sock"


class GpuPart(Part):
    """The GPU endpoint server, its manager, and the relays of the VMs' GPU channels."""

    name = "gpu"
    config = CONFIG

    def __init__(self, ctx: PartContext, cfg: GpuConfig | None) -> None:
        super().__init__(ctx, cfg if cfg is not None else GpuConfig())
        self.manager: GpuManager | None = None  # None while the part is disabled or stopped
        self.relays: dict[str, asyncio.Task[None]] = {}

    def require_manager(self) -> GpuManager:
        """The manager; :class:`Unavailable` (503) with the reason when the part is off."""
        if self.manager is None:
            raise Unavailable(DISABLED)
        return self.manager

    async def start(self) -> None:
        sect = self.cfg
        if not sect.enabled:
            return
        mgr = GpuManager(self.ctx.store, backend=sect.backend, devices=sect.devices,
                         default_sm_share=sect.default_sm_share, default_mem_bytes=sect.default_mem_mib << 20,
                         seed=sect.seed)  # fmt: skip
        mgr.load()
        path = endpoint_path(self.ctx.cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        server = EndpointServer(None, path, resolve=mgr.resolve, mode=sect.socket_mode)
        await server.start()
        if self.ctx.cfg.socket_group:
            os.chown(path, -1, grp.getgrnam(self.ctx.cfg.socket_group).gr_gid)
        mgr.server = server
        self.manager = mgr
        self.ctx.decisions.log("endpoint-start", None, {"backend": sect.backend, "socket": str(path)},
                               {"backend": mgr.backend_name, "gpus": sorted(mgr.gpus),
                                "orphaned_clients": sorted(mgr.orphans)})  # fmt: skip
        log.info("gpu: endpoint on %s (mode %04o), backend %s", path, sect.socket_mode, mgr.backend_name)

    def _channel_path(self, vm: str) -> str | None:
        try:
            return self.ctx.host.channel_path(vm, GPU_CHANNEL)
        except (HostError, OSError):  # libvirtd down or the domain gone: no relay this period
            return None

    async def observe(self, period: Period) -> dict[str, Any]:
        """Connect the GPU channel of every registered VM that has one and no live relay."""
        mgr = self.manager
        if mgr is None or mgr.server is None:
            return {"relays": []}
        vms = {r.name for r in self.ctx.vms()}
        for vm in list(self.relays):
            if vm not in vms or self.relays[vm].done():
                self.relays.pop(vm).cancel()
        for vm in sorted(vms - set(self.relays)):
            try:
                path = await self.ctx.blocking(self._channel_path, vm)
            except TimeoutError:
                continue
            if not path or not os.path.exists(path):
                continue
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError as exc:
                log.debug("gpu: channel of %s not connectable: %s", vm, exc)
                continue
            log.info("gpu: relaying %s's channel %s to the endpoint (bound to client %r)", vm, path, vm)
            self.relays[vm] = asyncio.get_running_loop().create_task(
                mgr.server.serve_connection(reader, writer, bound=vm,
                                            max_payload=self.ctx.cfg.agent.max_binary_bytes),
                name=f"gpu-relay-{vm}",
            )
        return {"relays": sorted(self.relays)}

    async def _end_relay(self, vm: str) -> None:
        task = self.relays.pop(vm, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def vm_removed(self, vm: str) -> None:
        await self._end_relay(vm)

    async def stop(self) -> None:
        for vm in list(self.relays):
            await self._end_relay(vm)
        mgr, self.manager = self.manager, None
        if mgr is None:
            return
        if mgr.server is not None:
            await mgr.server.stop()
            mgr.server = None
        for svc in mgr.services.values():
            for name in list(svc.clients):
                try:
                    svc.remove_client(name)  # frees device memory; the client's row stays in sqlite
                except Exception:  # stopping must go on
                    log.exception("gpu: could not release client %s", name)
        log.info("gpu: endpoint stopped")

    def status(self) -> dict[str, Any]:
        mgr = self.manager
        return {"enabled": mgr is not None, "backend": mgr.backend_name if mgr else None,
                "relays": sorted(self.relays)}


PART = GpuPart
__all__ = ["DISABLED", "GPU_CHANNEL", "GpuPart", "endpoint_path"]
