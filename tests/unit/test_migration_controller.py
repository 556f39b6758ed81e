"""The controller's order of steps against scripted agents: pre-copy converges, a server's
address is fenced on the source before the freeze, up but fenced on the destination during
the restore and opened after it; an abort gives the address back before the source thaws."""

from __future__ import annotations

import asyncio
from typing import Any

from symbiont.daemon import Unavailable
from symbiont.migration.controller import MigrationController
from symbiont.state import StateStore

MiB = 1 << 20


class FakeDaemon:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.links: dict[str, Any] = {}

    def _require(self, vm: str) -> None:
        pass


def run(tmp_path, predump_sizes: list[int], fail: str | None = None, ip: str | None = "10.211.200.1"):
    calls: list[tuple[str, str, dict[str, Any]]] = []
    sizes = iter(predump_sizes)

    async def main() -> dict[str, Any]:
        ctl = MigrationController(FakeDaemon(StateStore(tmp_path / "s.db")))  # type: ignore[arg-type]

        async def agent(vm: str, op: str, args: dict[str, Any], timeout: float = 30.0, payload: bytes = b""):
            calls.append((vm, op, dict(args)))
            if op == fail:
                raise Unavailable(f"{vm}: {op} failed")
            if op == "mig-check":
                return {"init_pid": 5, "files": [], "memory_current": 1, "record": {"name": "web"}}
            if op == "mig-predump":
                return {"bytes": next(sizes)}
            if op == "mig-dump":
                return {"bytes": 300 << 10, "files": []}
            if op == "mig-status":
                return {"restored": True, "container": {"populated": True, "frozen": False}}
            return {"pid": 7}

        async def transfer(m: dict[str, Any], paths: list[str]) -> int:
            calls.append((m["vm"], "transfer", {"paths": paths}))
            return 1

        ctl.agent = agent  # type: ignore[method-assign]
        ctl._transfer = transfer  # type: ignore[method-assign]
        ctl.link = lambda vm: None  # type: ignore[assignment,method-assign,return-value]
        m = await ctl.start("vm1", "web", "vm2", predumps=8, converge=MiB, ip=ip)
        await ctl.tasks[m["id"]]
        return ctl.show(m["id"])

    return asyncio.run(main()), calls


def ops(calls: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, Any, Any]]:
    return [(vm, op, a.get("up"), a.get("fenced")) for vm, op, a in calls if op not in ("mig-status",)]


def test_precopy_converges_and_the_address_moves_fenced(tmp_path) -> None:
    m, calls = run(tmp_path, [40 * MiB, 6 * MiB, 700 << 10])
    assert m["phase"] == "done", m
    assert m["progress"]["predump_bytes"] == [40 * MiB, 6 * MiB, 700 << 10]
    assert m["progress"]["precopy_stop"] == "below-threshold" and m["progress"]["predumps"] == 3
    seq = ops(calls)
    i_fence, i_dump = seq.index(("vm1", "mig-addr", False, True)), seq.index(("vm1", "mig-dump", None, None))
    i_up, i_restore = seq.index(("vm2", "mig-addr", True, True)), seq.index(("vm2", "mig-restore", None, None))
    i_open, i_finish = seq.index(("vm2", "mig-addr", True, False)), seq.index(("vm1", "mig-finish", None, None))
    assert i_fence < i_dump < i_up < i_restore < i_open < i_finish, seq
    assert [op for _, op, *_ in seq].count("mig-predump") == 3


def test_precopy_stops_when_the_dirty_set_no_longer_shrinks(tmp_path) -> None:
    m, _ = run(tmp_path, [40 * MiB, 8 * MiB, 7 * MiB, 7 * MiB], ip=None)
    assert m["phase"] == "done" and m["progress"]["precopy_stop"] == "not-shrinking", m["progress"]
    assert m["progress"]["predumps"] == 3


def test_failed_restore_gives_the_address_back_before_the_source_thaws(tmp_path) -> None:
    m, calls = run(tmp_path, [40 * MiB, 500 << 10], fail="mig-restore")
    assert m["phase"] == "aborted", m
    seq = ops(calls)
    after = seq[seq.index(("vm2", "mig-restore", None, None)) + 1 :]
    assert after[:4] == [
        ("vm2", "mig-abort", None, None),
        ("vm2", "mig-addr", False, True),
        ("vm1", "mig-addr", True, False),
        ("vm1", "mig-resume", None, None),
    ], after
