"""A parked VM's taps (issue 15 item 2b): the devices named by its domain XML, their packet
counters for the idle policy, and a real tap watched with AF_PACKET — a frame the host sends
toward the guest fires the wake callback once; a frame from the guest does not."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import threading
import time

import pytest

from symbiont.host import tapwatch

XML = """<domain type='qemu'><name>v</name><devices>
  <interface type='ethernet'><target dev='vnet3'/><model type='virtio'/></interface>
  <interface type='bridge'><source bridge='br0'/><target dev='vnet4'/></interface>
  <interface type='user'><model type='virtio'/></interface>
  <interface type='ethernet'><target dev='../../etc'/></interface>
  <channel type='unix'><target type='virtio' name='x'/></channel>
</devices></domain>"""


def test_the_taps_are_the_interface_targets_of_the_domain_xml() -> None:
    assert tapwatch.interfaces_from_xml(XML) == ["vnet3", "vnet4"]  # user-mode net has no tap; a bad name dropped
    assert tapwatch.interfaces_from_xml("<domain><devices/></domain>") == []


def test_packet_counters_come_from_sysfs(tmp_path) -> None:
    st = tmp_path / "vnet3" / "statistics"
    st.mkdir(parents=True)
    (st / "rx_packets").write_text("7\n")
    (st / "tx_packets").write_text("5\n")
    assert tapwatch.net_packets("vnet3", tmp_path) == 12
    assert tapwatch.net_packets("gone", tmp_path) is None
    assert tapwatch.net_packets("lo") is not None  # the real sysfs


TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


@pytest.fixture
def tap():
    """A tap device with its queue held open (as QEMU holds it): carrier on, link up."""
    name = f"symtw{os.getpid() % 10000}"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        pytest.fail(f"/dev/net/tun: {exc} (this test needs root and the tun module)")
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    os.set_blocking(fd, False)
    # no IPv6 on the test tap: the host's own duplicate-address detection at link-up is a
    # neighbour solicitation, which (rightly) wakes a guest
    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as fh:
        fh.write("1")
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield name, fd
    finally:
        os.close(fd)  # a non-persistent tap goes with its last fd


GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"


def _frame(dst: bytes = GUEST_MAC, ethertype: bytes = b"\x88\xb5") -> bytes:
    return dst + b"\x02\x00\x00\x00\x00\x01" + ethertype + b"symbiont-tap-test".ljust(46, b"\0")


def test_what_wakes_a_guest_and_what_is_chatter() -> None:
    assert tapwatch.wakes(_frame())  # unicast
    assert tapwatch.wakes(_frame(b"\xff" * 6, b"\x08\x06"))  # ARP who-has
    assert tapwatch.wakes(_frame(b"\x33\x33\xff\x12\x34\x56", b"\x86\xdd"))  # IPv6 neighbour solicitation
    assert not tapwatch.wakes(_frame(b"\x33\x33\x00\x00\x00\x02", b"\x86\xdd"))  # router solicitation
    assert not tapwatch.wakes(_frame(b"\xff" * 6, b"\x08\x00"))  # an IPv4 broadcast
    assert not tapwatch.wakes(_frame(b"\x01\x80\xc2\x00\x00\x00", b"\x00\x26"))  # STP
    assert not tapwatch.wakes(b"\x00" * 10)


@pytest.mark.root
def test_a_frame_toward_the_guest_fires_once_and_one_from_the_guest_does_not(tap) -> None:
    name, fd = tap
    w = tapwatch.TapWatcher()
    fired: list[tuple[str, str, float]] = []
    ev = threading.Event()

    def on_frame(vm: str, dev: str) -> None:
        fired.append((vm, dev, time.perf_counter()))
        ev.set()

    try:
        assert w.watch("vm1", [name, "no-such-tap0"], on_frame) == [name]
        os.write(fd, _frame(b"\x02\x00\x00\x00\x00\x01"))  # the guest sends: the host receives it
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind((name, 0))
        sender.send(_frame(b"\x33\x33\x00\x00\x00\x16", b"\x86\xdd"))  # host's MLD chatter toward the guest
        assert not ev.wait(0.5) and fired == []
        while True:  # what is queued for the guest so far (the tap's own link-up chatter included)
            try:
                os.read(fd, 2048)
            except BlockingIOError:
                break
        t0 = time.perf_counter()
        sender.send(_frame())  # the host sends toward the guest
        assert ev.wait(5.0), "the watcher did not see the frame"
        assert fired[0][:2] == ("vm1", name) and fired[0][2] - t0 < 1.0
        assert os.read(fd, 2048)[:6] == GUEST_MAC  # the frame is still queued for the guest to read
        sender.send(_frame())
        time.sleep(0.3)
        assert len(fired) == 1 and w.watched() == {}  # once per watch
        sender.close()
    finally:
        w.close()
