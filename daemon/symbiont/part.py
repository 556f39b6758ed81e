"""The Part: one lever of the daemon, with one lifecycle, reached through one narrow context.

Every part (memory, cpu, dedup, ssdcache, ...) is a sub-package ``symbiont.<name>`` whose
``part`` module defines one :class:`Part` subclass (or names it ``PART``). The daemon
discovers them (no central list), orders them by ``requires``, and drives each control
period (:mod:`symbiont.daemon`)::

    core collect → for each part, in dependency order: observe → decide → act → persist

A part never sees the daemon: :class:`PartContext` is its door — config, its store, the knob
ledger, the host port, the agent gateway, the decision log, the registered VMs and the core's
last snapshot, the observations of the parts it requires. See ``docs/architecture.md``.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

from symbiont.errors import NotFound
from symbiont.host.port import HostPort
from symbiont.knobs import KnobLedger
from symbiont.state import StateStore, VmRecord

log = logging.getLogger("symbiontd.part")


@dataclass
class NoConfig:
    """The config of a part without a config section."""

    def validate(self, key: str) -> None:
        """Nothing to check."""


@dataclass
class Period:
    """One control period: its number, when it started, and the observations made so far
    (by part name) — a part reads those of the parts it requires through its context."""

    number: int
    started_at: float = field(default_factory=time.time)
    observations: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentInfo:
    """What the core knows of a VM's agent session (no request is made to learn it)."""

    connected: bool = False
    ready: bool = False  # greeted (hello received)
    cooperative: bool = False  # greeted and answering
    caps: tuple[str, ...] = ()

    def can(self, op: str) -> bool:
        """The agent is cooperative and offers ``op``."""
        return self.cooperative and op in self.caps


class Agents(Protocol):
    """The agent gateway (:class:`symbiont.gateway.AgentGateway`): one call per operation,
    with the capability check, the timeout and the error mapping to
    :class:`symbiont.errors.DaemonError` subclasses done once."""

    async def call(self, vm: str, op: str, args: dict[str, Any] | None = None, *, payload: bytes = b"",
                   timeout: float | None = None) -> tuple[Any, bytes]: ...

    def supports(self, vm: str, op: str) -> bool: ...

    def stream(self, vm: str, event: str, handler: Callable[[dict[str, Any], bytes], None]) -> Callable[[], None]:
        """Binary stream events of ``vm``'s agent to ``handler``; returns the unsubscribe."""
        ...


class DecisionLog:
    """The decision log, bound to one part's name: every action with its inputs and outcome."""

    def __init__(self, store: StateStore, part: str) -> None:
        self._store = store
        self.part = part

    def log(self, action: str, vm: str | None, inputs: dict[str, Any], outcome: dict[str, Any]) -> None:
        self._store.log_decision(self.part, action, vm, inputs, outcome)


class Core(Protocol):
    """What the daemon's core offers every part's context (the daemon implements it)."""

    def registered(self) -> list[VmRecord]: ...
    def snapshot(self, vm: str) -> Mapping[str, Any]: ...
    def host_snapshot(self) -> Mapping[str, Any]: ...
    def agent_info(self, vm: str) -> AgentInfo: ...
    def wake(self) -> None: ...


