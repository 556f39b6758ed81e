"""HTTP API for placement plans (mounted by the daemon under ``/v1/placement``).

``POST /plan`` is pure when the body carries the hosts: the plan is computed from the body
alone and is reproducible. With ``live: true`` (or ``hotspots``/``idle``) this daemon's live
inventory (``GET /inventory``: :meth:`PlacementPart.inventory`, reached as
``request.app.state.parts["placement"]``: host capacity, registered VMs, their stored samples)
is the first host, and the hotspot and idle detectors are fed from the stored samples.
``POST /execute`` checks (``dry_run``, the default) or carries out a plan's migrations between
the hosts of ``placement.hosts`` and its balloon steps (idle shrink/grow) through their daemons; ``GET /migrations`` shows the progress of running ones.
Bad input gets 422 with the reason: shape and type errors from the pydantic models, semantic ones
(unknown resource, contradictory constraint groups, unknown host or VM) from the planner.
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import AfterValidator, Field, field_validator

from symbiont.apimodel import StrictModel, bounded_json
from symbiont.placement import heuristics, live
from symbiont.placement.bound import plan_bound
from symbiont.placement.execute import parse_plan
from symbiont.placement.inventory import parse_inventory, parse_requests
from symbiont.placement.part import PlacementPart
from symbiont.placement.planner import MODES, plan
from symbiont.placement.state import ClusterState

router = APIRouter(tags=["placement"])


def _nonneg(v: dict[str, float], what: str) -> dict[str, float]:
    for k, x in v.items():
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"{what} {k}: {x} must be finite and >= 0")
    return v


class VMIn(StrictModel):
    id: str = Field(min_length=1, max_length=256)
    demand: dict[str, float]
    user: str = ""
    app: str = ""
    affinity: str | None = None
    anti_affinity: str | None = None
    exclude_apps: list[str] = Field(default_factory=list, max_length=256)
    start: float = 0.0
    end: float | None = None
    deadline: float | None = None

    @field_validator("demand")
    @classmethod
    def _demand(cls, v: dict[str, float]) -> dict[str, float]:
        return _nonneg(v, "demand")


class HostIn(StrictModel):
    id: str = Field(min_length=1, max_length=256)
    capacity: dict[str, float]
    overcommit: dict[str, float] = Field(default_factory=dict)
    vms: list[VMIn] = Field(default_factory=list, max_length=100_000)

    @field_validator("capacity")
    @classmethod
    def _capacity(cls, v: dict[str, float]) -> dict[str, float]:
        return _nonneg(v, "capacity")

    @field_validator("overcommit")
    @classmethod
    def _overcommit(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if not math.isfinite(x) or x <= 0:
                raise ValueError(f"overcommit {k}: {x} must be finite and > 0")
        return v


class HotspotIn(StrictModel):
    mode: str = Field("gray-box", pattern="^(black-box|gray-box)$")
    thresholds: dict[str, float] = Field(default_factory=lambda: {"cpu": 0.75, "mem": 0.75})
    k: int = Field(3, ge=1, le=10_000)
    n: int = Field(5, ge=1, le=10_000)
    heuristic: str = "worst-fit"


class IdleIn(StrictModel):
    idle_host: str = Field(min_length=1, max_length=256)
    cpu_threshold: float = 0.05
    window: int = Field(12, ge=1, le=10_000)
    wss_max_mib: float = 64.0
    margin: float = 0.25
    min_mem_mib: float = 64.0
    wake_cpu: float | None = (
        None  # wake VMs on the idle host at this CPU fraction (default max(0.2, cpu_threshold))
    )


class ExecuteIn(StrictModel):
    plan: Annotated[dict[str, Any], AfterValidator(bounded_json(max_nodes=1_000_000))]  # free-form: bounded
    dry_run: bool = True


class PlanIn(StrictModel):
    hosts: list[HostIn] = Field(default_factory=list, max_length=100_000)
    requests: list[VMIn] = Field(default_factory=list, max_length=100_000)
    heuristic: str = "best-fit"
    mode: str = "batch"
    quotas: dict[str, dict[str, float]] = Field(default_factory=dict)
    now: float | None = None
    prefer_open: bool = True
    bound: bool = False
    improve: bool = False  # the improvement search after the heuristic (symbiont.placement.improve)
    live: bool = False  # this daemon's live inventory is the first host
    hotspots: HotspotIn | None = None  # Sandpiper on the stored samples (implies live)
    idle: IdleIn | None = None  # idle-VM consolidation on the stored samples (implies live)

    @field_validator("heuristic")
    @classmethod
    def _heuristic(cls, v: str) -> str:
        heuristics.get(v)  # ValueError lists the known names
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"unknown mode {v!r}; known: {', '.join(MODES)}")
        return v


@router.get("/heuristics")
def list_heuristics() -> list[dict[str, str]]:
    """The heuristics and their formulas."""
    return [
        {"name": h.name, "formula": h.formula, "description": h.doc} for h in heuristics.HEURISTICS.values()
    ]


def _part(request: Request) -> PlacementPart:
    return request.app.state.parts["placement"]


@router.get("/inventory")
async def get_inventory(request: Request, n: int = Query(0, ge=0, le=10_000)) -> dict[str, Any]:
    """What this daemon feeds the planner: host capacity, VM allocations, usage series (last ``n``)."""
    try:
        return await asyncio.to_thread(_part(request).inventory, n or None)
    except ValueError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc


@router.post("/plan")
async def post_plan(body: PlanIn, request: Request) -> dict[str, Any]:
    """Plan ``requests`` onto ``hosts`` (which may already run ``vms``); one decision per request.
    With ``live``/``hotspots``/``idle``: on this daemon's live inventory (plus any ``hosts``)."""
    if body.live or body.hotspots is not None or body.idle is not None:
        part = _part(request)
        data = body.model_dump()
        try:
            mine = await asyncio.to_thread(part.inventory)
            others = [{"host": h} for h in data["hosts"]]
            return live.plan_live(
                [mine, *others],
                parse_requests(data["requests"]),
                body.heuristic,
                body.mode,
                body.now,
                data["hotspots"],
                data["idle"],
            )
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
    if not body.hosts:
        raise HTTPException(status_code=422, detail="hosts: at least one host (or live: true)")
    return _static_plan(body)


