"""The dedup part against the shared fakes (tests/fakes.py: FakeHost with KSM's sysfs as a dict,
a real sqlite store and knob ledger): observe → decide → act per period, KSM tunables turned
through the ledger (vm '') and restored by it — when the policy goes off (the VM that asked for
it is removed), when the daemon stops (in the kind's declared order: advisor_mode before
pages_to_scan, run last), and at the next start after a kill -9 — and the sharing estimate the
memory part reads through its declared dependency."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from symbiont.dedup.part import KIND, DedupPart
from symbiont.dedup.service import Mode
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.host.ksm import PAGE_SIZE
from tests.fakes import Env

KSM = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0, "max_page_sharing": 256,
       "advisor_mode": "none", "advisor_target_scan_time": 200, "advisor_max_cpu": 70,
       "advisor_min_pages_to_scan": 500, "advisor_max_pages_to_scan": 30000,
       "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0, "pages_volatile": 0, "full_scans": 3}  # fmt: skip
MIB = 1 << 20


def _env(tmp_path: Path, host: FakeHost | None = None) -> tuple[Env, DedupPart]:
    host = host or FakeHost(ksm=dict(KSM))
    env = Env(tmp_path, host=host)
    return env, env.add(DedupPart)  # type: ignore[return-value]


def _vm(env: Env, name: str, policy: dict[str, Any] | None = None, merged_pages: int = 0) -> None:
    dom = FakeDomain(name, qemu_pid=1000 + len(env.host.domains),
                     guest_ram={"start": 0x7F0000000000, "end": 0x7F0000000000 + 512 * MIB, "mergeable": True},
                     resident_bytes=256 * MIB, ksm_stat={"ksm_merging_pages": merged_pages, "ksm_rmap_items": 10})
    env.register(name, policy or {}, domain=dom)


def _ksm_writes(env: Env) -> list[tuple[str, Any]]:
    return [(c[1], c[2]) for c in env.host.calls if c[0] == "ksm_write"]


async def _stop(env: Env, part: DedupPart) -> None:
    """The daemon stopping: the parts, then the ledger restores host-wide knobs."""
    await part.stop()
    await env.knobs.restore(vm="", reason="daemon stopping")


def test_off_observes_only_and_gives_memory_its_sharing_estimate(tmp_path: Path) -> None:
    env, part = _env(tmp_path)
    _vm(env, "vm1", merged_pages=64 * MIB // PAGE_SIZE)  # 64 MiB of its 256 MiB resident merged

    async def run() -> None:
        await env.start()
        p = await env.period()
        obs = p.observations["dedup"]
        assert obs.mode.policy == "off" and obs.vms["vm1"]["mergeable"] is True

    asyncio.run(run())
    assert _ksm_writes(env) == [] and env.knobs.rows() == []
    memory = env.ctx("memory", requires=("dedup",))  # the memory part's door: a declared dependency
    got = memory.peer("dedup").sharing("vm1")
    assert got["unshared_fraction"] == 0.75 and got["shared_bytes"] == 64 * MIB
    assert memory.peer("dedup").sharing("nope") is None
    env.close()


def test_a_registration_turns_ksm_through_the_ledger_and_its_removal_restores(tmp_path: Path) -> None:
    env, part = _env(tmp_path)
    _vm(env, "vm1", {"extra": {"dedup": {"policy": "stock"}}})

    async def run() -> None:
        await env.start()
        await env.period()
        row = env.knobs.get("", KIND, "run")
        assert row is not None and (row["original"], row["current"], row["part"]) == (0, 1, "dedup")
        assert env.host.ksm["run"] == 1
        await env.period()  # nothing more to change
        assert _ksm_writes(env) == [("run", 1)]
        env.store.remove_vm("vm1")
        await part.vm_removed("vm1")
        await env.period()  # nobody asks any more: off, and the ledger puts KSM back

    asyncio.run(run())
    assert env.host.ksm == KSM and env.knobs.rows() == []
    acts = [r["action"] for r in env.store.query("SELECT action FROM decisions WHERE part = 'dedup'")]
    assert acts[:1] == ["ksm-apply"] and "restore" in acts
    env.close()


def test_stop_restores_in_the_kinds_order_run_last(tmp_path: Path) -> None:
    env, part = _env(tmp_path)

    async def run() -> None:
        await env.start()
        await part.set_mode(Mode(policy="fixed", pages_to_scan=1234, sleep_millisecs=17, use_zero_pages=1))
        assert {k: env.host.ksm[k] for k in ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages")} == {
            "run": 1, "pages_to_scan": 1234, "sleep_millisecs": 17, "use_zero_pages": 1}
        assert part.status()["originals"] == {"pages_to_scan": 100, "sleep_millisecs": 20, "run": 0,
                                              "use_zero_pages": 0}
        env.host.calls.clear()
        await _stop(env, part)

    asyncio.run(run())
    writes = _ksm_writes(env)
    assert env.host.ksm == KSM and env.knobs.rows() == []
    assert writes[-1] == ("run", 0), writes  # ksmd restarts only once its parameters are back
    assert [k for k, _ in writes] == ["pages_to_scan", "sleep_millisecs", "use_zero_pages", "run"]
    env.close()


def test_advisor_knobs_come_back_after_a_kill_9_advisor_mode_first(tmp_path: Path) -> None:
    before = dict(KSM, pages_to_scan=250)  # not the 100 the kernel resets it to when the advisor goes off
    host = FakeHost(ksm=dict(before))
    env, part = _env(tmp_path, host)

    async def run() -> None:
        await env.start()
        await part.set_mode(Mode(policy="fixed", pages_to_scan=321, sleep_millisecs=20))
        await part.set_mode(Mode(policy="advisor", advisor={"target_scan_time": 57, "max_cpu": 33}))
        assert (host.ksm["advisor_mode"], host.ksm["advisor_target_scan_time"], host.ksm["advisor_max_cpu"]) == (
            "scan-time", 57, 33)

    asyncio.run(run())
    env.close()  # killed: nobody restored
    host.calls.clear()
    env2, part2 = _env(tmp_path, host)  # the next start puts everything back (the fake, like the
    asyncio.run(env2.start())  # kernel, refuses pages_to_scan while the advisor is on)
    assert host.ksm == before and env2.knobs.rows() == []
    keys = [k for k, _ in _ksm_writes(env2)]
    assert keys.index("advisor_mode") < keys.index("pages_to_scan") and keys[-1] == "run"
    rows = env2.store.query("SELECT inputs FROM decisions WHERE part = 'dedup' AND action = 'restore' ORDER BY id")
    first = json.loads(rows[0]["inputs"])  # the part's summary, logged before the ledger's per knob
    assert "previous run" in first["reason"] and first["originals"]["advisor_mode"] == "none"
    assert part2.api_mode is not None and part2.api_mode.policy == "advisor"  # the operator's policy resumes
    env2.close()


def test_busy_max_page_sharing_is_restored_by_unmerging_only_if_ksm_was_off(tmp_path: Path) -> None:
    env, part = _env(tmp_path)

    async def run() -> None:
        await env.start()
        await part.set_mode(Mode(policy="stock", max_page_sharing=512))
        env.host.ksm["pages_shared"] = 42  # pages got merged meanwhile
        await _stop(env, part)

    asyncio.run(run())
    assert env.host.ksm["max_page_sharing"] == 256 and env.host.ksm["run"] == 0 and env.knobs.rows() == []
    env.close()

    running = dict(KSM, run=1)  # KSM was running before the part came: never unmerge the host
    (tmp_path / "b").mkdir()
    env, part = _env(tmp_path / "b", FakeHost(ksm=running))

    async def run2() -> None:
        await env.start()
        await part.set_mode(Mode(policy="stock", max_page_sharing=128))
        env.host.ksm["pages_shared"] = 42
        await _stop(env, part)

    asyncio.run(run2())
    assert env.host.ksm["max_page_sharing"] == 128 and env.host.ksm["pages_shared"] == 42
    assert [r["key"] for r in env.knobs.rows()] == ["max_page_sharing"]  # kept for the next try
    env.close()


def test_the_legacy_table_moves_into_the_ledger_and_is_restored(tmp_path: Path) -> None:
    host = FakeHost(ksm=dict(KSM, pages_to_scan=999, run=1))
    env, part = _env(tmp_path, host)
    env.store.ensure_schema("CREATE TABLE IF NOT EXISTS dedup_ksm_knobs (knob TEXT PRIMARY KEY, original TEXT "
                            "NOT NULL, current TEXT NOT NULL, changed_at REAL NOT NULL)")
    with env.store.transaction() as db:
        db.execute("INSERT INTO dedup_ksm_knobs VALUES ('pages_to_scan', '100', '999', 1.0), ('run', '0', '1', 1.0)")
    # an earlier daemon of this series mirrored it read-only (originals encoded twice)
    env.knobs.import_legacy("dedup_ksm_knobs", KIND, "dedup", lambda r: ("", r["knob"], r["original"], r["current"]),
                            drop=False)
    asyncio.run(env.start())
    assert host.ksm == KSM and env.knobs.rows() == []
    assert env.store.query("SELECT name FROM sqlite_master WHERE name = 'dedup_ksm_knobs'") == []
    env.close()


def test_no_ksm_observes_nothing_and_turns_nothing(tmp_path: Path) -> None:
    env, part = _env(tmp_path, FakeHost(ksm=None))
    _vm(env, "vm1", {"extra": {"dedup": {"policy": "stock"}}})

    async def run() -> None:
        await env.start()
        await env.period()

    asyncio.run(run())
    assert part.status()["available"] is False and env.knobs.rows() == [] and _ksm_writes(env) == []
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from symbiont.dedup.api import router

    app = FastAPI()
    app.state.parts = env.parts  # the handlers reach the part as app.state.parts["dedup"]
    app.include_router(router, prefix="/v1/dedup")
    with TestClient(app) as c:
        r = c.get("/v1/dedup/vms")
        assert r.status_code == 409 and "KSM is not available" in r.json()["detail"]
        assert c.get("/v1/dedup/status").json()["available"] is False
    env.close()
