"""Hot-plug an elastic disk with QEMU's NBD ``reconnect-delay``, through the QEMU monitor.

libvirt 9.0 has no ``<reconnect delay='N'/>`` for NBD disk sources: its schema allows
``<reconnect>`` only for vhost-user disks and chardev sockets, and a domain definition with one
inside an NBD ``<source>`` is accepted but the element is silently dropped (checked with
``virsh define`` + ``dumpxml``; ``--validate`` rejects it). QEMU 7.2's NBD client has the
option (``reconnect-delay``: while the server is gone, requests wait that long for it to come
back instead of failing at once). So a disk that must survive a daemon restart transparently is
added with QMP through libvirt's monitor pass-through (``blockdev-add`` of an ``nbd`` node +
``device_add`` of a ``virtio-blk-pci`` on it).

The price: libvirt does not know that disk (the domain is marked *tainted: custom-monitor*, the
disk is not in its XML and does not survive a VM restart), so it is removed the same way
(``device_del``, then ``blockdev-del`` once the guest released the device).

The functions speak QMP through a ``send(command, arguments)`` callable (the host port's
``qmp`` bound to one VM), so this module imports nothing of the system and is tested with a
recorded monitor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from symbiont.host.port import HostError

Send = Callable[[str, dict[str, Any]], Any]  # one QMP command -> its "return"; HostError if refused


class QmpError(HostError):
    """QEMU refused a monitor command; the message is QEMU's."""


def node_name(target: str) -> str:
    """The node and device id for ``target`` (``vdX``): short, QEMU-valid, ours."""
    return f"symbiont-nbd-{target}"


def _qmp(send: Send, command: str, arguments: dict[str, Any]) -> Any:
    try:
        return send(command, arguments)
    except QmpError:
        raise
    except HostError as exc:
        raise QmpError(f"{command}: {exc}") from None


def attach(send: Send, socket: str, export: str, target: str, serial: str, reconnect_delay_s: int) -> str:
    """Add the NBD node with ``reconnect-delay`` and a virtio-blk device on it; returns its id."""
    node = node_name(target)
    _qmp(
        send,
        "blockdev-add",
        {
            "driver": "nbd",
            "node-name": node,
            "server": {"type": "unix", "path": socket},
            "export": export,
            "reconnect-delay": int(reconnect_delay_s),
        },
    )
    try:
        _qmp(
            send,
            "device_add",
            {
                "driver": "virtio-blk-pci",
                "id": node,
                "drive": node,
                "serial": serial,
                "werror": "report",
                "rerror": "report",
            },
        )
    except QmpError:
        _qmp(send, "blockdev-del", {"node-name": node})
        raise
    return node


def attached(send: Send, target: str) -> bool:
    """Is there a QMP-attached elastic disk for ``target``? (False when the monitor cannot say.)"""
    node = node_name(target)
    try:
        return any(n.get("node-name") == node for n in _qmp(send, "query-named-block-nodes", {}) or [])
    except QmpError:
        return False


def unplug(send: Send, node: str, backend: tuple[str, dict[str, Any]], timeout_s: float) -> None:
    """``device_del`` of ``node``, then remove its backend (``blockdev-del``, ``chardev-remove``),
    retried until the guest has let go of the device or ``timeout_s`` passed."""
    try:
        _qmp(send, "device_del", {"id": node})
    except QmpError as exc:
        if "not found" not in str(exc):
            raise
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _qmp(send, *backend)
            return
        except QmpError as exc:
            if "not found" in str(exc) or "Cannot find" in str(exc):
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def detach(send: Send, target: str, timeout_s: float = 60.0) -> None:
    """Unplug the device (the guest must let go of it), then drop the NBD node."""
    node = node_name(target)
    unplug(send, node, ("blockdev-del", {"node-name": node}), timeout_s)
