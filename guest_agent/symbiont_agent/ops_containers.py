"""Agent operations for containers, nesting-aware CPU ratios and memory reclamation.

``cpu.container-create``/``-list``/``-show``/``-start``/``-stop``/``-destroy``/``-set``/
``-logs`` manage containers (old names ``ct-*``, kept as aliases: ``ops_schema``);
``cpu.container-mode`` switches between nesting-aware and agnostic management;
``cpu.container-rebalance`` applies the CPU ratio plan now; ``cpu.container-reclaim`` frees
memory from containers in proportion to their shares before the host inflates the balloon,
and ``cpu.container-release`` lifts that again; ``cpu.container-protect`` refreshes the
no-reclaim containers' ``memory.min`` (the daemon asks every period). All of it lives in
:mod:`symbiont_agent.containers`; :func:`reclaim_by_shares`, :func:`refresh_protection` and
:func:`release_holds` serve the other agent parts (the memory part's ``memory.balloon-prepare``).

``cpu.online`` (the agent's vCPU onlining, old name ``online-cpus``) is extended here: after
it onlines or offlines CPUs, the containers' CPU plan is re-applied at once, so the configured
ratios are in force by the time the host's scale request returns.
"""

from __future__ import annotations

import logging
from typing import Any

from symbiont_agent import agent
from symbiont_agent.agent import op
from symbiont_agent.containers import ContainerManager

log = logging.getLogger("symbiont-agent.containers")

MANAGER = ContainerManager()


def _name(args: dict[str, Any]) -> Any:
    return args.get("name")


@op("cpu.container-create")
def _create(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.create(args)


@op("cpu.container-list")
def _list(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.list()


@op("cpu.container-show")
def _show(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.show(_name(args))


@op("cpu.container-start")
def _start(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.start(_name(args))


@op("cpu.container-stop")
def _stop(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.stop(_name(args))


@op("cpu.container-destroy")
def _destroy(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.destroy(_name(args))


@op("cpu.container-set")
def _set(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.set_limits(_name(args), args.get("limits"))


@op("cpu.container-logs")
def _logs(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.logs(_name(args))


@op("cpu.container-mode")
def _mode(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.set_mode(args) if args else MANAGER.mode()


@op("cpu.container-rebalance")
def _rebalance(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    reason = args.get("reason", "request")
    if reason not in ("request", "cpus"):
        reason = "request"
    return MANAGER.rebalance(reason)


@op("cpu.container-reclaim")
def _reclaim(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.reclaim(args)


@op("cpu.container-release")
def _release(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.release()


@op("cpu.container-protect")
def _protect(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return MANAGER.protect()


def reclaim_by_shares(nbytes: int, hold: bool = False) -> dict[str, Any]:
    """For the other agent parts (the memory part's ``balloon-prepare``): free ``nbytes`` from
    containers in proportion to their shares, never from no-reclaim ones. The guest's free
    memory is not counted (the caller has done that). ``hold`` keeps each container's
    ``memory.high`` at its new size until :func:`release_holds`."""
    MANAGER.load()
    if not MANAGER.containers:
        return {"freed_bytes": 0, "skipped": "no containers"}
    res = MANAGER.reclaim({"bytes": int(nbytes), "use_free": False, "hold": hold})
    return {"freed_bytes": res["freed"], **res}


def refresh_protection() -> dict[str, Any]:
    """Bring the no-reclaim containers' ``memory.min`` up to date (call before a root-level reclaim)."""
    return MANAGER.protect()


def release_holds() -> dict[str, Any]:
    return MANAGER.release()


_base_online_cpus = agent.OPS.get("cpu.online")


@op("cpu.online")
def _online_cpus_keep_ratios(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The agent's ``online-cpus``, then the CPU plan for the new set of online CPUs."""
    assert _base_online_cpus is not None
    result = _base_online_cpus(args, payload)
    MANAGER.load()
    if MANAGER.containers and isinstance(result, dict):
        try:
            result["containers"] = MANAGER.rebalance("cpus")
        except Exception as exc:  # the CPU change itself succeeded: report, do not fail it
            log.exception("rebalancing containers after a CPU change failed")
            result["containers"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result
