"""Plug-in hooks of the ssdcache part: start the manager with the daemon, stop it with it.

``start`` re-opens the pool recorded in sqlite (re-using the loop device a killed daemon left
attached), zeroes blocks a crash left dirty, and starts an NBD server for every registered
cache, so VMs carry on: QEMU's NBD client reconnects on the guest's next request.
``stop`` closes the servers and detaches the loop device; registrations, block maps and data
stay (a persistent cache survives a daemon restart; a non-persistent one is freed when its VM
stops, which the periodic hook detects).
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

from symbiont.ssdcache.manager import CacheManager, default_runtime_dir

log = logging.getLogger(__name__)

_MANAGERS: weakref.WeakKeyDictionary[Any, CacheManager] = weakref.WeakKeyDictionary()


def manager(daemon: Any) -> CacheManager:
    mgr = _MANAGERS.get(daemon)
    if mgr is None:
        from symbiont.ssdcache.manager import Unavailable

        raise Unavailable("the ssdcache controller is not running")
    return mgr


def _settings(daemon: Any) -> dict[str, Any]:
    """``ssdcache:`` config section when the daemon's Config has one, else defaults."""
    sect = getattr(daemon.cfg, "ssdcache", None)
    out: dict[str, Any] = {"runtime_dir": None, "release_timeout_s": None, "pool_dir": None,
                           "allowed_devices": None, "max_caches": None, "size_overcommit": None,
                           "reserve_free_mib": None}
    if sect is not None:
        for k in out:
            out[k] = getattr(sect, k, None)
    return out


def _domain_state(daemon: Any):
    def state(vm: str) -> str:
        from symbiont.host.libvirt_host import LibvirtError

        try:
            host = daemon.libvirt
        except Exception as exc:  # libvirtd down: we know nothing, decide nothing
            raise RuntimeError(str(exc)) from None
        try:
            return host.info(vm).state
        except LibvirtError:
            return "missing"

    return state


async def start(daemon: Any) -> None:
    s = _settings(daemon)
    runtime = Path(s["runtime_dir"]) if s["runtime_dir"] else default_runtime_dir(daemon.cfg.state_dir)
    timeout = s["release_timeout_s"] or min(3.0, daemon.cfg.control.agent_timeout_s)
    bounds = {k: s[k] for k in ("max_caches", "size_overcommit", "reserve_free_mib") if s[k] is not None}
    mgr = CacheManager(
        daemon.store, runtime,
        agents=daemon.agents,
        domain_state=_domain_state(daemon),
        release_timeout_s=float(timeout),
        pool_dir=s["pool_dir"] or Path(daemon.cfg.state_dir) / "ssdcache-pools",
        allowed_devices=list(s["allowed_devices"] or []),
        **bounds,
    )
    await mgr.start()
    _MANAGERS[daemon] = mgr
    daemon.hooks.append(_hook)
    log.info("ssdcache: %d caches served, sockets in %s", len(mgr.servers), runtime)


async def _hook(daemon: Any) -> None:
    mgr = _MANAGERS.get(daemon)
    if mgr is not None:
        await mgr.on_period()


async def stop(daemon: Any) -> None:
    mgr = _MANAGERS.pop(daemon, None)
    if mgr is not None:
        await mgr.stop()
    if _hook in daemon.hooks:
        daemon.hooks.remove(_hook)
