"""The QMP path of the elastic disk's hot-plug (used for QEMU's NBD reconnect-delay, which
libvirt 9.0 cannot express): the exact commands sent, the roll-back when the device cannot be
added, and detach waiting for the guest to let go. The monitor is recorded here; the real
thing runs in tests/vm/test_ssdcache.py."""

from __future__ import annotations

import json

import libvirt_qemu
import pytest

from symbiont.ssdcache import qmp


class Monitor:
    def __init__(self, fail: dict[str, list[str]] | None = None) -> None:
        self.sent: list[dict] = []
        self.fail = fail or {}

    def __call__(self, dom: object, cmd: str, flags: int) -> str:
        msg = json.loads(cmd)
        self.sent.append(msg)
        errors = self.fail.get(msg["execute"])
        if errors:
            return json.dumps({"error": {"class": "GenericError", "desc": errors.pop(0)}})
        return json.dumps({"return": {}})


def test_attach_adds_an_nbd_node_with_reconnect_delay_and_a_virtio_disk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mon = Monitor()
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", mon)
    assert qmp.attach(object(), "/run/x.sock", "vm1", "vdd", "symbiont-rc", 30) == "symbiont-nbd-vdd"
    add, dev = mon.sent
    assert add == {"execute": "blockdev-add", "arguments": {
        "driver": "nbd", "node-name": "symbiont-nbd-vdd", "server": {"type": "unix", "path": "/run/x.sock"},
        "export": "vm1", "reconnect-delay": 30}}  # fmt: skip
    assert dev["execute"] == "device_add" and dev["arguments"]["drive"] == "symbiont-nbd-vdd"
    assert dev["arguments"]["serial"] == "symbiont-rc" and dev["arguments"]["werror"] == "report"


def test_a_refused_device_removes_the_node_again(monkeypatch: pytest.MonkeyPatch) -> None:
    mon = Monitor({"device_add": ["Duplicate ID"]})
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", mon)
    with pytest.raises(qmp.QmpError, match="device_add: Duplicate ID"):
        qmp.attach(object(), "/run/x.sock", "vm1", "vdd", "s", 5)
    assert [m["execute"] for m in mon.sent] == ["blockdev-add", "device_add", "blockdev-del"]


def test_detach_waits_until_the_guest_released_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    mon = Monitor({"blockdev-del": ["Node symbiont-nbd-vdd is in use", "Node symbiont-nbd-vdd is in use"]})
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", mon)
    monkeypatch.setattr(qmp.time, "sleep", lambda s: None)
    qmp.detach(object(), "vdd", timeout_s=5)
    assert [m["execute"] for m in mon.sent] == ["device_del", "blockdev-del", "blockdev-del", "blockdev-del"]
