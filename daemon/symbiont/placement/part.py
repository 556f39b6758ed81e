"""The placement part: this host's live inventory for plans, and the execution of plans.

Placement acts on demand, not per period: ``GET /v1/placement/inventory`` and ``POST /plan``
with ``live`` read :meth:`PlacementPart.inventory` (the host's capacity through the host port,
the registered VMs, their stored samples, their guest floors from the memory part it
``requires``, the balloon originals from the knob ledger); ``POST /execute`` runs a plan through
an :class:`~symbiont.placement.execute.Executor` built by :meth:`PlacementPart.executor`, whose
migrations go through :class:`symbiont.host.migrate.RemoteLibvirt` (host/ is the only door to
libvirt) and whose balloon steps go through the owning host's daemon API — on this host that is
the memory part's ``PUT /v1/vms/{vm}/memory``, so the balloon lands in the knob ledger under the
memory part's ``balloon_mib`` kind. Placement turns no knob of its own: it registers no kind, and
the ledger has nothing to restore for it. Its runtime state (the progress of running
migrations) lives in the part, not in a module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from symbiont.host.port import HostError
from symbiont.part import Part, PartContext
from symbiont.placement import live
from symbiont.placement.config import CONFIG, PlacementConfig
from symbiont.placement.execute import Executor, parse_hosts


class PlacementPart(Part):
    """Live inventory and plan execution for this host (see the module docstring)."""

    name = "placement"
    config = CONFIG
    requires = ("memory",)  # guest floors (ctx.peer("memory").floor) for the idle detector

    def __init__(self, ctx: PartContext, cfg: PlacementConfig | None) -> None:
        super().__init__(ctx, cfg if cfg is not None else PlacementConfig())
        self._progress: dict[str, dict[str, Any]] = {}  # vm -> bytes processed/total (GET /migrations)
        self._lock = threading.Lock()  # executions run in threads
        self.remote: Callable[[], Any] | None = None  # RemoteLibvirt factory (None: the real one)

    # -- the live inventory ----------------------------------------------------------------
    def inventory(self, n: int | None = None) -> dict[str, Any]:
        """This host for the planner: capacity, VM allocations, the last ``n`` samples per VM
        (default ``placement.history_samples``). Blocking (host calls, sqlite): run it in a thread."""
        ctx = self.ctx
        n = n or self.cfg.history_samples
        try:
            hs = ctx.host.host_sample()
            capacity = {"cpu": float(hs["cpus"] or 1), "mem": float(hs["mem_total"]) / live.GIB}
            source = "psutil (host sample)"
        except (HostError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"host capacity unknown: {exc}") from None
        floors = ctx.peer("memory")
        vms = []
        for rec in ctx.vms():
            lv = (ctx.latest(rec.name) or {}).get("libvirt") or {}
            balloon = ctx.knobs.get(rec.name, "balloon_mib")
            parked = (rec.policy.get("extra") or {}).get("placement") or {}  # set when a plan parked it here
            fl = floors.floor(rec.name)
            running = lv.get("state") == "running"
            vms.append(
                {
                    "reserve_mib": fl.reserve_mib,
                    "floor_mib": fl.floor_mib,
                    "full_mem_mib": parked.get("full_mem_mib") or (balloon["original"] if balloon else None),
                    "home": parked.get("home"),
                    "min_mib": (rec.policy.get("memory") or {}).get("min_mib"),
                    "name": rec.name,
                    "vcpus": lv.get("vcpus") if running else 0,
                    "memory_mib": lv.get("memory_mib") if running else 0,
                    # Only this stay's samples (since it was registered here, the daemon's own
                    # clock): a VM moved away and back must not look idle on its old samples.
                    "libvirt": ctx.store.history(rec.name, "libvirt", since=rec.registered_at, limit=n),
                    "agent": ctx.store.history(rec.name, "agent", since=rec.registered_at, limit=n + 1),
                }
            )
        inv = live.build_inventory(live.host_id(ctx.cfg), capacity, dict(self.cfg.overcommit or {}), vms, n)
        inv["capacity_source"] = source
        inv["libvirt_uri"] = ctx.cfg.libvirt_uri
        inv["period_s"] = ctx.cfg.control.period_s
        return inv

    # -- executing plans -------------------------------------------------------------------
    def executor(self) -> Executor:
        """An executor over ``placement.hosts``: decisions logged as this part's, progress kept
        here for :meth:`migrations`. Use it as a context manager (it holds libvirt connections)."""

        def progress(vm: str, done: float, total: float) -> None:
            with self._lock:
                self._progress[vm] = {"processed_bytes": done, "total_bytes": total, "at": time.time()}

        return Executor(
            parse_hosts(self.cfg.hosts),
            self.ctx.cfg.agent.channel_name,
            unsafe=self.cfg.migrate_unsafe,
            log_decision=self.ctx.decisions.log,
            progress=progress,
            remote=self.remote() if self.remote is not None else None,
        )

    def finished(self, vms: list[str]) -> None:
        """The migrations of ``vms`` ended (successfully or not): no progress to show."""
        with self._lock:
            for vm in vms:
                self._progress.pop(vm, None)

    def migrations(self) -> dict[str, dict[str, Any]]:
        """Migrations in progress, by VM."""
        with self._lock:
            return dict(self._progress)

    def status(self) -> dict[str, Any]:
        return {"hosts": len(self.cfg.hosts), "migrations_running": len(self.migrations())}
