"""HTTP API of the GPU part, mounted by the daemon under ``/v1/gpu``.

Register GPUs (simulated presets or real CUDA devices), set client quotas on the live endpoint
service (a share change is a vertical scaling, measured), migrate clients, submit FaaS
workloads from a trace and read their results. The state lives in the daemon's sqlite
(:mod:`symbiont.gpu.manager`) and survives a restart; the part runs when the daemon's config
has ``gpu.enabled: true`` (503 with that reason otherwise; ``/types`` and ``/backends`` always
answer).

Handlers are ``async``: they run on the daemon's event loop, the same thread as the endpoint
server, so the endpoint service is never touched from two threads. Workload runs, which can
take seconds, go to a worker thread on a backend of their own.

Workloads on a *simulated* GPU replay on a fresh simulator instance of that GPU's type and
sharing mode, so results are reproducible and independent of the endpoint clients; on a real
GPU they run on the device.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from pydantic import Field, field_validator, model_validator

from symbiont.apimodel import StrictModel
from symbiont.errors import Invalid, Unavailable
from symbiont.gpu import backend as gb
from symbiont.gpu.backend import GpuError
from symbiont.gpu.faas import DROP_MODES, SCHEDULERS, Task, TraceError, parse_trace
from symbiont.gpu.manager import GpuManager
from symbiont.gpu.part import DISABLED
from symbiont.gpu.simulated import GPU_TYPES, SCHED_MODES

router = APIRouter(tags=["gpu"])

SchedulerName = Literal["fcfs", "rr", "edf", "edf-slice", "edf-slice-offline", "edf-slice-v1"]
DropMode = Literal["off", "certain", "estimated"]
SharingMode = Literal["spatial", "spatial-strict", "timeslice-best-effort", "timeslice-equal", "timeslice-fixed"]
assert set(SchedulerName.__args__) == set(SCHEDULERS)  # type: ignore[attr-defined]
assert set(DropMode.__args__) == set(DROP_MODES)  # type: ignore[attr-defined]
assert set(SharingMode.__args__) == set(SCHED_MODES)  # type: ignore[attr-defined]


ClientName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$", description="endpoint client")]


def _part_manager(request: Request) -> GpuManager | None:
    part = getattr(request.app.state, "parts", {}).get("gpu")
    return getattr(part, "manager", None)


def _mgr(request: Request) -> GpuManager:
    """The running part's manager; 503 with the reason when the part is off."""
    mgr = _part_manager(request)
    if mgr is None:
        raise Unavailable(DISABLED)
    return mgr


# -- models --------------------------------------------------------------------------------------------
class GpuRegistration(StrictModel):
    kind: Literal["simulated", "cupy"] = "simulated"
    type: str | None = Field(None, description="simulated GPU type: " + ", ".join(GPU_TYPES))
    index: int | None = Field(None, ge=0, description="CUDA device index (kind=cupy)")
    server: str = Field("server0", min_length=1, max_length=64)
    sharing: SharingMode = "spatial"

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str | None) -> str | None:
        if v is None:
            return v
        for k in GPU_TYPES:
            if k.lower() == v.strip().lower():
                return k
        raise ValueError(f"unknown GPU type {v!r}; known: {', '.join(GPU_TYPES)}")

    @model_validator(mode="after")
    def _consistent(self) -> GpuRegistration:
        if self.kind == "simulated" and self.type is None:
            raise ValueError("a simulated GPU needs a 'type'")
        if self.kind == "cupy" and self.index is None:
            raise ValueError("a real GPU needs a CUDA device 'index'")
        return self


class QuotaRequest(StrictModel):
    gpu: str | None = Field(None, description="GPU id (required when the client is new)")
    sm_share: float | None = Field(None, gt=0.0, le=1.0)
    mem_bytes: int | None = Field(None, gt=0)
    critical: bool | None = None


class MigrateRequest(StrictModel):
    gpu: str


class TaskIn(StrictModel):
    task: str | None = Field(None, max_length=64)
    function: str = Field("fn", max_length=64)
    arrival_ms: float = Field(ge=0)
    deadline_ms: float = Field(gt=0, description="relative to the arrival")
    gflop: float = Field(gt=0, le=1e6)
    blocks: int = Field(4096, ge=1, le=2**24)


class WorkloadRequest(StrictModel):
    gpu: str
    scheduler: SchedulerName = "edf-slice"
    drop: DropMode | None = None
    share: float = Field(1.0, gt=0.0, le=1.0)
    trace_csv: str | None = Field(None, max_length=5_000_000)
    tasks: list[TaskIn] | None = Field(None, max_length=20_000)
    background_vms: int = Field(0, ge=0, le=64)
    duty: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> WorkloadRequest:
        if (self.trace_csv is None) == (self.tasks is None):
            raise ValueError("give exactly one of 'trace_csv' and 'tasks'")
        return self


