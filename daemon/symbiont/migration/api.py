"""HTTP API of the migration part, mounted by the daemon under ``/v1/migration``.

* ``POST /v1/migration`` ``{vm, ct, to, path, channel, rate, ...}``: start (202 with the journal entry);
  the migration runs in the background, ``GET /v1/migration/{id}`` follows it.
* ``GET /v1/migration``: the journal, newest first; ``GET /v1/migration/{id}``: one entry with
  its phase, timings (pre-dump, dump, transfer, restore, downtime), bytes and host CPU.
* ``POST /v1/migration/recover``: resolve unfinished entries now (the daemon also does it
  every period).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from pydantic import Field

from symbiont.apimodel import StrictModel
from symbiont.errors import Invalid
from symbiont.migration.controller import MigrationController

router = APIRouter(tags=["migration"])

VM_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
MigId = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,47}$", description="migration id")]


class MigrationSpec(StrictModel):
    """One container migration."""
    vm: str = Field(pattern=VM_PATTERN, description="source VM")
    ct: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$", description="container name")
    to: str = Field(pattern=VM_PATTERN, description="destination VM")
    path: Literal["relay", "network"] = Field("relay", description="hypervisor relay or guest network")
    rate: Literal["adaptive", "fixed"] = Field("adaptive", description="relay send pacing")
    channel: Literal["serial", "shm"] | None = Field(
        None, description="relay data channel (relay path only; default shm): shm (a region per VM, ivshmem-plain, "
        "one host copy; falls back to serial when a region cannot be had) or serial (frames over virtio-serial)")
    predumps: int = Field(4, ge=0, le=8, description="at most this many pre-copy iterations while the container "
                          "runs (fewer once the dirty set is below converge_kib or stops shrinking)")
    converge_kib: int = Field(1024, ge=0, le=1 << 20, description="pre-copy stops once a pre-dump is this small")
    rate_mbps: float = Field(64.0, gt=0.01, le=100_000, description="fixed rate; initial bandwidth estimate")
    window_kib: int = Field(16384, ge=64, le=1 << 20, description="relay window (the send buffer)")
    chunk_kib: int = Field(4096, ge=4, le=16320, description="bytes per relayed frame (up to the protocol's 16 MiB)")
    ip: str | None = Field(None, pattern=r"^10\.211\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$",
                           description="the container's own address on the guest link: moves with it "
                           "(servers with established TCP connections)")
    lazy: bool = Field(False, description="restore with CRIU lazy pages: the container runs before its memory is "
                       "back (faulted in through userfaultfd from the received images); meant to keep the freeze "
                       "from growing with its size, measured slower under TCG (BENCHMARKS.md, fifth round)")
    fault: Literal["corrupt", "truncate"] | None = Field(
        None, description="testing: damage the relayed stream"
    )


def ctl(request: Request) -> MigrationController:
    return request.app.state.parts["migration"].ctl  # type: ignore[no-any-return]


@router.post("", status_code=202)
async def start_migration(body: MigrationSpec, request: Request) -> dict[str, Any]:
    if body.chunk_kib > body.window_kib:
        raise Invalid("chunk_kib must not exceed window_kib")
    return await ctl(request).start(
        body.vm, body.ct, body.to, path=body.path, mode=body.rate, predumps=body.predumps,
        rate_bps=body.rate_mbps * 1e6 / 8, window=body.window_kib << 10, chunk=body.chunk_kib << 10,
        fault=body.fault, converge=body.converge_kib << 10, ip=body.ip, channel=body.channel,
        lazy=body.lazy,
    )  # fmt: skip


@router.get("")
async def list_migrations(request: Request) -> dict[str, Any]:
    c = ctl(request)
    return {"migrations": [{**m, "running": m["id"] in c.tasks} for m in c.journal.list()]}


@router.post("/recover")
async def recover(request: Request) -> dict[str, Any]:
    return {"recovered": await ctl(request).recover()}


@router.get("/{mid}")
async def show_migration(mid: MigId, request: Request) -> dict[str, Any]:
    return ctl(request).show(mid)
