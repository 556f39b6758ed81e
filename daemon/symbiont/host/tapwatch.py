"""A parked VM's taps, watched for a frame toward the guest (issue 15: traffic wakes it).

A VM's network devices are the ``<target dev=.../>`` of its domain XML's ``<interface>``
elements (types ``ethernet``, ``bridge``, ``network``: a tap on the host). While the VM is
parked, one thread waits (``selectors``) on an ``AF_PACKET`` socket bound to each of its taps
and calls back on the first frame the host *transmits* on the tap (``PACKET_OUTGOING``: a frame
toward the guest) that asks something of it (:func:`wakes`): a unicast frame, an ARP
broadcast, an IPv6 neighbour solicitation (solicited-node multicast). Link-local chatter every
port of a bridge receives (IPv6 router solicitations, MLD reports, STP, LLDP) does not wake a
VM. The frame itself is not consumed: the tap queues it until QEMU reads it, which it does once
the VM runs again, so it is delivered after the wake.

Counters for the idle policy are ``/sys/class/net/<tap>/statistics/{rx,tx}_packets``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # sll_pkttype of a frame the host sends out through the device
TAP_TYPES = ("ethernet", "bridge", "network", "direct")
DEV_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def interfaces_from_xml(xml: str) -> list[str]:
    """The host-side device names of a domain's network interfaces (live XML)."""
    out = []
    for itf in ET.fromstring(xml).iterfind("./devices/interface"):
        t = itf.find("target")
        dev = t.get("dev") if t is not None else None
        if itf.get("type") in TAP_TYPES and dev and len(dev) <= 15 and set(dev) <= DEV_NAME:
            out.append(dev)
    return out


def net_packets(dev: str, sysfs: str | Path = "/sys/class/net") -> int | None:
    """rx + tx packets of a network device so far; None when it does not exist."""
    base = Path(sysfs) / dev / "statistics"
    try:
        return int((base / "rx_packets").read_text()) + int((base / "tx_packets").read_text())
    except (OSError, ValueError):
        return None


def wakes(frame: bytes) -> bool:
    """Whether a frame toward a parked guest is a request for it (see the module docstring)."""
    if len(frame) < 14:
        return False
    dst, ethertype = frame[:6], frame[12:14]
    if not dst[0] & 1:
        return True  # unicast: for this guest
    if dst == b"\xff" * 6:
        return ethertype == b"\x08\x06"  # ARP: who has the guest's address
    return dst[:3] == b"\x33\x33\xff"  # IPv6 solicited-node multicast: neighbour solicitation


class TapWatcher:
    """One thread, all watched taps; each VM's callback fires at most once per :meth:`watch`."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._by_vm: dict[str, list[socket.socket]] = {}
        self._rd, self._wr = os.pipe()  # wakes the thread when the set changes or on close
        os.set_blocking(self._rd, False)
        self._sel.register(self._rd, selectors.EVENT_READ, None)
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, vm: str, devs: list[str], on_frame: Callable[[str, str], None]) -> list[str]:
        """Watch ``devs`` for ``vm``; ``on_frame(vm, dev)`` is called (from the watcher's
        thread) on the first frame toward the guest. Returns the devices watched (one that is
        gone is skipped and logged)."""
        self.unwatch(vm)
        socks, watched = [], []
        for dev in devs:
            try:
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # we read one frame's header
                s.bind((dev, ETH_P_ALL))
                s.setblocking(False)
            except OSError as exc:
                log.warning("vm %s: cannot watch tap %s: %s", vm, dev, exc)
                continue
            socks.append(s)
            watched.append(dev)
        with self._lock:
            if self._closed:
                for s in socks:
                    s.close()
                return []
            self._by_vm[vm] = socks
            for s, dev in zip(socks, watched, strict=True):
                self._sel.register(s, selectors.EVENT_READ, (vm, dev, on_frame))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tap-watch", daemon=True)
                self._thread.start()
        os.write(self._wr, b"x")
        return watched

    def unwatch(self, vm: str) -> None:
        with self._lock:
            for s in self._by_vm.pop(vm, []):
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(s)
                s.close()

    def watched(self) -> dict[str, int]:
        with self._lock:
            return {vm: len(s) for vm, s in self._by_vm.items()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            vms = list(self._by_vm)
        for vm in vms:
            self.unwatch(vm)
        with contextlib.suppress(OSError):
            os.write(self._wr, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with contextlib.suppress(OSError):
            os.close(self._rd)
            os.close(self._wr)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            for key, _ in self._sel.select(timeout=1.0):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        os.read(self._rd, 4096)
                    continue
                vm, dev, on_frame = key.data
                try:
                    data, addr = key.fileobj.recvfrom(64)  # type: ignore[union-attr]
                except OSError:
                    continue
                if addr[2] != PACKET_OUTGOING or not wakes(data):  # from the guest, or chatter
                    continue
                self.unwatch(vm)
                try:
                    on_frame(vm, dev)
                except Exception:  # the callback must not end the watcher
                    log.exception("vm %s: tap wake callback failed", vm)