# -- routes ----------------------------------------------------------------------------------------------
@router.get("/types")
async def list_types() -> list[dict[str, Any]]:
    return [t.as_dict() for t in GPU_TYPES.values()]


@router.get("/backends")
async def list_backends(request: Request) -> dict[str, Any]:
    ok, why = gb.cupy_status()
    mgr = _part_manager(request)
    return {"cupy": {"available": ok, "reason": why}, "simulated": {"available": True},
            "enabled": mgr is not None, "selected": mgr.backend_name if mgr else None,
            "endpoint_socket": str(mgr.server.path) if mgr and mgr.server else None}  # fmt: skip


@router.post("/gpus", status_code=201)
async def register_gpu(req: GpuRegistration, request: Request) -> dict[str, Any]:
    mgr = _mgr(request)
    spec = {"type": req.type, "server": req.server, "sharing": req.sharing} if req.kind == "simulated" else {
        "index": req.index}  # fmt: skip
    return mgr.register_gpu(req.kind, spec)


@router.get("/gpus")
async def list_gpus(request: Request) -> list[dict[str, Any]]:
    mgr = _mgr(request)
    return [mgr.gpu_view(g) for g in mgr.gpus.values()]


@router.get("/gpus/{gpu_id}")
async def get_gpu(gpu_id: str, request: Request) -> dict[str, Any]:
    mgr = _mgr(request)
    g = mgr.gpu(gpu_id)
    return {**mgr.gpu_view(g), "clients": mgr.clients_on(g)}


@router.put("/clients/{name}")
async def set_client_quota(name: ClientName, req: QuotaRequest, request: Request) -> dict[str, Any]:
    """Create a client with its quotas, or change them (a share change is a vertical scaling)."""
    return _mgr(request).set_client(name, req.gpu, req.sm_share, req.mem_bytes, req.critical)


@router.get("/clients")
async def list_clients(request: Request) -> list[dict[str, Any]]:
    return _mgr(request).list_clients()


@router.get("/clients/{name}")
async def get_client(name: ClientName, request: Request) -> dict[str, Any]:
    return _mgr(request).client_view(name)


@router.delete("/clients/{name}")
async def delete_client(name: ClientName, request: Request) -> dict[str, Any]:
    _mgr(request).delete_client(name)
    return {"deleted": name}


@router.post("/clients/{name}/migrate")
async def migrate_client(name: ClientName, req: MigrateRequest, request: Request) -> dict[str, Any]:
    """Horizontal scaling: move the client's endpoint and buffers to another GPU."""
    return await _mgr(request).migrate(name, req.gpu)


def _tasks(req: WorkloadRequest) -> list[Task]:
    try:
        if req.trace_csv is not None:
            return parse_trace(req.trace_csv)
        out: dict[str, Task] = {}
        for i, t in enumerate(req.tasks or [], start=1):
            tid = t.task or f"t{i}"
            if tid in out:
                raise TraceError(f"task {i}: duplicate task id {tid!r}")
            a = t.arrival_ms / 1e3
            out[tid] = Task(tid, t.function, a, a + t.deadline_ms / 1e3, t.blocks, t.gflop * 1e9 / t.blocks)
        if not out:
            raise TraceError("no tasks")
        return sorted(out.values(), key=lambda t: (t.arrival, t.id))
    except TraceError as exc:
        raise Invalid(f"bad trace: {exc}") from None


@router.post("/workloads", status_code=201)
async def submit_workload(req: WorkloadRequest, request: Request) -> dict[str, Any]:
    """Run a FaaS workload to completion; its results are kept in sqlite."""
    mgr = _mgr(request)
    mgr.gpu(req.gpu)  # 404 before parsing a large trace
    tasks = _tasks(req)
    params = {"scheduler": req.scheduler, "drop": req.drop, "share": req.share, "background_vms": req.background_vms,
              "duty": req.duty, "seed": req.seed, "source": "trace_csv" if req.trace_csv is not None else "tasks",
              "n_tasks": len(tasks)}  # fmt: skip
    wid, g = mgr.workload_start(req.gpu, params)
    try:
        backend, device = mgr.workload_backend(g, req.seed)
        r = await asyncio.to_thread(mgr.run_workload, backend, device, tasks, params)
    except (GpuError, ValueError) as exc:
        mgr.workload_failed(wid)
        raise Invalid(f"workload failed: {exc}") from None
    except BaseException:
        mgr.workload_failed(wid)
        raise
    return mgr.workload_done(wid, g, params, r)


@router.get("/workloads")
async def list_workloads(request: Request) -> list[dict[str, Any]]:
    return _mgr(request).workloads()


@router.get("/workloads/{workload_id}")
async def get_workload(workload_id: str, request: Request) -> dict[str, Any]:
    return _mgr(request).workload(workload_id)
