"""A private L2 network between two lab VMs that exists only inside a network namespace.

The migration part's *network path* needs the two guests to talk over a network of their
own, and this host's rule is that anything with a private-range address lives inside a
network namespace the lab creates. So each VM gets a virtio NIC backed by a tap device
(libvirt ``type='ethernet'``, ``managed='no'``). Once QEMU has opened its tap, the tap is
moved into the namespace ``symlink-<id>`` and enslaved to a bridge there. QEMU keeps its file
descriptor, so frames flow through that namespace's bridge; the root namespace never holds
the bridge, the taps or an address of this network. The guests address it as 10.211.x.y,
derived from the NIC's MAC (``ops_migration`` in the agent).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

log = logging.getLogger(__name__)


class PeerLinkError(Exception):
    pass


@dataclass(frozen=True)
class PeerLink:
    """Two VMs' link, named by two ids in 1024..65535 (one per VM: its tap name and MAC)."""

    ids: tuple[int, int]

    def __post_init__(self) -> None:
        a, b = (int(x) for x in self.ids)
        if not all(1024 <= x <= 65535 for x in (a, b)) or a == b:
            raise PeerLinkError(f"peer link ids {self.ids!r} must be two different numbers in 1024..65535")

    @property
    def netns(self) -> str:
        return f"symlink-{self.ids[0]}"

    def tap(self, i: int) -> str:
        return f"symt{self.ids[i]}"

    def mac(self, i: int) -> str:
        x = self.ids[i]
        return f"52:54:00:5b:{x >> 8 & 0xFF:02x}:{x & 0xFF:02x}"

    def prepare(self) -> None:
        """Remove leftovers of an earlier run, then create both taps in the root namespace for
        QEMU to open (it can only open a tap by name in its own namespace)."""
        self.remove()
        with IPRoute() as ipr:
            for i in (0, 1):
                ipr.link("add", ifname=self.tap(i), kind="tuntap", mode="tap")
        log.info("peer link %s: taps %s, %s created", self.netns, self.tap(0), self.tap(1))

    def attach(self) -> None:
        """After both VMs started: move the taps into the namespace and bridge them there."""
        netns.create(self.netns)
        with IPRoute() as ipr:
            for i in (0, 1):
                idx = ipr.link_lookup(ifname=self.tap(i))
                if not idx:
                    raise PeerLinkError(f"tap {self.tap(i)} vanished before it could be moved")
                ipr.link("set", index=idx[0], net_ns_fd=self.netns)
        with NetNS(self.netns) as ns:
            ns.link("add", ifname="symbr0", kind="bridge")
            br = ns.link_lookup(ifname="symbr0")[0]
            for i in (0, 1):
                t = ns.link_lookup(ifname=self.tap(i))[0]
                ns.link("set", index=t, master=br)
                ns.link("set", index=t, state="up")
            ns.link("set", index=br, state="up")
        log.info("peer link %s: taps bridged inside the namespace", self.netns)

    def remove(self) -> None:
        """Delete the namespace (its bridge and the taps in it go with it) and stray taps."""
        if self.netns in netns.listnetns():
            netns.remove(self.netns)
        with IPRoute() as ipr:
            for i in (0, 1):
                for idx in ipr.link_lookup(ifname=self.tap(i)):
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=idx)
