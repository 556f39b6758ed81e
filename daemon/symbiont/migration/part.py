"""The migration part: container migrations between VMs (CRIU, the Portkey relay) and their
crash recovery.

The part holds one :class:`~symbiont.migration.controller.MigrationController` (its running
migrations, the journal in sqlite). It turns no knob, so the ledger holds nothing of it. At
``start`` and in every period's ``observe`` while the journal has unfinished entries (a
previous daemon was killed mid-migration), it resolves them in the background
(:meth:`MigrationController.recover`): a migration under kill -9 leaves exactly one copy of
the container. ``stop`` cancels the running migrations (each aborts: source thawed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from symbiont.migration.controller import MigrationController
from symbiont.part import Part, PartContext, Period

log = logging.getLogger(__name__)


class MigrationPart(Part):
    """Container migrations through the agent gateway; the journal's recovery each period."""

    name = "migration"

    def __init__(self, ctx: PartContext, cfg: Any) -> None:
        super().__init__(ctx, cfg)
        self.ctl = MigrationController(ctx)
        self.recovery: asyncio.Task[Any] | None = None

    def _recover_soon(self) -> None:
        """Resolve unfinished journal entries in the background (one pass at a time)."""
        if self.recovery is not None and not self.recovery.done():
            return
        if not (self.ctl.journal.unfinished() or self.ctl.orphan_regions()) or self.ctl.recovering:
            return
        self.recovery = asyncio.get_running_loop().create_task(self._recover(), name="migration-recover")

    async def _recover(self) -> None:
        try:
            await self.ctl.recover()
        except Exception:  # the next period tries again
            log.exception("migration recovery failed")

    async def start(self) -> None:
        self._recover_soon()

    async def observe(self, period: Period) -> Any:
        self._recover_soon()
        return None

    async def stop(self) -> None:
        if self.recovery is not None:
            self.recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.recovery
        await self.ctl.stop()

    def status(self) -> dict[str, Any]:
        return {"running": sorted(self.ctl.tasks), "unfinished": len(self.ctl.journal.unfinished())}
