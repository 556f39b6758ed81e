"""HTTP API of the GPU part, mounted by the daemon under ``/v1/gpu``.

Register GPUs (simulated presets or real CUDA devices), set client quotas on the endpoint
service (a share change is a vertical scaling, measured), migrate clients, submit FaaS
workloads from a trace and read their results. State is in memory (:data:`MANAGER`); GPU
registrations are cheap to redo after a restart and workload results are also written by the
experiments as CSV.

Workloads on a *simulated* GPU replay on a fresh simulator instance of that GPU's type and
sharing mode, so results are reproducible and independent of the endpoint clients; on a real
GPU they run on the device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field, field_validator, model_validator

from symbiont.gpu import metrics
from symbiont.gpu.backend import GpuBackend, GpuError, cupy_status
from symbiont.gpu.endpoint import EndpointError, GpuEndpointService
from symbiont.gpu.faas import DROP_MODES, SCHEDULERS, BackgroundLoad, Task, TraceError, parse_trace, run_trace
from symbiont.gpu.simulated import GPU_TYPES, SCHED_MODES, DeviceConfig, SimulatedBackend

router = APIRouter(tags=["gpu"])

SchedulerName = Literal["fcfs", "rr", "edf", "edf-slice", "edf-slice-offline"]
DropMode = Literal["off", "certain", "estimated"]
SharingMode = Literal["spatial", "spatial-strict", "timeslice-best-effort", "timeslice-equal", "timeslice-fixed"]
assert set(SchedulerName.__args__) == set(SCHEDULERS)  # type: ignore[attr-defined]
assert set(DropMode.__args__) == set(DROP_MODES)  # type: ignore[attr-defined]
assert set(SharingMode.__args__) == set(SCHED_MODES)  # type: ignore[attr-defined]


@dataclass
class RegisteredGpu:
    id: str
    kind: str  # simulated | cupy
    backend: GpuBackend
    index: int
    config: DeviceConfig | None = None

    def as_dict(self) -> dict[str, Any]:
        info = self.backend.devices()[self.index]
        return {"id": self.id, "kind": self.kind, **info.as_dict()}


@dataclass
class GpuManager:
    """All GPU state behind the API; one lock because handlers run in a thread pool."""

    gpus: dict[str, RegisteredGpu] = field(default_factory=dict)
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _sim: SimulatedBackend | None = None
    _cupy: GpuBackend | None = None
    _endpoints: dict[str, GpuEndpointService] = field(default_factory=dict)
    _next_gpu: int = 0
    _next_workload: int = 0

    def sim(self) -> SimulatedBackend:
        if self._sim is None:
            self._sim = SimulatedBackend(devices=())
        return self._sim

    def cupy(self) -> GpuBackend:
        if self._cupy is None:
            ok, why = cupy_status()
            if not ok:
                raise HTTPException(409, f"no real GPU here: {why}")
            from symbiont.gpu.cupy_backend import CupyBackend

            self._cupy = CupyBackend()
        return self._cupy

    def endpoint(self, g: RegisteredGpu) -> GpuEndpointService:
        svc = self._endpoints.get(g.kind)
        if svc is None:
            svc = self._endpoints[g.kind] = GpuEndpointService(g.backend)
        return svc

    def gpu(self, gpu_id: str) -> RegisteredGpu:
        g = self.gpus.get(gpu_id)
        if g is None:
            raise HTTPException(404, f"unknown GPU {gpu_id!r}")
        return g

    def client_gpu(self, name: str) -> tuple[GpuEndpointService, RegisteredGpu]:
        for svc in self._endpoints.values():
            c = svc.clients.get(name)
            if c is not None:
                g = next(g for g in self.gpus.values() if g.backend is svc.backend and g.index == c.device)
                return svc, g
        raise HTTPException(404, f"unknown client {name!r}")

    def reset(self) -> None:
        """Forget everything (tests)."""
        with self.lock:
            self.gpus.clear()
            self.workloads.clear()
            self._endpoints.clear()
            self._sim = None
            self._next_gpu = 0
            self._next_workload = 0


MANAGER = GpuManager()


# -- models --------------------------------------------------------------------------------------------
class GpuRegistration(BaseModel):
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


class QuotaRequest(BaseModel):
    gpu: str | None = Field(None, description="GPU id (required when the client is new)")
    sm_share: float | None = Field(None, gt=0.0, le=1.0)
    mem_bytes: int | None = Field(None, gt=0)
    critical: bool | None = None


class MigrateRequest(BaseModel):
    gpu: str


class TaskIn(BaseModel):
    task: str | None = Field(None, max_length=64)
    function: str = Field("fn", max_length=64)
    arrival_ms: float = Field(ge=0)
    deadline_ms: float = Field(gt=0, description="relative to the arrival")
    gflop: float = Field(gt=0, le=1e6)
    blocks: int = Field(4096, ge=1, le=2**24)


class WorkloadRequest(BaseModel):
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
def list_types() -> list[dict[str, Any]]:
    return [t.as_dict() for t in GPU_TYPES.values()]


@router.get("/backends")
def list_backends() -> dict[str, Any]:
    ok, why = cupy_status()
    return {"cupy": {"available": ok, "reason": why}, "simulated": {"available": True}}


@router.post("/gpus", status_code=201)
def register_gpu(req: GpuRegistration) -> dict[str, Any]:
    with MANAGER.lock:
        if req.kind == "simulated":
            cfg = DeviceConfig(req.type or "A100", server=req.server, sched=req.sharing)
            b: GpuBackend = MANAGER.sim()
            index = MANAGER.sim().add_device(cfg)
        else:
            b = MANAGER.cupy()
            cfg = None
            index = int(req.index or 0)
            if index >= len(b.devices()):
                raise HTTPException(404, f"no CUDA device {index} (have {len(b.devices())})")
            if any(g.kind == "cupy" and g.index == index for g in MANAGER.gpus.values()):
                raise HTTPException(409, f"CUDA device {index} is already registered")
        gid = f"gpu{MANAGER._next_gpu}"
        MANAGER._next_gpu += 1
        g = RegisteredGpu(gid, req.kind, b, index, cfg)
        MANAGER.gpus[gid] = g
        metrics.DEVICES.labels(req.kind, b.devices()[index].gpu_type.name).inc()
        return g.as_dict()


@router.get("/gpus")
def list_gpus() -> list[dict[str, Any]]:
    with MANAGER.lock:
        return [g.as_dict() for g in MANAGER.gpus.values()]


@router.get("/gpus/{gpu_id}")
def get_gpu(gpu_id: str) -> dict[str, Any]:
    with MANAGER.lock:
        g = MANAGER.gpu(gpu_id)
        svc = MANAGER._endpoints.get(g.kind)
        clients = [c.info() for c in svc.clients.values() if c.device == g.index] if svc else []
        return {**g.as_dict(), "clients": clients}


def _endpoint_error(exc: EndpointError) -> HTTPException:
    status = {"unknown_client": 404, "unknown_device": 404, "exists": 409, "over_capacity": 409,
              "out_of_memory": 409}.get(exc.code, 422)  # fmt: skip
    return HTTPException(status, f"{exc.code}: {exc.message}")


@router.put("/clients/{name}")
def set_client_quota(name: str, req: QuotaRequest) -> dict[str, Any]:
    """Create a client with its quotas, or change them (a share change is a vertical scaling)."""
    with MANAGER.lock:
        try:
            existing = any(name in svc.clients for svc in MANAGER._endpoints.values())
            if not existing:
                if req.gpu is None:
                    raise HTTPException(422, "a new client needs 'gpu'")
                g = MANAGER.gpu(req.gpu)
                svc = MANAGER.endpoint(g)
                c = svc.register_client(name, g.index, req.sm_share if req.sm_share is not None else 1.0,
                                        req.mem_bytes if req.mem_bytes is not None else 2**30,
                                        bool(req.critical))  # fmt: skip
                return {"created": True, "client": c.info(), "scale": None}
            svc, g = MANAGER.client_gpu(name)
            if req.gpu is not None and req.gpu != g.id:
                raise HTTPException(422, f"client {name!r} is on {g.id}; use POST /clients/{name}/migrate to move it")
            res = svc.set_quota(name, req.sm_share, req.mem_bytes, req.critical)
            return {"created": False, "client": svc.clients[name].info(), "scale": res.as_dict() if res else None}
        except EndpointError as exc:
            raise _endpoint_error(exc) from None


@router.get("/clients")
def list_clients() -> list[dict[str, Any]]:
    with MANAGER.lock:
        return [c.info() for svc in MANAGER._endpoints.values() for c in svc.clients.values()]


@router.get("/clients/{name}")
def get_client(name: str) -> dict[str, Any]:
    with MANAGER.lock:
        svc, g = MANAGER.client_gpu(name)
        st = svc.scale_status(name)
        return {**svc.clients[name].info(), "gpu": g.id, "last_scale": st.as_dict() if st else None}


@router.delete("/clients/{name}", status_code=204)
def delete_client(name: str) -> None:
    with MANAGER.lock:
        svc, _ = MANAGER.client_gpu(name)
        svc.remove_client(name)


@router.post("/clients/{name}/migrate")
def migrate_client(name: str, req: MigrateRequest) -> dict[str, Any]:
    """Horizontal scaling: move the client's endpoint and buffers to another GPU."""
    with MANAGER.lock:
        svc, _ = MANAGER.client_gpu(name)
        dst = MANAGER.gpu(req.gpu)
        if dst.backend is not svc.backend:
            raise HTTPException(422, "migration between a simulated and a real GPU is not possible")
        try:
            return svc.migrate(name, dst.index).as_dict()
        except EndpointError as exc:
            raise _endpoint_error(exc) from None


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
        raise HTTPException(422, f"bad trace: {exc}") from None


