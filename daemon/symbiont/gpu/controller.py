"""Plug-in hooks of the GPU part: with ``gpu.enabled``, the daemon owns the GPU endpoint.

``start`` selects the backend (``gpu.backend``: CuPy when a CUDA device is present, else the
simulator; ``cupy`` without a GPU fails the start with the reason), reloads GPUs, clients with
their quotas and workloads from sqlite (:class:`~symbiont.gpu.manager.GpuManager`), and serves
the endpoint protocol (:mod:`symbiont.gpu.endpoint`) on ``gpu.endpoint_socket`` (default
``gpu-endpoint.sock`` next to the API socket; mode ``gpu.socket_mode``, group
``socket_group``). Applications on the host connect there. Applications in a VM use the
VM's virtio-serial channel ``org.symbiont.gpu.0`` (when its domain has one): each control
period the daemon connects to the host end of that channel for every registered VM that has
it and relays the stream into the endpoint server, bound to the client named like the VM
(an untrusted guest can speak only for its own client, never as admin, and its frames are
limited to ``agent.max_binary_bytes`` of payload).
``stop`` closes the socket (open connections end) and drops the device contexts: nothing on
the host was turned, so nothing else needs restoring, and the quotas stay in sqlite.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import weakref
from pathlib import Path
from typing import Any

from symbiont.errors import Unavailable
from symbiont.gpu.endpoint import EndpointServer
from symbiont.gpu.manager import GpuManager

log = logging.getLogger(__name__)

_MANAGERS: weakref.WeakKeyDictionary[Any, GpuManager] = weakref.WeakKeyDictionary()
_RELAYS: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Task[None]]] = weakref.WeakKeyDictionary()

GPU_CHANNEL = "org.symbiont.gpu.0"


def manager(daemon: Any) -> GpuManager:
    """The daemon's GPU manager; 503 with the reason when the part is off."""
    mgr = _MANAGERS.get(daemon)
    if mgr is None:
        raise Unavailable("the GPU part is disabled: set gpu.enabled: true in the daemon's config")
    return mgr


def endpoint_path(cfg: Any) -> Path:
    sect = cfg.gpu
    return (
        Path(sect.endpoint_socket) if sect.endpoint_socket else Path(cfg.socket).parent / "gpu-endpoint.sock"
    )


async def start(daemon: Any) -> None:
    sect = getattr(daemon.cfg, "gpu", None)
    if sect is None or not sect.enabled:
        return
    mgr = GpuManager(daemon.store, backend=sect.backend, devices=sect.devices,
                     default_sm_share=sect.default_sm_share, default_mem_bytes=sect.default_mem_mib << 20,
                     seed=sect.seed)  # fmt: skip
    mgr.load()
    path = endpoint_path(daemon.cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    server = EndpointServer(None, path, resolve=mgr.resolve, mode=sect.socket_mode)
    await server.start()
    if daemon.cfg.socket_group:
        os.chown(path, -1, grp.getgrnam(daemon.cfg.socket_group).gr_gid)
    mgr.server = server
    _MANAGERS[daemon] = mgr
    _RELAYS[daemon] = {}
    daemon.hooks.append(_relay_hook)
    daemon.store.log_decision("gpu", "endpoint-start", None,
                              {"backend": sect.backend, "socket": str(path)},
                              {"backend": mgr.backend_name, "gpus": sorted(mgr.gpus),
                               "orphaned_clients": sorted(mgr.orphans)})  # fmt: skip
    log.info("gpu: endpoint on %s (mode %04o), backend %s", path, sect.socket_mode, mgr.backend_name)


def _channel_path(daemon: Any, vm: str) -> str | None:
    try:
        return daemon.libvirt.channel_path(vm, GPU_CHANNEL)
    except Exception:  # libvirtd down or the domain gone: no relay this period
        return None


async def _relay_hook(daemon: Any) -> None:
    """Connect the GPU channel of every registered VM that has one and no live relay."""
    mgr = _MANAGERS.get(daemon)
    relays = _RELAYS.get(daemon)
    if mgr is None or mgr.server is None or relays is None:
        return
    vms = {r.name for r in daemon.store.list_vms()}
    for vm in list(relays):
        if vm not in vms or relays[vm].done():
            relays.pop(vm).cancel()
    for vm in sorted(vms - set(relays)):
        path = await asyncio.to_thread(_channel_path, daemon, vm)
        if not path or not os.path.exists(path):
            continue
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            log.debug("gpu: channel of %s not connectable: %s", vm, exc)
            continue
        log.info("gpu: relaying %s's channel %s to the endpoint (bound to client %r)", vm, path, vm)
        relays[vm] = asyncio.get_running_loop().create_task(
            mgr.server.serve_connection(
                reader, writer, bound=vm, max_payload=daemon.cfg.agent.max_binary_bytes
            ),
            name=f"gpu-relay-{vm}",
        )


async def stop(daemon: Any) -> None:
    if _relay_hook in daemon.hooks:
        daemon.hooks.remove(_relay_hook)
    for task in (_RELAYS.pop(daemon, None) or {}).values():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    mgr = _MANAGERS.pop(daemon, None)
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
