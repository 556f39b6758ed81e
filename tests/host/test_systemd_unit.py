"""The shipped systemd unit is valid (systemd-analyze verify) and names real commands."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from symbiont.config import load_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "symbiontd.service"

pytestmark = [pytest.mark.root]


def test_unit_verifies(as_root, tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: scripts/bootstrap.sh installs systemd"
    # The unit runs /usr/local/bin/symbiontd, which scripts/bootstrap.sh links to the venv.
    assert Path("/usr/local/bin/symbiontd").exists(), "run scripts/bootstrap.sh first"
    res = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "symbiontd.service" not in res.stderr, res.stderr


def test_unit_config_is_the_shipped_example_and_valid() -> None:
    text = UNIT.read_text()
    assert "--config /etc/symbiont/symbiontd.yaml" in text
    assert "KillSignal=SIGTERM" in text  # the daemon restores knobs on SIGTERM
    load_config(ROOT / "etc" / "symbiontd.yaml")


def test_check_config_flag_rejects_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("control:\n  period_s: -1\n")
    res = subprocess.run([str(ROOT / ".venv/bin/symbiontd"), "--config", str(bad), "--check-config"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "control.period_s" in res.stderr
    good = tmp_path / "good.yaml"
    good.write_text("control:\n  period_s: 3\n")
    res = subprocess.run([str(ROOT / ".venv/bin/symbiontd"), "--config", str(good), "--check-config"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "config OK" in res.stdout
