"""HTTP API of the dedup part, mounted by the daemon under ``/v1/dedup``.

* ``GET  /status``          KSM counters and settings, ksmd CPU, the policy, tenant verdicts, last scan
* ``PUT  /policy``          opt in to a KSM policy (``stock``, ``ksmtuned``, ``hint``, ``fixed``, ``advisor``, ``off``)
* ``DELETE /policy``        forget the API's policy and restore every KSM value changed
* ``GET  /vms``, ``/vms/{name}``  per-VM shared / unshared memory, mergeability, estimate
* ``POST /scan``            run the hashing engine now over some or all VMs
* ``GET  /scan``            the last scan's report (with candidate regions)
* ``GET  /backends``        which hashing backends are usable here
* ``GET  /decisions``       the part's logged decisions with their inputs
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import Field

from symbiont.apimodel import StrictModel
from symbiont.dedup.backends import BackendError, available_backends
from symbiont.dedup.engine import EngineError
from symbiont.dedup.part import DedupPart
from symbiont.dedup.service import Mode, ModeError
from symbiont.host.port import HostError

router = APIRouter()

PolicyName = Literal["off", "stock", "ksmtuned", "hint", "fixed", "advisor"]
BackendName = Literal["auto", "cpu", "cupy", "simulated-gpu"]


def _svc(request: Request) -> DedupPart:
    svc = getattr(request.app.state, "parts", {}).get("dedup")
    if not isinstance(svc, DedupPart):
        raise HTTPException(503, "the dedup part is not running in this daemon")
    return svc


async def _read_world(svc: DedupPart) -> None:
    """A fresh observation for a view; the host's refusal (no KSM) is a 409 with its reason."""
    try:
        await asyncio.to_thread(svc.read_world)
    except HostError as exc:
        raise HTTPException(409, str(exc)) from None


class PolicyBody(StrictModel):
    policy: PolicyName
    pages_to_scan: int | None = Field(None, ge=1, le=1_000_000, description="policy fixed")
    sleep_millisecs: int | None = Field(None, ge=1, le=600_000, description="policy fixed")
    max_page_sharing: int | None = Field(None, ge=2, le=1 << 20, description="set while active")
    use_zero_pages: Literal[0, 1] | None = None
    hint: dict[str, float | int] = Field(default_factory=dict, description="HintParams overrides")
    ksmtuned: dict[str, float | int] = Field(default_factory=dict, description="KsmtunedParams overrides")
    advisor: dict[str, int] = Field(default_factory=dict, description="AdvisorParams overrides (policy advisor)")
    backend: BackendName = "auto"
    gpu_type: str = Field("A100", max_length=16)
    scan_interval_s: float = Field(30.0, ge=1.0, le=86400.0)
    unmerge_on_stop: bool = False


class ScanBody(StrictModel):
    vms: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")]] | None = Field(None, max_length=64)
    backend: BackendName | None = None
    regions: int = Field(32, ge=0, le=1000)
    prefixes: bool = Field(False, description="also report the first 1..N VMs as subsets (ESX-style curves)")


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    return _svc(request).status()


@router.put("/policy")
async def set_policy(request: Request, body: PolicyBody) -> dict[str, Any]:
    svc = _svc(request)
    if not svc.available:
        raise HTTPException(409, "KSM is not available on this host kernel")
    try:
        mode = Mode(**body.model_dump()).validate()
        return await svc.set_mode(mode)
    except ModeError as exc:
        raise HTTPException(422, str(exc)) from None
    except (HostError, BackendError) as exc:
        raise HTTPException(409, str(exc)) from None


@router.delete("/policy")
async def clear_policy(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    try:
        return await svc.clear_mode()
    except HostError as exc:
        raise HTTPException(409, str(exc)) from None


@router.get("/vms")
async def list_vms(request: Request) -> list[dict[str, Any]]:
    svc = _svc(request)
    if not svc.vms:
        await _read_world(svc)
    return [svc.vms[n] for n in sorted(svc.vms)]


@router.get("/vms/{name}")
async def show_vm(request: Request, name: str) -> dict[str, Any]:
    svc = _svc(request)
    if name not in svc.vms:
        await _read_world(svc)
    v = svc.vm_view(name)
    if v is None:
        raise HTTPException(404, f"VM {name!r} is not registered")
    return v


@router.post("/scan")
async def scan(request: Request, body: ScanBody) -> dict[str, Any]:
    svc = _svc(request)
    await _read_world(svc)
    try:
        rep = await asyncio.to_thread(svc.scan, body.vms, body.backend)
    except EngineError as exc:
        raise HTTPException(409 if "not registered and running" in str(exc) else 500, str(exc)) from None
    except (BackendError, HostError) as exc:
        raise HTTPException(409, str(exc)) from None
    out = rep.as_dict(regions=body.regions) | {"meta": svc.report_meta}
    if body.prefixes:
        out["prefixes"] = [rep.subset(rep.names[:k]) for k in range(1, len(rep.names) + 1)]
    return out


@router.get("/scan")
async def last_scan(request: Request, regions: Annotated[int, Query(ge=0, le=1000)] = 32) -> dict[str, Any]:
    svc = _svc(request)
    if svc.report is None:
        raise HTTPException(404, "no scan yet: POST /v1/dedup/scan, or set policy hint")
    return svc.report.as_dict(regions=regions) | {"meta": svc.report_meta}


@router.get("/backends")
async def backends() -> dict[str, Any]:
    return await asyncio.to_thread(available_backends)


@router.get("/decisions")
async def decisions(request: Request, limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> list[dict[str, Any]]:
    rows = _svc(request).ctx.store.query(
        "SELECT * FROM decisions WHERE part = 'dedup' ORDER BY id DESC LIMIT ?", (limit,)
    )
    return [{"ts": r["ts"], "vm": r["vm"], "action": r["action"], "inputs": json.loads(r["inputs"]),
             "outcome": json.loads(r["outcome"])} for r in reversed(rows)]  # fmt: skip
