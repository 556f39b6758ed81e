"""A private L2 network between two lab VMs that exists only inside a network namespace.

The migration part's *network path* needs the two guests to talk over a network of their
own, and this host's rule is that anything with a private-range address lives inside a
network namespace the lab creates. So each VM gets a virtio NIC backed by a tap device
(libvirt ``type='ethernet'``, ``managed='no'``). Once QEMU has opened its tap, the tap is
moved into the namespace ``symlink-<id>`` and enslaved to a bridge there. QEMU keeps its file
descriptor, so frames flow through that namespace's bridge; the root namespace never holds
the bridge, the taps or an address of this network. The guests address it as 10.211.x.y,
derived from the NIC's MAC (``ops_migration`` in the agent).

Two labs must not tear down each other's link: :meth:`PeerLink.prepare` removes leftovers
only when no tap of the link is held open (a tap has carrier exactly while a process — QEMU —
holds its file descriptor), and :meth:`PeerLink.allocate` picks ids no link on the host uses.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
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

    @classmethod
    def allocate(cls) -> PeerLink:
        """A link whose namespace and taps exist nowhere on this host yet."""
        for _ in range(64):
            a = 1024 + secrets.randbelow(65534 - 1024)  # a + 1 < 65535: 10.211.255.255 is the broadcast
            link = cls((a, a + 1))
            if not link.exists() and not link.taps_present():
                return link
        raise PeerLinkError("no free peer link ids after 64 tries")

    def exists(self) -> bool:
        return self.netns in netns.listnetns()

    def _taps(self) -> list[tuple[str, bool]]:
        """(tap, carrier) of this link's taps, in the root namespace and in the link's."""
        names = {self.tap(0), self.tap(1)}
        found: list[tuple[str, bool]] = []
        with IPRoute() as ipr:
            found += [(m.get_attr("IFLA_IFNAME"), bool(m.get_attr("IFLA_CARRIER"))) for m in ipr.get_links()
                      if m.get_attr("IFLA_IFNAME") in names]
        if self.exists():
            with NetNS(self.netns) as ns:
                found += [(m.get_attr("IFLA_IFNAME"), bool(m.get_attr("IFLA_CARRIER"))) for m in ns.get_links()
                          if m.get_attr("IFLA_IFNAME") in names]
        return found

    def taps_present(self) -> bool:
        return bool(self._taps())

    def in_use(self) -> list[str]:
        """Taps of this link held open by a process (IFLA_CARRIER: a tap has carrier exactly
        while a file descriptor is attached to it, up or down)."""
        return sorted(name for name, carrier in self._taps() if carrier)

    def prepare(self) -> None:
        """Remove leftovers of an earlier run, then create both taps in the root namespace for
        QEMU to open (it can only open a tap by name in its own namespace). Refuse when a tap
        of this link is in use: then it is a running lab's link, not a leftover."""
        busy = self.in_use()
        if busy:
            raise PeerLinkError(
                f"peer link {self.netns}: {', '.join(busy)} held open by a running VM (another lab's link); "
                "refusing to remove it: pick other ids"
            )
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
