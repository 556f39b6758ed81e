"""The HTTP+JSON API (FastAPI), served on the daemon's unix socket.

Thin over :class:`symbiont.daemon.Daemon`: request bodies are pydantic models (a bad body
is a 422 naming the field), daemon errors map to 4xx/5xx with a ``detail`` reason, and no
handler changes state before its input has been validated. Parts mount their own routers
under ``/v1/<part>`` (see :mod:`symbiont.plugins`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import Field, model_validator

from symbiont import __version__
from symbiont.apimodel import JsonObject, StrictModel, json_safe
from symbiont.bodylimit import BodyLimit
from symbiont.errors import DaemonError, NotFound
from symbiont.plugins import part_modules

if TYPE_CHECKING:  # the daemon imports this module (serve); no import back at run time
    from symbiont.daemon import Daemon

log = logging.getLogger("symbiontd.api")

VmName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$", description="libvirt domain name")]


class MemoryPolicy(StrictModel):
    """ESX-style memory policy parameters (used by the memory part)."""

    shares: int = Field(1000, ge=1, le=1_000_000, description="proportional-share weight")
    min_mib: int | None = Field(None, ge=64, le=1 << 22, description="never balloon below this")
    max_mib: int | None = Field(None, ge=64, le=1 << 22, description="never give more than this")
    tax_rate: float | None = Field(None, ge=0.0, lt=1.0, description="idle-memory tax τ (default: config)")

    @model_validator(mode="after")
    def _range(self) -> MemoryPolicy:
        if self.min_mib is not None and self.max_mib is not None and self.min_mib > self.max_mib:
            raise ValueError(f"min_mib {self.min_mib} exceeds max_mib {self.max_mib}")
        return self


class CpuPolicy(StrictModel):
    min_vcpus: int | None = Field(None, ge=1, le=1024)
    max_vcpus: int | None = Field(None, ge=1, le=1024)
    weight: int = Field(100, ge=1, le=10_000, description="cgroup v2 cpu.weight-style share")

    @model_validator(mode="after")
    def _range(self) -> CpuPolicy:
        if self.min_vcpus is not None and self.max_vcpus is not None and self.min_vcpus > self.max_vcpus:
            raise ValueError(f"min_vcpus {self.min_vcpus} exceeds max_vcpus {self.max_vcpus}")
        return self


class Registration(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$", description="libvirt domain name")
    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)
    cpu: CpuPolicy = Field(default_factory=CpuPolicy)
    # Stored with the registration and served back: bounded in depth and size (apimodel).
    extra: JsonObject = Field(default_factory=dict, description="parameters of later parts, by part name")


class MemoryTarget(StrictModel):
    target_mib: int = Field(ge=64, le=1 << 22, description="balloon target: memory the guest keeps")


class VcpuTarget(StrictModel):
    count: int = Field(ge=1, le=1024, description="live vCPU count")


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(
        title="symbiontd",
        version=__version__,
        description="Symbiotic resource management: the host decides how much, the guest decides what.",
    )
    app.state.parts = daemon.parts  # a part's handlers reach it as request.app.state.parts[name]
    app.add_middleware(BodyLimit)  # every route: a body over 1 MiB is a 413 before any handler runs

    @app.exception_handler(DaemonError)
    async def _daemon_error(_req: Request, exc: DaemonError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input verbatim, and a NaN or a deeply nested
        # input then fails to render: the 422 became a 500. Echo a bounded, JSON-safe copy.
        detail = [
            {"type": e.get("type"), "loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
             "input": json_safe(e.get("input"), max_depth=4, max_str=256)}
            for e in exc.errors()[:50]
        ]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: still a 500 (the fuzz test counts these), but with a reason.
        log.error("%s %s failed", req.method, req.url.path, exc_info=exc)
        return JSONResponse(status_code=500,
                            content={"detail": f"internal error: {type(exc).__name__}: {str(exc)[:500]}"})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "loop_iterations": daemon.loop_iterations}

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return daemon.status()

    @app.get("/v1/vms")
    async def list_vms() -> list[dict[str, Any]]:
        # A view holds what a guest sent (its hello): one bad VM must not break the list.
        out = []
        for rec in daemon.store.list_vms():
            try:
                out.append(json_safe(daemon.vm_view(rec.name)))
            except Exception as exc:
                log.warning("vm %s: view failed, listed with the error: %s", rec.name, exc, exc_info=True)
                out.append({"name": rec.name, "uuid": rec.uuid, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        return out

    @app.post("/v1/vms", status_code=201)
    async def register(body: Registration) -> dict[str, Any]:
        policy = body.model_dump(exclude={"name"})
        return json_safe(await daemon.register(body.name, policy))

    @app.get("/v1/vms/{name}")
    async def show(name: VmName) -> dict[str, Any]:
        return json_safe(daemon.vm_view(name))

    @app.delete("/v1/vms/{name}")
    async def unregister(name: VmName) -> dict[str, Any]:
        await daemon.unregister(name)
        return {"unregistered": name}

    @app.put("/v1/vms/{name}/memory")
    async def set_memory(name: VmName, body: MemoryTarget) -> dict[str, Any]:
        return await daemon.parts["memory"].set_balloon(name, body.target_mib)  # type: ignore[attr-defined]

    @app.put("/v1/vms/{name}/vcpus")
    async def set_vcpus(name: VmName, body: VcpuTarget) -> dict[str, Any]:
        # The cpu part's scaling (its one vCPU implementation), answered in the core's shape.
        res = await daemon.parts["cpu"].scale(name, body.count, reason="api")  # type: ignore[attr-defined]
        before = res["before"]["guest_online"] or res["before"]["libvirt"]
        return {"vm": name, "before": before, "vcpus": body.count, "guest": res.get("guest"),
                "mechanism": res["mechanism"]}

    @app.post("/v1/vms/{name}/ping")
    async def ping(name: VmName) -> dict[str, Any]:
        """An agent ``core.ping``, waking the VM first if the paging part parked it (issue 15)."""
        return await daemon.parts["paging"].ping(name)  # type: ignore[attr-defined]

    @app.get("/v1/vms/{name}/history")
    async def history(
        name: VmName,
        source: Annotated[str, Query(pattern="^(agent|libvirt)$")] = "agent",
        since: Annotated[float, Query(ge=0)] = 0.0,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    ) -> list[dict[str, Any]]:
        if daemon.store.get_vm(name) is None:
            raise NotFound(f"VM {name!r} is not registered")
        return [{"ts": ts, **data} for ts, data in daemon.store.history(name, source, since, limit)]

    @app.get("/v1/decisions")
    async def decisions(
        vm: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 100
    ) -> list[dict[str, Any]]:
        return daemon.store.decisions(vm, limit)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    for part, mod in part_modules("api").items():
        router = getattr(mod, "router", None)
        if router is not None:
            app.include_router(router, prefix=f"/v1/{part}", tags=[part])
    return app
