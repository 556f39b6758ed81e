"""Hot-plug an elastic disk as ``vhost-user-blk-pci`` through the QEMU monitor.

libvirt 9.0 accepts ``<disk type='vhostuser'>`` with ``<source><reconnect enabled='yes'
timeout='1'/>`` but a *hot-plugged* one reaches QEMU without the reconnect (measured: after the
backend restarted QEMU never connected again, while a ``chardev-add`` with ``reconnect: 1`` did
within a second). A daemon restart must not cost the guest its disk, so the device is added as
the NBD one with a reconnect delay is (:mod:`symbiont.host.nbddisk`): ``chardev-add`` of a unix
socket client with ``reconnect``, then ``device_add`` of a ``vhost-user-blk-pci`` on it (one
queue of 256 entries: the backend's ``seg_max`` is set for that size). libvirt does not know the
disk (the domain is tainted *custom-monitor*), so it is removed the same way.
"""

from __future__ import annotations

from symbiont.host.nbddisk import QmpError, Send, _qmp, unplug

QUEUE_SIZE = 256


def node_name(target: str) -> str:
    """The chardev and device id for ``target`` (``vdX``)."""
    return f"symbiont-vhu-{target}"


def attach(send: Send, socket: str, target: str, reconnect_s: int = 1) -> str:
    """Add the socket chardev (client, ``reconnect``) and the device on it; returns its id.
    Refused (nothing added) when the domain's RAM is not shared."""
    node = node_name(target)
    memdevs = _qmp(send, "query-memdev", {}) or []
    if not any(m.get("share") for m in memdevs if isinstance(m, dict)):
        # QEMU would add the device and fail only when the guest starts it (no memory fds to hand
        # the backend): refuse here, with what the domain needs.
        raise QmpError("vhost-user needs the guest's RAM shared: <memoryBacking><source type='memfd'/>"
                       "<access mode='shared'/></memoryBacking> in the domain (not set for this VM)")
    _qmp(send, "chardev-add", {
        "id": node,
        "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": socket}},
                                               "server": False, "reconnect": int(reconnect_s)}},
    })  # fmt: skip
    try:
        _qmp(send, "device_add", {"driver": "vhost-user-blk-pci", "id": node, "chardev": node,
                                  "num-queues": 1, "queue-size": QUEUE_SIZE})  # fmt: skip
    except QmpError:
        _qmp(send, "chardev-remove", {"id": node})
        raise
    return node


def detach(send: Send, target: str, timeout_s: float = 60.0) -> None:
    """Unplug the device (the guest must let go of it), then remove its chardev."""
    node = node_name(target)
    unplug(send, node, ("chardev-remove", {"id": node}), timeout_s)
