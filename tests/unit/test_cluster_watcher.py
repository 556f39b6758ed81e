"""The OpenStack Watcher strategies (integrations/watcher) pass inside Watcher's own decision
engine: scripts/watcher-test.sh runs them in a separate venv with python-watcher (made once under
build/, about 1.5 min with a package mirror; Watcher's OpenStack dependencies stay out of ours)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_watcher_strategies_in_watchers_decision_engine() -> None:
    res = subprocess.run([str(ROOT / "scripts" / "watcher-test.sh"), "-W", "ignore", "-rA"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    for name in ("test_entry_point_registered", "test_consolidation_frees_nodes_on_watcher_scenarios",
                 "test_consolidation_scenario_1_action_plan", "test_hotspot_with_watcher_datasource"):  # fmt: skip
        assert f"PASSED integrations/watcher/tests/test_strategy.py::StrategyTest::{name}" in out, out[-6000:]
