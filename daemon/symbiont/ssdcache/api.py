"""HTTP API of the ssdcache part, mounted by the daemon under ``/v1/ssdcache``.

Pool: ``GET/POST/DELETE /pool``. Caches (SymFlex registration ``<vm-id, size, current-size,
persist>``): ``GET/POST /caches``, ``GET/PATCH/DELETE /caches/{vm}``, ``PUT /caches/{vm}/size``
(inflate/deflate), ``POST /caches/{vm}/attach|detach`` (hot-plug the elastic disk into the
running libvirt domain through the host port; with ``reconnect_delay_s`` over QMP, see
:mod:`symbiont.host.nbddisk`),
``GET /caches/{vm}/disk-xml``. Policy: ``GET/PUT /policy``, ``GET /policy/plan``,
``POST /policy/apply``. Two-level (DoubleDecker) partitions: ``/twolevel``; the VM level as run
in the guest: ``GET /twolevel/vms/{vm}/guest``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import Field, model_validator

from symbiont.apimodel import StrictModel
from symbiont.host.port import HostError
from symbiont.ssdcache.manager import MAX_CACHE_MIB, CacheError, CacheManager
from symbiont.ssdcache.part import SsdCachePart
from symbiont.ssdcache.pool import MAX_POOL_MIB

router = APIRouter()

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
VmName = Annotated[str, Path(pattern=NAME, description="VM (libvirt domain) name")]


class PoolBody(StrictModel):
    file: str | None = Field(None, max_length=4096, description="backing file for a loop device, inside "
                             "ssdcache.pool_dir (a relative name is taken there)")
    device: str | None = Field(None, max_length=4096, description="a real block device instead (one of "
                               "ssdcache.allowed_devices, not mounted, held or swap)")
    size_mib: int | None = Field(None, ge=1, le=MAX_POOL_MIB, description="size of a new backing file")

    @model_validator(mode="after")
    def _one(self) -> PoolBody:
        if (self.file is None) == (self.device is None):
            raise ValueError("give exactly one of file and device")
        if self.file is not None and self.size_mib is None:
            raise ValueError("a pool file needs size_mib")
        return self


class CacheBody(StrictModel):
    """SymFlex registration: ``<vm-id, size, current-size, persist>`` (+ policy parameters)."""
    vm: str = Field(pattern=NAME)
    size_mib: int = Field(ge=1, le=MAX_CACHE_MIB, description="the virtual SSD the VM sees")
    current_mib: int = Field(0, ge=0, le=MAX_CACHE_MIB, description="how much of it is backed now")
    persist: bool = Field(False, description="keep blocks and data across VM and daemon restarts")
    weight: int = Field(100, ge=1, le=1_000_000, description="share-based allocation weight")
    min_mib: int = Field(0, ge=0, le=MAX_CACHE_MIB)
    max_mib: int | None = Field(None, ge=0, le=MAX_CACHE_MIB)


class CachePatch(StrictModel):
    weight: int | None = Field(None, ge=1, le=1_000_000)
    persist: bool | None = None
    min_mib: int | None = Field(None, ge=0, le=MAX_CACHE_MIB)
    max_mib: int | None = Field(None, ge=0, le=MAX_CACHE_MIB)


class SizeBody(StrictModel):
    current_mib: int = Field(ge=0, le=MAX_CACHE_MIB)


class AttachBody(StrictModel):
    target_dev: str = Field("vdb", pattern=r"^vd[b-z]$")
    serial: str = Field("symbiont-cache", pattern=r"^[A-Za-z0-9_.-]{1,20}$", description="the guest finds it by this")
    reconnect_delay_s: int = Field(0, ge=0, le=3600, description="QEMU NBD reconnect-delay: requests wait this "
                                   "long for a restarted daemon (attached over QMP: libvirt 9.0 has no such XML)")
    transport: Literal["nbd", "vhost-user"] = Field(
        "nbd", description="nbd: QEMU's NBD client; vhost-user: vhost-user-blk on the daemon's C backend, no copy "
        "through a socket (the domain needs shared memfd RAM)")


class WorkloadBody(StrictModel):
    action: Literal["start", "stop"]
    working_set_mib: int = Field(32, ge=1, le=65536)
    seconds: float = Field(3600, gt=0, le=86400)
    io_kib: int = Field(4, ge=4, le=1024, multiple_of=4)
    seed: int = Field(1, ge=0, le=1 << 31)
    verify: bool = False


class PolicyBody(StrictModel):
    mode: Literal["manual", "shares", "throughput"] | None = None
    capacity_mib: int | None = Field(None, ge=0, le=MAX_POOL_MIB)
    target_ratio: dict[str, float] | None = Field(None, description="throughput mode: VM -> target ratio")
    gain: float | None = Field(None, gt=0, le=1)
    max_step_mib: int | None = Field(None, ge=1, le=1 << 20)
    every_periods: int | None = Field(None, ge=1, le=10_000)

    @model_validator(mode="after")
    def _ratios(self) -> PolicyBody:
        if self.target_ratio is not None:
            if len(self.target_ratio) > 10_000 or any(not 0 < v < 1e9 for v in self.target_ratio.values()):
                raise ValueError("target ratios must be positive")
        return self


class ApplyBody(StrictModel):
    mode: Literal["shares", "throughput"] | None = None


def _part(request: Request) -> SsdCachePart:
    return request.app.state.parts["ssdcache"]


def _mgr(request: Request) -> CacheManager:
    try:
        return _part(request).require_manager()
    except CacheError as exc:
        raise HTTPException(exc.status, str(exc)) from None


async def _run(coro: Any) -> Any:
    try:
        return await coro
    except CacheError as exc:
        raise HTTPException(exc.status, str(exc)) from None


def _sync(fn: Any, *a: Any, **kw: Any) -> Any:
    try:
        return fn(*a, **kw)
    except CacheError as exc:
        raise HTTPException(exc.status, str(exc)) from None


@router.get("/pool")
async def get_pool(request: Request) -> dict[str, Any]:
    return _mgr(request).pool_view()


@router.post("/pool", status_code=201)
async def create_pool(request: Request, body: PoolBody) -> dict[str, Any]:
    return await _run(_mgr(request).create_pool(body.file, body.device, body.size_mib))


@router.delete("/pool")
async def delete_pool(request: Request, remove_file: bool = False) -> dict[str, Any]:
    return await _run(_mgr(request).delete_pool(remove_file))


@router.get("/caches")
async def list_caches(request: Request) -> list[dict[str, Any]]:
    return _mgr(request).views()


@router.post("/caches", status_code=201)
async def register(request: Request, body: CacheBody) -> dict[str, Any]:
    return await _run(_mgr(request).register(body.vm, body.size_mib, body.current_mib, body.persist,
                                             body.weight, body.min_mib, body.max_mib))


@router.get("/caches/{vm}")
async def show(request: Request, vm: VmName) -> dict[str, Any]:
    return _sync(_mgr(request).view, vm)


@router.patch("/caches/{vm}")
async def update(request: Request, vm: VmName, body: CachePatch) -> dict[str, Any]:
    return await _run(_mgr(request).update(vm, body.weight, body.persist, body.min_mib, body.max_mib))


@router.delete("/caches/{vm}")
async def unregister(request: Request, vm: VmName) -> dict[str, Any]:
    return await _run(_mgr(request).unregister(vm))


@router.put("/caches/{vm}/size")
async def resize(request: Request, vm: VmName, body: SizeBody) -> dict[str, Any]:
    return await _run(_mgr(request).resize(vm, body.current_mib, reason="api"))


@router.get("/caches/{vm}/disk-xml")
async def disk_xml(request: Request, vm: VmName, target_dev: Annotated[str, Query(pattern=r"^vd[b-z]$")] = "vdb",
                   serial: Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,20}$")] = "symbiont-cache") -> dict[str, Any]:
    return {"xml": _sync(_mgr(request).disk_xml, vm, target_dev, serial)}


@router.post("/caches/{vm}/attach")
async def attach(request: Request, vm: VmName, body: AttachBody) -> dict[str, Any]:
    """Hot-plug the elastic disk into the running domain (QEMU's NBD client on a unix socket,
    or a vhost-user-blk device on the daemon's backend)."""
    try:
        return await _run(_part(request).attach(vm, body.target_dev, body.serial, body.reconnect_delay_s,
                                              body.transport))
    except HostError as exc:
        raise HTTPException(409, f"the disk was refused: {exc}") from None


@router.post("/caches/{vm}/detach")
async def detach(request: Request, vm: VmName, body: AttachBody) -> dict[str, Any]:
    try:
        return await _run(_part(request).detach(vm, body.target_dev, body.serial, body.reconnect_delay_s,
                                              body.transport))
    except HostError as exc:
        raise HTTPException(409, f"the disk could not be detached: {exc}") from None
    except TimeoutError:
        raise HTTPException(504, f"{vm}: the guest did not let go of the disk in time") from None


@router.post("/caches/{vm}/guest-workload")
async def guest_workload(request: Request, vm: VmName, body: WorkloadBody) -> dict[str, Any]:
    """Start/stop the guest agent's cache workload: random reads of a throttled slow disk
    through the guest's cache on the elastic SSD (``verify`` checks every byte read)."""
    params = body.model_dump(exclude={"action"})
    return await _run(_mgr(request).guest_workload(vm, body.action, params if body.action == "start" else {}))


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    mgr = _mgr(request)
    return {
        "pool": mgr.pool_view(),
        "caches": {v["vm"]: {"current_mib": v["current_mib"], "size_mib": v["size_mib"], "io": v["io"],
                             "guest": v["guest"]["status"]} for v in mgr.views()},
    }


@router.get("/policy")
async def get_policy(request: Request) -> dict[str, Any]:
    return _mgr(request).policy()


@router.put("/policy")
async def set_policy(request: Request, body: PolicyBody) -> dict[str, Any]:
    return _sync(_mgr(request).set_policy, **body.model_dump(exclude_none=True))


@router.get("/policy/plan")
async def plan(request: Request,
               mode: Annotated[str | None, Query(pattern="^(shares|throughput)$")] = None) -> dict[str, Any]:
    target, why = _sync(_mgr(request).plan, mode)
    return {"target": target, "why": why}


@router.post("/policy/apply")
async def apply(request: Request, body: ApplyBody) -> dict[str, Any]:
    return await _run(_mgr(request).apply_policy(body.mode, reason="api"))


# -- DoubleDecker: two-level Mem/SSD partitions ---------------------------------------------
class TwoLevelBody(StrictModel):
    mem_mib: int = Field(ge=0, le=1 << 20, description="host memory tier")
    ssd_mib: int = Field(0, ge=0, le=MAX_POOL_MIB, description="SSD tier, carved from the pool")


class TWBody(StrictModel):
    """``<T, W>``: ``{"type": "mem", "weight": 60}``, or ``{"mem": 50, "ssd": 10}`` for both tiers."""
    type: Literal["mem", "ssd"] | None = None
    weight: int | None = Field(None, ge=0, le=1_000_000)
    mem: int | None = Field(None, ge=0, le=1_000_000)
    ssd: int | None = Field(None, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _shape(self) -> TWBody:
        if (self.type is None) == (self.mem is None and self.ssd is None):
            raise ValueError("give type and weight, or mem and/or ssd weights")
        if self.type is not None and self.weight is None:
            raise ValueError("type needs a weight")
        return self

    def tw(self) -> dict[str, Any]:
        if self.type is not None:
            return {"type": self.type, "weight": self.weight}
        return {t: w for t, w in (("mem", self.mem), ("ssd", self.ssd)) if w is not None}


Container = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")]


@router.get("/twolevel")
async def twolevel_view(request: Request) -> dict[str, Any]:
    tl = _mgr(request).twolevel
    return tl.view() if tl is not None else {"exists": False}


@router.put("/twolevel")
async def twolevel_setup(request: Request, body: TwoLevelBody) -> dict[str, Any]:
    return await _run(_mgr(request).twolevel_setup(body.mem_mib, body.ssd_mib))


@router.put("/twolevel/vms/{vm}")
async def twolevel_vm(request: Request, vm: VmName, body: TWBody) -> dict[str, Any]:
    return await _run(_mgr(request).twolevel_configure(vm, body.tw()))


@router.delete("/twolevel/vms/{vm}")
async def twolevel_vm_remove(request: Request, vm: VmName) -> dict[str, Any]:
    return await _run(_mgr(request).twolevel_remove(vm))


@router.put("/twolevel/vms/{vm}/containers/{container}")
async def twolevel_container(request: Request, vm: VmName, container: Container, body: TWBody) -> dict[str, Any]:
    return await _run(_mgr(request).twolevel_configure(vm, body.tw(), container))


@router.get("/twolevel/vms/{vm}/guest")
async def twolevel_guest(request: Request, vm: VmName) -> dict[str, Any]:
    """The VM level as run in the guest: per-container quotas and occupancy of its store."""
    if _part(request).ctx.store.get_vm(vm) is None:  # no agent link without a registration: 404, not 503
        raise HTTPException(404, f"VM {vm!r} is not registered")
    return await _run(_mgr(request).twolevel_guest(vm))


@router.delete("/twolevel/vms/{vm}/containers/{container}")
async def twolevel_container_remove(request: Request, vm: VmName, container: Container) -> dict[str, Any]:
    return await _run(_mgr(request).twolevel_remove(vm, container))
