"""Shared test doubles: a PartContext over FakeHost + FakeAgents + a real StateStore in tmp.

A part's controller test builds an :class:`Env`, registers a VM or two with recorded
snapshots, constructs the part with ``env.ctx(name)`` and runs periods with
:meth:`Env.period` (the daemon's own :func:`symbiont.part.run_period`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symbiont.config import Config
from symbiont.errors import AgentUnsupported, NoAgent
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.knobs import KnobLedger
from symbiont.part import AgentInfo, Part, PartContext, Period, run_period
from symbiont.state import StateStore, VmRecord
from symbiont_agent import ops_schema as schema

Reply = Any  # a reply dict, an exception to raise, or a callable (vm, args) -> reply


class FakeAgents:
    """The agent gateway from recorded replies: ``replies[op]`` (for every VM) or
    ``replies[(vm, op)]``. Requests are checked against ``ops_schema``; calls are recorded in
    ``calls`` as (vm, op, args)."""

    def __init__(self, replies: dict[Any, Reply] | None = None) -> None:
        self.replies: dict[Any, Reply] = dict(replies or {})
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.down: set[str] = set()  # VMs whose agent is not connected

    def _reply(self, vm: str, op: str) -> Reply:
        if (vm, op) in self.replies:
            return self.replies[(vm, op)]
        if op in self.replies:
            return self.replies[op]
        raise AgentUnsupported(f"{vm}: agent does not support {op}")

    def supports(self, vm: str, op: str) -> bool:
        return vm not in self.down and ((vm, op) in self.replies or op in self.replies)

    async def call(self, vm: str, op: str, args: dict[str, Any] | None = None, *, payload: bytes = b"",
                   timeout: float | None = None) -> tuple[Any, bytes]:
        if vm in self.down:
            raise NoAgent(f"{vm}: agent not connected")
        # The request is checked against the op's schema, as the real gateway does: a part that
        # sends a wrong argument fails here, not first in a VM.
        schema.encode_request(schema.canonical(op), dict(args or {}))
        self.calls.append((vm, op, dict(args or {})))
        r = self._reply(vm, op)
        if isinstance(r, BaseException):
            raise r
        if callable(r):
            r = r(vm, args or {})
            if isinstance(r, BaseException):
                raise r
        return r, b""

    def ops(self, vm: str | None = None) -> list[str]:
        return [op for v, op, _ in self.calls if vm is None or v == vm]


@dataclass
class FakeCore:
    """The daemon's side of a PartContext: registrations from the store, snapshots by hand."""

    store: StateStore
    agents: FakeAgents
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    wakes: int = 0

    def registered(self) -> list[VmRecord]:
        return self.store.list_vms()

    def snapshot(self, vm: str) -> Mapping[str, Any]:
        return self.snapshots.get(vm, {})

    def host_snapshot(self) -> Mapping[str, Any]:
        return self.host

    def agent_info(self, vm: str) -> AgentInfo:
        if vm in self.agents.down or self.store.get_vm(vm) is None:
            return AgentInfo()
        caps = tuple(sorted({k[1] if isinstance(k, tuple) else k for k in self.agents.replies
                             if not isinstance(k, tuple) or k[0] == vm}))
        return AgentInfo(True, True, True, caps)

    def wake(self) -> None:
        self.wakes += 1


class Env:
    """Everything a part's unit test needs, real where it can be (sqlite, the ledger)."""

    def __init__(self, tmp_path: Path, *domains: FakeDomain, cfg: Config | None = None,
                 agents: FakeAgents | None = None, host: FakeHost | None = None) -> None:
        self.cfg = cfg or Config(state_dir=str(tmp_path))
        self.store = StateStore(tmp_path / "state.sqlite3")
        self.knobs = KnobLedger(self.store)
        self.host = host or FakeHost(*domains)
        self.agents = agents or FakeAgents()
        self.core = FakeCore(self.store, self.agents)
        self.parts: dict[str, Part] = {}
        self.periods = 0

    def ctx(self, name: str, requires: tuple[str, ...] = ()) -> PartContext:
        return PartContext(name, cfg=self.cfg, store=self.store, knobs=self.knobs, host=self.host,
                           agents=self.agents, core=self.core, parts=self.parts, requires=requires)

    def add(self, cls: type[Part], cfg: Any = None) -> Part:
        """Construct a part as the daemon does (its context, its config section)."""
        part = cls(self.ctx(cls.name, cls.requires), cfg if cfg is not None else getattr(self.cfg, cls.name, None))
        self.parts[cls.name] = part
        return part

    def register(self, vm: str, policy: dict[str, Any] | None = None, snapshot: dict[str, Any] | None = None,
                 domain: FakeDomain | None = None) -> None:
        """A registered VM: its row, its domain in the fake host, its core snapshot."""
        dom = domain or self.host.domains.get(vm) or self.host.add(FakeDomain(vm))
        self.host.domains[vm] = dom
        self.store.add_vm(vm, f"uuid-{vm}", policy or {})
        self.core.snapshots[vm] = snapshot if snapshot is not None else self.snapshot_of(vm)

    def snapshot_of(self, vm: str, agent: dict[str, Any] | None = None) -> dict[str, Any]:
        """The core's snapshot of ``vm`` as the daemon's collector builds it from the fake host."""
        d = self.host.domains[vm]
        lv = {"state": d.state, "memory_mib": d.memory_kib // 1024, "max_memory_mib": d.max_memory_kib // 1024,
              "vcpus": d.vcpus, "max_vcpus": d.max_vcpus, "memstats_kib": dict(d.memstats_kib),
              "qemu_pid": d.qemu_pid, "qemu_rss": d.qemu_rss, "qemu_cpu_percent": d.qemu_cpu_percent}
        snap: dict[str, Any] = {"libvirt": lv}
        if agent is not None:
            snap["agent"] = agent
        return snap

    async def start(self) -> None:
        for p in self.parts.values():
            await p.start()

    async def period(self) -> Period:
        self.periods += 1
        return await run_period(self.parts, Period(self.periods))

    def close(self) -> None:
        self.store.close()


def on(fn: Callable[[str, dict[str, Any]], Any]) -> Callable[[str, dict[str, Any]], Any]:
    """Mark a reply as computed from the call (readability in tests)."""
    return fn
