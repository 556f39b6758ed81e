"""HTTP API of the CPU-and-nesting part, mounted by the daemon under ``/v1/cpu``.

Containers live in the guests and are managed by each guest's agent; these endpoints
validate the request (pydantic: a bad body is a 422 naming the field, before anything is
sent to a guest) and forward it. The agent validates again and answers errors as
``TypeName: message``, mapped to 404 (unknown container), 409 (conflict), 422 (bad input).

* ``GET/POST /v1/cpu/vms/{vm}/containers``, ``GET/DELETE .../containers/{name}``,
  ``POST .../{name}/start|stop``, ``PATCH .../{name}`` (limits), ``GET .../{name}/logs``
* ``GET/PUT /v1/cpu/vms/{vm}/mode``: nesting-aware or agnostic, CPU strategy
* ``GET/PUT /v1/cpu/vms/{vm}/vcpus``: scale with guest-first offlining, all views of the count
* ``POST /v1/cpu/vms/{vm}/rebalance``, ``PUT /v1/cpu/vms/{vm}/memory`` (nesting-aware balloon),
  ``POST /v1/cpu/vms/{vm}/release``
* ``GET /v1/cpu/qemu``: the QEMU cgroups' CPU shares (libvirt schedinfo) and their saved originals
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from pydantic import Field, field_validator

from symbiont.apimodel import StrictModel
from symbiont.cpu.part import SHARES, CpuPart

router = APIRouter(tags=["cpu"])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
VmName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$", description="libvirt domain name")]
CtName = Annotated[str, Path(pattern=NAME_PATTERN, description="container name")]
Bytes = int | str | None  # bytes, or "256M", or "max"/None


class Limits(StrictModel):
    """Per-container limits; unset fields keep their value (on create: the kernel default)."""
    cpu_weight: int | None = Field(None, ge=1, le=10_000, description="cgroup v2 cpu.weight")
    cpu_max: float | str | None = Field(None, description="CPUs (e.g. 1.5), 'QUOTA PERIOD' in us, or 'max'")
    cpuset: str | list[int] | None = Field(None, description="CPUs to pin to, e.g. '0-1,3'; must be online")
    memory_max: Bytes = Field(None, description="bytes or e.g. '256M'")
    memory_high: Bytes = None
    memory_low: Bytes = None
    pids_max: int | None = Field(None, ge=1, le=1 << 22)
    no_reclaim: bool | None = Field(None, description="never reclaim from this container")
    cpu_ratio: float | None = Field(None, gt=0, le=1_000_000, description="ratio-managed CPU share (e.g. 1, 1, 4)")
    mem_shares: float | None = Field(None, gt=0, le=1_000_000, description="memory reclamation shares")

    @field_validator("cpu_max")
    @classmethod
    def _cpu_max(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0.01 <= v <= 4096:
            raise ValueError("cpu_max in CPUs must be within 0.01..4096")
        return v

    @field_validator("memory_max", "memory_high", "memory_low")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 1 << 50:
            raise ValueError("bytes must be within 0..2^50")
        if isinstance(v, str) and len(v) > 32:
            raise ValueError("too long")
        return v


class ContainerSpec(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="container name (also its cgroup's)")
    command: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=64,
                                                                 description="argv, run from the guest's root fs")
    limits: Limits = Field(default_factory=Limits)
    hostname: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
    netns: bool = Field(False, description="also a network namespace (only lo)")
    start: bool = True


class ModeBody(StrictModel):
    nesting_aware: bool | None = None
    cpu_strategy: Literal["pin-share", "quota"] | None = None


class ScaleBody(StrictModel):
    count: int = Field(ge=1, le=1024, description="vCPUs")
    libvirt_unplug: bool = Field(False, description="after offlining in the guest, also ask libvirt to unplug "
                                 "(under TCG it times out and leaves libvirt's count stale)")


class BalloonBody(StrictModel):
    target_mib: int = Field(ge=64, le=1 << 22)
    nesting_aware: bool = Field(True, description="reclaim from containers by shares before inflating")
    use_free: bool = Field(True, description="count the guest's free memory before reclaiming")


def ctl(request: Request) -> CpuPart:
    return request.app.state.parts["cpu"]


@router.get("/vms/{vm}/containers")
async def list_containers(vm: VmName, request: Request) -> dict[str, Any]:
    return await ctl(request).agent(vm, "cpu.container-list")


@router.post("/vms/{vm}/containers", status_code=201)
async def create_container(vm: VmName, body: ContainerSpec, request: Request) -> dict[str, Any]:
    args: dict[str, Any] = {"name": body.name, "command": body.command, "netns": body.netns, "start": body.start,
                            "limits": body.limits.model_dump(exclude_unset=True)}
    if body.hostname:
        args["hostname"] = body.hostname
    c = ctl(request)
    res = await c.agent(vm, "cpu.container-create", args, timeout=30.0)
    c.ctx.decisions.log("ct-create", vm, {"name": body.name, "limits": args["limits"]},
                                {"state": res.get("state")})
    return res


@router.get("/vms/{vm}/containers/{name}")
async def show_container(vm: VmName, name: CtName, request: Request) -> dict[str, Any]:
    return await ctl(request).agent(vm, "cpu.container-show", {"name": name})


@router.get("/vms/{vm}/containers/{name}/logs")
async def container_logs(vm: VmName, name: CtName, request: Request) -> dict[str, Any]:
    return await ctl(request).agent(vm, "cpu.container-logs", {"name": name})


@router.post("/vms/{vm}/containers/{name}/start")
async def start_container(vm: VmName, name: CtName, request: Request) -> dict[str, Any]:
    return await ctl(request).agent(vm, "cpu.container-start", {"name": name}, timeout=30.0)


@router.post("/vms/{vm}/containers/{name}/stop")
async def stop_container(vm: VmName, name: CtName, request: Request) -> dict[str, Any]:
    return await ctl(request).agent(vm, "cpu.container-stop", {"name": name}, timeout=30.0)


@router.delete("/vms/{vm}/containers/{name}")
async def destroy_container(vm: VmName, name: CtName, request: Request) -> dict[str, Any]:
    c = ctl(request)
    res = await c.agent(vm, "cpu.container-destroy", {"name": name}, timeout=30.0)
    c.ctx.decisions.log("ct-destroy", vm, {"name": name}, {"restored": res.get("restored")})
    return res


@router.patch("/vms/{vm}/containers/{name}")
async def set_limits(vm: VmName, name: CtName, body: Limits, request: Request) -> dict[str, Any]:
    limits = body.model_dump(exclude_unset=True)
    c = ctl(request)
    res = await c.agent(vm, "cpu.container-set", {"name": name, "limits": limits}, timeout=30.0)
    c.ctx.decisions.log("ct-set", vm, {"name": name, "limits": limits}, {"ok": True})
    return res


@router.get("/vms/{vm}/mode")
async def get_mode(vm: VmName, request: Request) -> dict[str, Any]:
    return await ctl(request).agent(vm, "cpu.container-mode")


@router.put("/vms/{vm}/mode")
async def set_mode(vm: VmName, body: ModeBody, request: Request) -> dict[str, Any]:
    args = body.model_dump(exclude_none=True)
    c = ctl(request)
    res = await c.agent(vm, "cpu.container-mode", args or {"nesting_aware": True})
    c.ctx.decisions.log("mode", vm, args, {"nesting_aware": res.get("nesting_aware")})
    return res


@router.post("/vms/{vm}/rebalance")
async def rebalance(vm: VmName, request: Request) -> dict[str, Any]:
    return await ctl(request).agent(vm, "cpu.container-rebalance", {"reason": "request"})


@router.get("/vms/{vm}/vcpus")
async def get_vcpus(vm: VmName, request: Request) -> dict[str, Any]:
    return await ctl(request).vcpus_view(vm)


@router.put("/vms/{vm}/vcpus")
async def scale(vm: VmName, body: ScaleBody, request: Request) -> dict[str, Any]:
    return await ctl(request).scale(vm, body.count, body.libvirt_unplug)


@router.put("/vms/{vm}/memory")
async def balloon(vm: VmName, body: BalloonBody, request: Request) -> dict[str, Any]:
    return await ctl(request).balloon(vm, body.target_mib, body.nesting_aware, body.use_free)


@router.post("/vms/{vm}/release")
async def release(vm: VmName, request: Request) -> dict[str, Any]:
    c = ctl(request)
    c.ctx.vm(vm)
    return {"vm": vm, "release": await c.release(vm)}


@router.get("/qemu")
async def qemu(request: Request) -> dict[str, Any]:
    """What the part did with each VM's QEMU cgroup CPU shares (libvirt schedinfo), and the
    originals the ledger keeps."""
    c = ctl(request)
    saved = [r for r in c.ctx.knobs.rows(part="cpu") if r["kind"] == SHARES]
    return {"vms": dict(c.qemu_status), "saved": saved}
