"""The real daemon (subprocess) tunes KSM only when asked, and every KSM value it changed is back
after it stops — after SIGTERM, and after ``kill -9`` once it starts again."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from symbiont.config import load_config
from symbiont.host.ksm import Ksm
from symbiont_research.lab.session import DaemonProcess

pytestmark = [pytest.mark.root]


def _daemon(tmp: Path) -> DaemonProcess:
    cfg = {"state_dir": str(tmp / "state"), "socket": str(tmp / "symbiontd.sock"), "control": {"period_s": 0.5}}
    path = tmp / "symbiontd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return DaemonProcess(path, load_config(path), tmp / "symbiontd.log")


def _changed(before: dict) -> dict:
    """Values different from the host's for every knob the API can turn."""
    return {
        "policy": "fixed",
        "pages_to_scan": int(before["pages_to_scan"]) + 123,
        "sleep_millisecs": int(before["sleep_millisecs"]) + 7,
        "use_zero_pages": 1 - int(before["use_zero_pages"]),
        "max_page_sharing": int(before["max_page_sharing"]) + 1,
    }


@pytest.fixture
def ksm(as_root: None):
    k = Ksm()
    k.require()
    before = k.settings()
    yield k, before
    if k.settings() != before:  # never leave the host tuned, even when a test fails
        for knob, value in before.items():
            if knob != "run":
                k.write(knob, value)
        k.write("run", before["run"])
        pytest.fail("the test left KSM tuned (restored by the fixture)")


def test_every_knob_is_restored_after_the_daemon_stops(ksm, tmp_path: Path) -> None:
    k, before = ksm
    d = _daemon(tmp_path)
    d.start()
    try:
        with d.client() as c:
            st = c.get("/v1/dedup/status")
            assert st["available"] and st["policy"]["policy"] == "off"
            assert k.settings() == before  # a plain start only observes
            want = _changed(before)
            st = c.put("/v1/dedup/policy", want)
            now = k.settings()
            for knob in ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing"):
                assert now[knob] == want[knob], knob
            assert now["run"] == 1
            assert st["originals"]["pages_to_scan"] == before["pages_to_scan"]
            metrics = c.get("/metrics")
            assert f'symbiont_dedup_ksm_setting{{knob="pages_to_scan"}} {want["pages_to_scan"]}.0' in metrics
            acts = [x["action"] for x in c.get("/v1/dedup/decisions")]
            assert "policy" in acts and "ksm-apply" in acts
    finally:
        rc = d.stop()
    assert rc == 0, d.log_tail()
    assert k.settings() == before


def test_knobs_left_by_a_killed_daemon_are_restored_at_its_next_start(ksm, tmp_path: Path) -> None:
    k, before = ksm
    d = _daemon(tmp_path)
    d.start()
    try:
        with d.client() as c:
            want = _changed(before)
            c.put("/v1/dedup/policy", want)
            assert k.settings()["pages_to_scan"] == want["pages_to_scan"]
    finally:
        d.stop(sig=signal.SIGKILL)
    assert k.settings()["pages_to_scan"] == want["pages_to_scan"]  # nobody restored: it was killed
    d.start()
    try:
        with d.client() as c:
            restores = [x for x in c.get("/v1/dedup/decisions") if x["action"] == "restore"]
            assert restores and "previous run" in restores[0]["inputs"]["reason"]
            assert restores[0]["inputs"]["originals"]["pages_to_scan"] == before["pages_to_scan"]
            # the operator's policy was persisted and resumes; clearing it restores the host
            c.delete("/v1/dedup/policy")
            assert k.settings() == before
    finally:
        assert d.stop() == 0
    assert k.settings() == before