def _static_plan(body: PlanIn) -> dict[str, Any]:
    data = body.model_dump()
    try:
        inv = parse_inventory({"hosts": data["hosts"], "quotas": data["quotas"]})
        reqs = parse_requests(data["requests"])
        p = plan(
            inv.hosts,
            reqs,
            body.heuristic,
            body.mode,
            inv.existing,
            inv.quotas,
            body.now,
            body.prefer_open,
            body.improve,
        )
        out = p.to_dict()
        if body.bound:
            # The bound of the plan's VMs (placed requests and those already running); a running
            # VM that no host could take alone is left out and named (bound.plan_bound).
            st = ClusterState(inv.hosts, inv.quotas)
            placed = set(p.placements)
            vms = [r for r in reqs if r.id in placed] + [r for r, _ in inv.existing]
            arr = np.array([st.demand_of(r) for r in vms]).reshape(len(vms), len(st.dims))
            out["lower_bound"] = plan_bound([r.id for r in vms], arr, st.effective, p.hosts_used,
                                            time_limit=5.0, exact_max_vars=2_000, lp_max_vars=50_000)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return out


@router.post("/execute")
async def post_execute(body: ExecuteIn, request: Request) -> dict[str, Any]:
    """Check (``dry_run``) or carry out a plan: its migrations between the configured hosts and its
    balloon steps (idle shrink/grow) through the hosts' daemons, in plan order."""
    part = _part(request)
    try:
        plan_steps = parse_plan(body.plan)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc

    def run() -> dict[str, Any]:
        with part.executor() as ex:
            steps = ex.check(plan_steps)
            if body.dry_run:
                return {"dry_run": True, "steps": steps}
            try:
                return {"dry_run": False, "results": ex.execute(plan_steps)}
            finally:
                part.finished([m.vm for m in plan_steps])

    try:
        return await asyncio.to_thread(run)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc


@router.get("/migrations")
def get_migrations(request: Request) -> dict[str, Any]:
    """Migrations in progress, by VM."""
    return {"running": _part(request).migrations()}
