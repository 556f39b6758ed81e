"""The QMP path of the elastic disk's hot-plug (used for QEMU's NBD reconnect-delay, which
libvirt 9.0 cannot express), ``symbiont.host.nbddisk``: the exact commands sent, the roll-back
when the device cannot be added, and detach waiting for the guest to let go. The monitor is
recorded here; the real thing runs in tests/vm/test_ssdcache.py."""

from __future__ import annotations

from typing import Any

import pytest

from symbiont.host import nbddisk, vhostdisk
from symbiont.host.port import HostError


class Monitor:
    """A QEMU monitor: records commands, refuses those listed in ``fail`` (once per entry)."""

    def __init__(self, fail: dict[str, list[str]] | None = None, replies: dict[str, Any] | None = None) -> None:
        self.sent: list[dict] = []
        self.fail = fail or {}
        self.replies = replies or {}

    def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        self.sent.append({"execute": cmd, "arguments": args})
        errors = self.fail.get(cmd)
        if errors:
            raise HostError(f"vm1: QMP {cmd}: {errors.pop(0)}")
        return self.replies.get(cmd, {})


def test_attach_adds_an_nbd_node_with_reconnect_delay_and_a_virtio_disk() -> None:
    mon = Monitor()
    assert nbddisk.attach(mon, "/run/x.sock", "vm1", "vdd", "symbiont-rc", 30) == "symbiont-nbd-vdd"
    add, dev = mon.sent
    assert add == {"execute": "blockdev-add", "arguments": {
        "driver": "nbd", "node-name": "symbiont-nbd-vdd", "server": {"type": "unix", "path": "/run/x.sock"},
        "export": "vm1", "reconnect-delay": 30}}  # fmt: skip
    assert dev["execute"] == "device_add" and dev["arguments"]["drive"] == "symbiont-nbd-vdd"
    assert dev["arguments"]["serial"] == "symbiont-rc" and dev["arguments"]["werror"] == "report"


def test_a_refused_device_removes_the_node_again() -> None:
    mon = Monitor({"device_add": ["Duplicate ID"]})
    with pytest.raises(nbddisk.QmpError, match="device_add: .*Duplicate ID"):
        nbddisk.attach(mon, "/run/x.sock", "vm1", "vdd", "s", 5)
    assert [m["execute"] for m in mon.sent] == ["blockdev-add", "device_add", "blockdev-del"]


def test_detach_waits_until_the_guest_released_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    mon = Monitor({"blockdev-del": ["Node symbiont-nbd-vdd is in use", "Node symbiont-nbd-vdd is in use"]})
    monkeypatch.setattr(nbddisk.time, "sleep", lambda s: None)
    nbddisk.detach(mon, "vdd", timeout_s=5)
    assert [m["execute"] for m in mon.sent] == ["device_del", "blockdev-del", "blockdev-del", "blockdev-del"]


# -- vhost-user (symbiont.host.vhostdisk): libvirt 9.0 drops a hot-plugged vhostuser disk's <reconnect>


SHARED = {"query-memdev": [{"id": "pc.ram", "size": 536870912, "share": True}]}


def test_vhost_attach_adds_a_reconnecting_socket_chardev_and_the_device() -> None:
    mon = Monitor(replies=SHARED)
    assert vhostdisk.attach(mon, "/run/x.vhost.sock", "vdc") == "symbiont-vhu-vdc"
    _query, chardev, dev = mon.sent
    assert chardev == {"execute": "chardev-add", "arguments": {"id": "symbiont-vhu-vdc", "backend": {
        "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/run/x.vhost.sock"}},
                                   "server": False, "reconnect": 1}}}}  # fmt: skip
    assert dev["arguments"] == {"driver": "vhost-user-blk-pci", "id": "symbiont-vhu-vdc",
                                "chardev": "symbiont-vhu-vdc", "num-queues": 1, "queue-size": 256}  # fmt: skip


def test_vhost_refused_device_removes_the_chardev_and_detach_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbddisk.time, "sleep", lambda s: None)
    mon = Monitor({"device_add": ["Duplicate ID"]}, replies=SHARED)
    with pytest.raises(nbddisk.QmpError, match="device_add: .*Duplicate ID"):
        vhostdisk.attach(mon, "/run/x.sock", "vdc")
    assert [m["execute"] for m in mon.sent] == ["query-memdev", "chardev-add", "device_add", "chardev-remove"]
    mon = Monitor({"chardev-remove": ["Chardev 'symbiont-vhu-vdc' is busy"]})
    vhostdisk.detach(mon, "vdc", timeout_s=5)
    assert [m["execute"] for m in mon.sent] == ["device_del", "chardev-remove", "chardev-remove"]


def test_vhost_attach_is_refused_when_the_guest_ram_is_not_shared() -> None:
    mon = Monitor(replies={"query-memdev": [{"id": "pc.ram", "size": 536870912, "share": False}]})
    with pytest.raises(nbddisk.QmpError, match="memoryBacking.*memfd"):
        vhostdisk.attach(mon, "/run/x.sock", "vdc")
    assert [m["execute"] for m in mon.sent] == ["query-memdev"]  # nothing added