@router.post("/workloads", status_code=201)
def submit_workload(req: WorkloadRequest) -> dict[str, Any]:
    """Run a FaaS workload to completion and keep its results."""
    with MANAGER.lock:
        g = MANAGER.gpu(req.gpu)
        tasks = _tasks(req)
        if g.kind == "simulated" and g.config is not None:
            backend: GpuBackend = SimulatedBackend([g.config], seed=req.seed)
            device = 0
        else:
            backend, device = g.backend, g.index
        bg = BackgroundLoad(vms=req.background_vms, duty=req.duty, seed=req.seed + 1) if req.background_vms else None
        try:
            r = run_trace(backend, tasks, req.scheduler, device=device, share=req.share, drop=req.drop, background=bg)
        except (GpuError, ValueError) as exc:
            raise HTTPException(422, f"workload failed: {exc}") from None
        wid = f"w{MANAGER._next_workload}"
        MANAGER._next_workload += 1
        summary = r.summary()
        MANAGER.workloads[wid] = {"id": wid, "gpu": g.id, "summary": summary, "tasks": r.rows}
        for outcome, n in (("met", r.met), ("missed", r.missed), ("dropped", r.dropped)):
            metrics.FAAS_TASKS.labels(r.scheduler, outcome).inc(n)
        metrics.FAAS_WASTED_GFLOP.labels(r.scheduler).inc(r.wasted_gflop)
        return {"id": wid, "gpu": g.id, "summary": summary}


@router.get("/workloads")
def list_workloads() -> list[dict[str, Any]]:
    with MANAGER.lock:
        return [{"id": w["id"], "gpu": w["gpu"], "summary": w["summary"]} for w in MANAGER.workloads.values()]


@router.get("/workloads/{workload_id}")
def get_workload(workload_id: str) -> dict[str, Any]:
    with MANAGER.lock:
        w = MANAGER.workloads.get(workload_id)
        if w is None:
            raise HTTPException(404, f"unknown workload {workload_id!r}")
        return w
