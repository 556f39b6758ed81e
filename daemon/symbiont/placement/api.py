"""HTTP API for placement plans (mounted by the daemon under ``/v1/placement``).

Pure: a plan is computed from the request body alone (no libvirt, no daemon state), so the
endpoint is safe to call at any time and its answer is reproducible. Bad input gets 422 with the
reason: shape and type errors from the pydantic models, semantic ones (unknown resource,
contradictory constraint groups, an existing VM on an unknown host) from the planner.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from symbiont.placement import heuristics
from symbiont.placement.bound import lower_bound, quality
from symbiont.placement.inventory import parse_inventory, parse_requests
from symbiont.placement.planner import MODES, plan
from symbiont.placement.state import ClusterState

router = APIRouter(tags=["placement"])


def _nonneg(v: dict[str, float], what: str) -> dict[str, float]:
    for k, x in v.items():
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"{what} {k}: {x} must be finite and >= 0")
    return v


class VMIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class HostIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class PlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: list[HostIn] = Field(min_length=1, max_length=100_000)
    requests: list[VMIn] = Field(max_length=100_000)
    heuristic: str = "best-fit"
    mode: str = "batch"
    quotas: dict[str, dict[str, float]] = Field(default_factory=dict)
    now: float | None = None
    prefer_open: bool = True
    bound: bool = False

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


@router.post("/plan")
def post_plan(body: PlanIn) -> dict[str, Any]:
    """Plan ``requests`` onto ``hosts`` (which may already run ``vms``); one decision per request."""
    data = body.model_dump()
    try:
        inv = parse_inventory({"hosts": data["hosts"], "quotas": data["quotas"]})
        reqs = parse_requests(data["requests"])
        p = plan(
            inv.hosts, reqs, body.heuristic, body.mode, inv.existing, inv.quotas, body.now, body.prefer_open
        )
        out = p.to_dict()
        if body.bound:
            st = ClusterState(inv.hosts)
            placed = set(p.placements)
            dem = [st.demand_of(r) for r in reqs if r.id in placed] + [
                st.demand_of(r) for r, _ in inv.existing
            ]
            arr = np.array(dem).reshape(len(dem), len(st.dims))
            lb = lower_bound(arr, st.effective, time_limit=5.0, exact_max_vars=2_000, lp_max_vars=50_000)
            out["lower_bound"] = {
                "value": lb.value,
                "method": lb.method,
                "optimal": lb.optimal,
                "ratio": round(quality(p.hosts_used, lb), 4),
            }
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return out
