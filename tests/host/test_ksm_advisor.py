"""The kernel's KSM advisor (Linux 6.8+) as a policy: its knobs go through the same saved-originals
mechanism as every other KSM tunable (sqlite before the change; restored on stop, and after a
``kill -9`` at the next start), restored in the order the kernel accepts (issue 18 item 4)."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest

from symbiont.client import ApiError
from symbiont.dedup.ksm_controller import KsmController, LedgerKnobStore
from symbiont.dedup.policy import AdvisorParams, advisor, fixed
from symbiont.host.ksm import Ksm
from symbiont.knobs import KnobLedger
from symbiont.state import StateStore
from tests.host.test_ksm_daemon import _daemon, ksm  # noqa: F401  (the fixture restores and fails on leftovers)

pytestmark = [pytest.mark.root]

PARAMS = AdvisorParams(target_scan_time=57, max_cpu=33, min_pages_to_scan=600, max_pages_to_scan=20000)


def _advisor_files(k: Ksm) -> dict[str, int | str]:
    return {n: k.read(n) for n in ("advisor_mode", "advisor_target_scan_time", "advisor_max_cpu",
                                   "advisor_min_pages_to_scan", "advisor_max_pages_to_scan")}  # fmt: skip


def test_advisor_knobs_are_saved_first_and_restored_after_a_crash(ksm, tmp_path: Path) -> None:  # noqa: F811
    k, before = ksm
    if not k.has("advisor_mode"):
        pytest.fail("this kernel has no KSM advisor (Linux 6.8+); the test host has one")
    assert before["advisor_mode"] == "none"
    store = StateStore(tmp_path / "s.sqlite3")
    ctl = KsmController(k, LedgerKnobStore(KnobLedger(store)))
    # ksmd stays off (run=0): nothing on the host gets merged by this test
    ctl.apply(fixed(int(before["pages_to_scan"]) + 123, int(before["sleep_millisecs"]) + 7, run=0).settings)
    ctl.apply(dataclasses.replace(advisor(PARAMS).settings, run=0))
    assert _advisor_files(k) == {"advisor_mode": "scan-time", "advisor_target_scan_time": 57, "advisor_max_cpu": 33,
                                 "advisor_min_pages_to_scan": 600, "advisor_max_pages_to_scan": 20000}  # fmt: skip
    assert k.read_int("pages_to_scan") == 600  # the advisor owns it now (starts at its minimum)
    saved = {r["key"] for r in KnobLedger(store).rows(vm="")}
    assert {"advisor_mode", "advisor_target_scan_time", "advisor_max_cpu", "pages_to_scan"} <= saved
    # a "kill -9": a new controller on the same database puts everything back, advisor_mode first
    # (the kernel refuses pages_to_scan while the advisor is on)
    res = KsmController(k, LedgerKnobStore(KnobLedger(store))).restore()
    assert all("restored" in v for v in res.values()), res
    assert k.settings() == before
    assert KnobLedger(store).rows() == []
    # and back from the advisor to a plain policy: advisor off first, then pages_to_scan
    ctl = KsmController(k, LedgerKnobStore(KnobLedger(store)))
    ctl.apply(dataclasses.replace(advisor(PARAMS).settings, run=0))
    ctl.apply(fixed(321, int(before["sleep_millisecs"]), run=0).settings)
    assert k.read("advisor_mode") == "none" and k.read_int("pages_to_scan") == 321
    ctl.restore()
    assert k.settings() == before


def test_daemon_advisor_policy_is_restored_on_stop_and_after_kill_9(ksm, tmp_path: Path) -> None:  # noqa: F811
    k, before = ksm
    d = _daemon(tmp_path)
    d.start()
    try:
        with d.client() as c:
            st = c.put("/v1/dedup/policy", {"policy": "advisor", "advisor": {"target_scan_time": 57, "max_cpu": 33}})
            assert st["policy"]["policy"] == "advisor"
            assert k.read("advisor_mode") == "scan-time" and k.read_int("advisor_target_scan_time") == 57
            assert k.read_int("advisor_max_cpu") == 33 and k.read_int("run") == 1
            with pytest.raises(ApiError) as e:
                c.put("/v1/dedup/policy", {"policy": "advisor", "advisor": {"max_cpu": 300}})
            assert e.value.status == 422 and "max_cpu" in str(e.value)
    finally:
        d.stop(sig=signal.SIGKILL)
    assert k.read("advisor_mode") == "scan-time"  # nobody restored: it was killed
    d.start()
    try:
        with d.client() as c:
            restores = [x for x in c.get("/v1/dedup/decisions") if x["action"] == "restore"]
            assert restores and restores[0]["inputs"]["originals"]["advisor_mode"] == "none"
            c.delete("/v1/dedup/policy")
            assert k.settings() == before
    finally:
        assert d.stop() == 0
    assert k.settings() == before
