"""stop_started_libvirtd waits for the daemons it stops to exit (the demo-after-tests race)."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiont.host import libvirt_host


def test_stop_waits_until_the_stopped_daemon_exited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "started"
    mark.write_text("libvirtd\n")
    monkeypatch.setattr(libvirt_host, "STARTED_MARK", mark)
    alive = {"libvirtd": 3}  # still there for three more checks after the SIGTERM
    cmds: list[list[str]] = []

    def running(name: str) -> bool:
        if alive.get(name, 0) > 0:
            alive[name] -= 1
            return True
        return False

    monkeypatch.setattr(libvirt_host, "_running", running)
    monkeypatch.setattr(libvirt_host.subprocess, "run", lambda cmd, check=False: cmds.append(cmd))
    monkeypatch.setattr(libvirt_host.time, "sleep", lambda _s: None)
    assert libvirt_host.stop_started_libvirtd() == ["libvirtd"]
    assert alive["libvirtd"] == 0  # it returned only once the process was gone
    assert cmds == [["pkill", "-x", "libvirtd"]]  # no SIGKILL needed
    assert not mark.exists()


def test_stop_kills_a_daemon_that_does_not_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "started"
    mark.write_text("libvirtd\n")
    monkeypatch.setattr(libvirt_host, "STARTED_MARK", mark)
    monkeypatch.setattr(libvirt_host, "_running", lambda name: True)
    cmds: list[list[str]] = []
    monkeypatch.setattr(libvirt_host.subprocess, "run", lambda cmd, check=False: cmds.append(cmd))
    libvirt_host.stop_started_libvirtd(timeout=0.05)
    assert cmds == [["pkill", "-x", "libvirtd"], ["pkill", "-KILL", "-x", "libvirtd"]]
