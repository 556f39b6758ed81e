"""API of the memory part (mounted at /v1/memory): show ρ, f, target, actual; tune at run time."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from pydantic import Field

from symbiont.apimodel import StrictModel
from symbiont.memory.part import MemoryPart

router = APIRouter()
VmName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")]


class HostPolicy(StrictModel):
    enabled: bool | None = None
    budget_mib: int | None = Field(None, ge=0, le=1 << 24)
    free_target_mib: int | None = Field(None, ge=0, le=1 << 24)
    tax_rate: float | None = Field(None, ge=0.0, lt=1.0)


class VmPolicy(StrictModel):
    shares: int | None = Field(None, ge=1, le=1_000_000)
    tax_rate: float | None = Field(None, ge=0.0, lt=1.0)
    min_mib: int | None = Field(None, ge=64, le=1 << 22)
    max_mib: int | None = Field(None, ge=64, le=1 << 22)


def part(request: Request) -> MemoryPart:
    return request.app.state.parts["memory"]


@router.get("")
async def show(request: Request) -> dict[str, Any]:
    return await part(request).view()


@router.get("/vms/{name}/floor")
async def show_floor(name: VmName, request: Request) -> dict[str, Any]:
    """The lowest balloon target the VM's guest survives, and what it is made of (the floor
    ``PUT /v1/vms/{name}/memory``, the policy and placement plans all respect)."""
    p = part(request)
    p.ctx.vm(name)  # 404 when not registered
    return {"name": name, **p.floor(name).to_dict()}


@router.put("/policy")
async def set_host_policy(body: HostPolicy, request: Request) -> dict[str, Any]:
    p = part(request)
    p.set_policy(body.model_dump(exclude_none=True))
    return await p.view()


@router.put("/vms/{name}")
async def set_vm_policy(name: VmName, body: VmPolicy, request: Request) -> dict[str, Any]:
    """Change a VM's shares, τ or bounds; validated against the VM before anything changes."""
    ctx = part(request).ctx
    rec = ctx.vm(name)  # 404 when not registered
    mem = dict(rec.policy.get("memory", {}))
    mem.update(body.model_dump(exclude_none=True))
    boot = (ctx.latest(name).get("libvirt", {}) or {}).get("max_memory_mib")
    if mem.get("min_mib") is not None and mem.get("max_mib") is not None and mem["min_mib"] > mem["max_mib"]:
        raise HTTPException(422, f"min_mib {mem['min_mib']} exceeds max_mib {mem['max_mib']}")
    if boot and mem.get("max_mib") is not None and mem["max_mib"] > boot:
        raise HTTPException(422, f"max_mib {mem['max_mib']} exceeds the VM's boot memory {boot} MiB")
    if boot and mem.get("min_mib") is not None and mem["min_mib"] > boot:
        raise HTTPException(422, f"min_mib {mem['min_mib']} exceeds the VM's boot memory {boot} MiB")
    policy = {**rec.policy, "memory": mem}
    ctx.store.update_vm_policy(name, policy)
    ctx.decisions.log("vm-policy", name, body.model_dump(exclude_none=True), {"memory": mem})
    return {"name": name, "memory": mem}
