"""API of the paging part (mounted at /v1/paging): the swap tier, page-out, park and wake.

* ``GET /v1/paging``: the tier (size, used, compressed) and per VM its RSS, swap, guest RAM
  and TCG code cache apart, parked or not;
* ``GET /v1/paging/memory``: per VM where its memory is, each MiB once (``symbiont status``);
* ``PUT /v1/paging/policy`` ``{"idle_park": true, "idle_after_s": 5, "idle_cpu_pct": 10}``: the
  idle policy for this run of the daemon;
* ``POST /v1/paging/vms/{vm}/pageout`` ``{"mib": N}`` (optional: the host's own target
  otherwise): page out cold guest memory, the guest choosing which pages;
* ``POST /v1/paging/vms/{vm}/park``, ``POST /v1/paging/vms/{vm}/wake?prefetch=true|false&mode=touch|willneed``.

Bad input is a 4xx with the reason (422 body/range, 404 unknown VM, 409 no tier / wrong
state); nothing changes before the input is validated.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import Field

from symbiont.apimodel import StrictModel
from symbiont.paging.part import PagingPart

router = APIRouter(tags=["paging"])


def _part(request: Request) -> PagingPart:
    return request.app.state.parts["paging"]  # type: ignore[no-any-return]
VmName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$", description="libvirt domain name")]


class IdlePolicy(StrictModel):
    """The idle policy's keys (``paging.idle_*``), changed for this run of the daemon."""

    idle_park: bool | None = None
    idle_after_s: float | None = Field(None, ge=1.0, le=365 * 86400.0)
    idle_cpu_pct: float | None = Field(None, gt=0.0, le=100.0)


class PageoutBody(StrictModel):
    mib: int | None = Field(None, ge=1, le=1 << 22, description="MiB to page out; default: resident − (WSS + margin)")


@router.get("")
async def show(request: Request) -> dict[str, Any]:
    return _part(request).view()


@router.get("/memory")
async def memory(request: Request) -> dict[str, Any]:
    """Per VM: each MiB of its configured memory in one place (ballooned, paged out, KSM-shared,
    private, untouched), QEMU's overhead, its host footprint, and the last lever that moved."""
    part = _part(request)
    return await part.ctx.blocking(part.memory_status)  # type: ignore[no-any-return]


@router.put("/policy")
async def set_policy(body: IdlePolicy, request: Request) -> dict[str, Any]:
    """Turn idle parking on/off or change its window and threshold (this run only; the config
    keys ``paging.idle_park``/``idle_after_s``/``idle_cpu_pct`` are the lasting way)."""
    return _part(request).set_policy(body.model_dump(exclude_none=True))


@router.post("/vms/{vm}/pageout")
async def pageout(vm: VmName, request: Request, body: PageoutBody | None = None) -> dict[str, Any]:
    return await _part(request).pageout_vm(vm, None if body is None else body.mib)


@router.post("/vms/{vm}/park")
async def park(vm: VmName, request: Request) -> dict[str, Any]:
    return await _part(request).park(vm)


@router.post("/vms/{vm}/wake")
async def wake(vm: VmName, request: Request, prefetch: Annotated[bool, Query()] = True,
               mode: Annotated[Literal["touch", "willneed"] | None, Query()] = None) -> dict[str, Any]:
    """``mode``: how to prefetch (default: ``paging.prefetch``): touch faults the pages in and
    maps them; willneed reads them into the swap cache only."""
    return await _part(request).wake(vm, prefetch=prefetch, mode=mode)
