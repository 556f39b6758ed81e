"""Discovery of the per-part plug-ins: CLI groups, API routers and experiments.

Each part (memory, dedup, ssdcache, cpu, migration, gpu, placement, ...) is a sub-package of
``symbiont``. A part plugs into the tool by defining, where it has them:

* ``symbiont.<part>.cli``: a module-level ``group`` (a :class:`click.Group`), added to ``symbiont``;
* ``symbiont.<part>.api``: a module-level ``router`` (a :class:`fastapi.APIRouter`), mounted by
  the daemon under ``/v1/<part>`` (a handler reaches its part as
  ``request.app.state.parts["<part>"]``);
* ``symbiont.<part>.part``: the part's :class:`symbiont.part.Part` subclass (one per module, or
  named ``PART``): its lifecycle, driven by the daemon (see ``docs/architecture.md``);
* ``symbiont.<part>.config``: ``CONFIG``, the dataclass of the part's YAML section ``<part>:``;

The guest agent is extended the same way: a module ``symbiont_agent/ops_<part>.py`` registers
its operations with ``symbiont_agent.agent.op``.

Research code (the VM lab, the experiment framework, each part's experiments in
``symbiont_research.experiments.<part>``) is the separate top-level package ``symbiont_research``;
:func:`research` imports it where it is installed, so the daemon's package never imports it.

Discovery by convention keeps parts independent: adding one touches no central list.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import pkgutil
from types import ModuleType
from typing import Any

import symbiont

log = logging.getLogger(__name__)

# Sub-packages that are infrastructure, not parts.
_NOT_PARTS = {"host"}


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


def part_class(mod: ModuleType) -> Any:
    """The Part subclass a ``symbiont.<part>.part`` module defines: ``PART``, else the one
    subclass of :class:`symbiont.part.Part` defined in the module itself."""
    from symbiont.part import Part

    cls = getattr(mod, "PART", None)
    if cls is None:
        found = [c for c in vars(mod).values()
                 if inspect.isclass(c) and issubclass(c, Part) and c is not Part and c.__module__ == mod.__name__]
        if len(found) != 1:
            raise ImportError(f"{mod.__name__}: defines {len(found)} Part subclasses; name the part's class PART")
        cls = found[0]
    return cls


def part_classes() -> dict[str, Any]:
    """The daemon's parts: name → Part subclass (the name is the package's). A package without
    a ``part`` module (the CLI-only ``cluster``) has no place in the daemon."""
    out = {}
    for pkg, mod in part_modules("part").items():
        cls = part_class(mod)
        if getattr(cls, "name", pkg) != pkg:
            raise ImportError(f"{mod.__name__}: Part.name {cls.name!r} differs from its package {pkg!r}")
        cls.name = pkg
        out[pkg] = cls
    return out


def research(module: str) -> ModuleType | None:
    """``symbiont_research.<module>`` where the research package is installed, else None (a
    daemon install); the daemon's package reaches research code only through here."""
    if importlib.util.find_spec("symbiont_research") is None:
        return None
    return importlib.import_module(f"symbiont_research.{module}")
