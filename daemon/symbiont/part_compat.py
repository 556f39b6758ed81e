"""TEMPORARY adapter, to be deleted when issue 14's migration is complete.

:class:`LegacyControllerPart` runs a part that still has the old shape
(``symbiont.<part>.controller`` with ``start(daemon)`` / ``stop(daemon)`` appending hooks to
``daemon.hooks``) as a :class:`~symbiont.part.Part`: its hooks run in its ``observe`` phase,
in dependency order with the migrated parts. Such parts still see the whole daemon.

Every part migrated to :class:`~symbiont.part.Part` shrinks ``LEGACY`` in
``tests/unit/test_architecture.py``; when it is empty this module goes.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

from symbiont.part import Part, Period

if TYPE_CHECKING:
    from symbiont.daemon import Daemon

log = logging.getLogger("symbiontd.part")

class LegacyControllerPart(Part):
    """An old-style controller module as a Part (TEMPORARY, see the module's docstring)."""

    def __init__(self, name: str, module: ModuleType, daemon: Daemon) -> None:
        self.name = name  # type: ignore[misc]  # per instance: one class for every legacy part
        self.module = module
        self.daemon = daemon
        self.hooks: list[Any] = []

    async def start(self) -> None:
        if hasattr(self.module, "start"):
            before = list(self.daemon.hooks)
            await self.module.start(self.daemon)
            self.hooks = [h for h in self.daemon.hooks if h not in before]
            self.daemon.hooks[:] = before  # its hooks run in its own phase, not after every part

    async def observe(self, period: Period) -> Any:
        for hook in self.hooks:
            await hook(self.daemon)
        return None

    async def stop(self) -> None:
        if hasattr(self.module, "stop"):
            await self.module.stop(self.daemon)

    def __getattr__(self, fn: str) -> Any:
        """``peer.sharing(vm)`` → ``module.sharing(daemon, vm)``: a migrated part calls an old
        one's module functions as its operations until that one is migrated too."""
        module = self.__dict__.get("module")
        f = getattr(module, fn, None) if module is not None else None
        if not callable(f):
            raise AttributeError(fn)
        daemon = self.__dict__["daemon"]
        return lambda *args, **kw: f(daemon, *args, **kw)