class PartContext:
    """A part's narrow door to the daemon. Everything a part needs, nothing it must not touch."""

    def __init__(self, name: str, *, cfg: Any, store: StateStore, knobs: KnobLedger, host: HostPort,
                 agents: Agents, core: Core, parts: Mapping[str, Part] | None = None,
                 requires: Iterable[str] = ()) -> None:
        self.name = name
        self.cfg = cfg  # the whole validated Config (read it, never change it)
        self.store = store  # tables of this part are prefixed with its name
        self.knobs = knobs
        self.host = host
        self.agents = agents
        self.decisions = DecisionLog(store, name)
        self.period: Period | None = None  # the period being driven (None outside one)
        self._core = core
        self._parts: Mapping[str, Part] = parts if parts is not None else {}
        self._requires = frozenset(requires)

    @property
    def part_cfg(self) -> Any:
        return getattr(self.cfg, self.name, None)

    # -- VMs and the core's view ---------------------------------------------------------------
    def vms(self) -> list[VmRecord]:
        """The registered VMs with their policies."""
        return self._core.registered()

    def vm(self, name: str) -> VmRecord:
        """One registered VM; :class:`NotFound` (404) otherwise."""
        rec = self.store.get_vm(name)
        if rec is None:
            raise NotFound(f"VM {name!r} is not registered")
        return rec

    def latest(self, vm: str) -> Mapping[str, Any]:
        """The core's last snapshot of ``vm`` (``libvirt``, ``agent``, ``ts``, ``stale``); read-only."""
        return self._core.snapshot(vm)

    def host_latest(self) -> Mapping[str, Any]:
        return self._core.host_snapshot()

    def agent(self, vm: str) -> AgentInfo:
        return self._core.agent_info(vm)

    def wake(self) -> None:
        """Ask for an early period (after a change the next period should see at once)."""
        self._core.wake()

    # -- other parts: only the declared ones ---------------------------------------------------
    def observation(self, part: str) -> Any:
        """This period's observation of a part this one ``requires`` (None before it ran)."""
        if part not in self._requires:
            raise KeyError(f"part {self.name!r} does not require {part!r}: declare it in requires")
        return self.period.observations.get(part) if self.period is not None else None

    def peer(self, part: str) -> Part:
        """A part this one ``requires``, for the operations it offers (e.g. memory's balloon)."""
        if part not in self._requires:
            raise KeyError(f"part {self.name!r} does not require {part!r}: declare it in requires")
        return self._parts[part]

    async def blocking(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """A blocking host call in a thread, given up after ``timeout`` (libvirt may hang)."""
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(fn, *args)


class Part:
    """One lever. Subclasses set the class attributes and override the phases they need.

    Per period the daemon calls ``observe`` → ``decide`` → ``act``; ``decide`` is pure (the
    part's policy function). ``vm_removed`` is called after the ledger restored the VM's
    knobs; ``stop`` after the period loop ended, before the ledger restores the rest.
    """

    name: ClassVar[str]  # one name: package, /v1/<name>, CLI group, docs/<name>.md
    config: ClassVar[type] = NoConfig  # a dataclass with validate(key); YAML section `<name>:`
    requires: ClassVar[tuple[str, ...]] = ()  # parts whose observations/operations this one uses

    def __init__(self, ctx: PartContext, cfg: Any) -> None:
        self.ctx = ctx
        self.cfg = cfg

    async def start(self) -> None:
        """Create tables (``ctx.store``), register knob kinds (``ctx.knobs``)."""

    async def observe(self, period: Period) -> Any:
        """Read the world (through ``ctx.host`` / ``ctx.agents``); the result is this period's
        observation, given to ``decide`` and to the parts that require this one."""
        return None

    def decide(self, obs: Any) -> Any:
        """Pure: what to do, from the observation alone."""
        return None

    async def act(self, decision: Any) -> None:
        """Turn knobs through ``ctx.knobs``, log through ``ctx.decisions``."""

    async def vm_added(self, vm: str) -> None:
        """A VM was registered."""

    async def vm_removed(self, vm: str) -> None:
        """A VM was unregistered (its knobs are restored already): forget its state."""

    async def stop(self) -> None:
        """Put back what the ledger does not know of (holds in guests, servers)."""

    def status(self) -> dict[str, Any]:
        return {}


async def run_period(parts: Mapping[str, Part], period: Period) -> Period:
    """Drive one period: each part, in the mapping's (dependency) order, observes, decides and
    acts. One part's failure is logged and never stops the others. The daemon's control loop
    and the unit tests run periods through this same function."""
    token = _IN_PERIOD.set(True)  # the daemon's own work: agent calls made from here wake no parked VM
    try:
        return await _run_period(parts, period)
    finally:
        _IN_PERIOD.reset(token)


async def _run_period(parts: Mapping[str, Part], period: Period) -> Period:
    for name, part in parts.items():
        ctx = getattr(part, "ctx", None)
        if ctx is not None:
            ctx.period = period
        try:
            obs = await part.observe(period)
            period.observations[name] = obs
            await part.act(part.decide(obs))
        except Exception:
            log.exception("part %s: period %d failed", name, period.number)
        finally:
            if ctx is not None:
                ctx.period = None
    return period


_IN_PERIOD: contextvars.ContextVar[bool] = contextvars.ContextVar("symbiont_in_period", default=False)


def in_period() -> bool:
    """Whether the running code is the daemon's own periodic work (a period, or a task it
    started): an agent call made there must not wake a parked VM (issue 15)."""
    return _IN_PERIOD.get()


class PartOrderError(ValueError):
    """The parts' ``requires`` name a missing part or form a cycle."""


def order(parts: Mapping[str, type[Part]]) -> list[str]:
    """Names in dependency order (a part after those it requires; ties by name)."""
    for name, cls in parts.items():
        missing = [r for r in cls.requires if r not in parts]
        if missing:
            raise PartOrderError(f"part {name!r} requires {', '.join(missing)}, which no package provides")
    done: list[str] = []
    state: dict[str, int] = {}  # 1: visiting, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise PartOrderError(f"parts require each other in a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for r in sorted(parts[name].requires):
            visit(r, [*path, name])
        state[name] = 2
        done.append(name)

    for name in sorted(parts):
        visit(name, [])
    return done


def config_defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's defaults as plain data (for ``--print-default-config``)."""
    return dataclasses.asdict(cls()) if dataclasses.is_dataclass(cls) else {}


def frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))
