"""Discovery of the per-part plug-ins: CLI groups, API routers and experiments.

Each part (memory, dedup, ssdcache, cpu, migration, gpu, placement, ...) is a sub-package of
``symbiont``. A part plugs into the tool by defining, where it has them:

* ``symbiont.<part>.cli``: a module-level ``group`` (a :class:`click.Group`), added to ``symbiont``;
* ``symbiont.<part>.api``: a module-level ``router`` (a :class:`fastapi.APIRouter`), mounted by
  the daemon under ``/v1/<part>`` (the daemon is ``request.app.state.daemon``);
* ``symbiont.<part>.experiments``: experiments registered with
  :func:`symbiont.experiments.framework.experiment` at import time;
* ``symbiont.<part>.controller``: ``async def start(daemon)`` (may append periodic hooks,
  ``async def hook(daemon)``, to ``daemon.hooks``) and ``async def stop(daemon)``, which must
  restore every knob the part turned.

The guest agent is extended the same way: a module ``symbiont_agent/ops_<part>.py`` registers
its operations with ``symbiont_agent.agent.op``.

Discovery by convention keeps parts independent: adding one touches no central list.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
from types import ModuleType

import symbiont

log = logging.getLogger(__name__)

# Sub-packages that are infrastructure, not parts.
_NOT_PARTS = {"host", "lab", "experiments"}


def parts() -> list[str]:
    """Names of the part sub-packages, sorted."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(symbiont.__path__)
        if m.ispkg and m.name not in _NOT_PARTS
    )


def part_modules(kind: str) -> dict[str, ModuleType]:
    """Import ``symbiont.<part>.<kind>`` for every part that has it.

    A module that exists but fails to import is an error, not silently skipped: a broken
    plug-in must be seen.
    """
    found: dict[str, ModuleType] = {}
    for part in parts():
        name = f"symbiont.{part}.{kind}"
        if importlib.util.find_spec(name) is None:
            continue
        found[part] = importlib.import_module(name)
    return found
