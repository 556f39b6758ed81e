"""The dedup part's daemon plug-in: ``start(daemon)`` / ``stop(daemon)`` and one periodic hook.

A plain daemon start only *observes* KSM (see :mod:`symbiont.dedup.service` for how tuning is
opted into); at start-up it also restores KSM settings a crashed previous run left behind, and
``stop`` restores every KSM value the part changed.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from symbiont.dedup.service import DedupService, vm_sharing

log = logging.getLogger(__name__)

_SERVICES: weakref.WeakKeyDictionary[Any, DedupService] = weakref.WeakKeyDictionary()


def service(daemon: Any) -> DedupService | None:
    """The daemon's dedup service (``None`` before ``start`` or after ``stop``)."""
    return _SERVICES.get(daemon)


async def start(daemon: Any) -> None:
    svc = DedupService(daemon)
    _SERVICES[daemon] = svc
    await svc.start()

    async def hook(d: Any) -> None:
        s = _SERVICES.get(d)
        if s is not None:
            await s.tick()

    daemon.hooks.append(hook)


async def stop(daemon: Any) -> None:
    svc = _SERVICES.pop(daemon, None)
    if svc is not None:
        await svc.stop()


def sharing(daemon: Any, vm: str) -> dict[str, Any] | None:
    """Sharing of one VM for the memory part: ``shared_bytes``, ``unshared_bytes``,
    ``unshared_fraction`` (of its resident guest RAM), ``potential_bytes``; ``None`` if unknown."""
    return vm_sharing(service(daemon), vm)


__all__ = ["service", "sharing", "start", "stop"]
