"""The vhost-user-blk data path (``native/vhostblk.c``) on a real loop-device pool.

The client here is a small vhost-user driver written for the test (QEMU's part: the control
messages, a memfd standing in for guest RAM, a split virtqueue, kick and call eventfds), so
that every request the guest could put in its ring can be written by hand: hostile ones too.
Checked: data lands where SymFlex's translation says; unbacked blocks fail the whole request
with VIRTIO_BLK_S_IOERR and write nothing; GET_ID answers the serial; flush; a remap takes
effect for the next request; a descriptor outside guest RAM, a chain that loops or a bad
vring address ends that connection alone (with the reason), the pool untouched, and the next
connection is served; a peer that is not the VM's QEMU is refused. The same export serves a
real QEMU in ``benchmarks/bench_ssdcache_guest.py`` and ``tests/vm/test_ssdcache_vhost.py``.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
import time

import pytest

from symbiont.ssdcache import nbdfast
from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.nbdserver import Export
from symbiont.ssdcache.pool import Pool
from symbiont.ssdcache.vhostuser import VhostUserServer

pytestmark = [pytest.mark.root]

RAM = 8 << 20  # the "guest's" RAM
UVA = 0x7F00_0000_0000  # where "QEMU" has it mapped (only the vring addresses use it)
NUM = 16
DESC, AVAIL, USED = 0x0000, 0x1000, 0x2000
HDR, STATUS, DATA = 0x3000, 0x4000, 0x100000
F_PROTOCOL, P_CONFIG, P_REPLY_ACK, P_INFLIGHT = 1 << 30, 1 << 9, 1 << 3, 1 << 12
NEXT, WRITE, INDIRECT = 1, 2, 4


class Driver:
    """QEMU's side of one vhost-user-blk connection, minimal."""

    def __init__(self, path: str, ram_of: Driver | None = None) -> None:
        """``ram_of``: reuse another driver's guest RAM (QEMU reconnecting to a new backend)."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(10)
        self.memfd = os.dup(ram_of.memfd) if ram_of else os.memfd_create("guest-ram")
        if not ram_of:
            os.ftruncate(self.memfd, RAM)
        self.ram = mmap.mmap(self.memfd, RAM)
        self.kick, self.call = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.used_seen = 0

    def close(self) -> None:
        self.sock.close()
        for fd in (self.kick, self.call, self.memfd):
            os.close(fd)
        self.ram.close()

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 1) -> None:
        msg = struct.pack("<III", req, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [msg], fds)
        else:
            self.sock.sendall(msg)

    def recv(self) -> tuple[int, bytes]:
        h = self._exact(12)
        req, _flags, size = struct.unpack("<III", h)
        return req, self._exact(size)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            b = self.sock.recv(n - len(out))
            if not b:
                raise ConnectionError("closed")
            out += b
        return out

    def u64(self, req: int, value: int | None = None) -> int:
        if value is None:
            self.send(req)
            return struct.unpack("<Q", self.recv()[1])[0]
        self.send(req, struct.pack("<Q", value))
        return 0

    def setup(self, ring_uva: int = UVA, base: int = 0, inflight: tuple[int, int] | None = None,
              inflight_queue: int = NUM) -> None:  # fmt: skip
        """``inflight=(fd, size)``: hand the backend that region (SET_INFLIGHT_FD), as QEMU does,
        declared for a queue of ``inflight_queue`` entries."""
        feats = self.u64(1)
        assert feats & (1 << 32) and feats & F_PROTOCOL
        self.u64(2, feats)
        assert self.u64(15) & P_CONFIG
        self.u64(16, P_CONFIG | P_REPLY_ACK | (P_INFLIGHT if inflight else 0))
        self.send(3)  # SET_OWNER
        if inflight:
            self.send(32, struct.pack("<QQHHxxxx", inflight[1], 0, 1, inflight_queue), [inflight[0]])
        self.used_seen = base
        self.send(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, RAM, UVA, 0), [self.memfd], flags=1 | 8)
        assert struct.unpack("<Q", self.recv()[1])[0] == 0  # REPLY_ACK
        self.send(8, struct.pack("<II", 0, NUM))
        self.send(10, struct.pack("<II", 0, base))
        self.send(9, struct.pack("<IIQQQQ", 0, 0, ring_uva + DESC, ring_uva + USED, ring_uva + AVAIL, 0))
        self.send(13, struct.pack("<Q", 0), [self.call])
        self.send(12, struct.pack("<Q", 0), [self.kick])
        self.send(18, struct.pack("<II", 0, 1))

    def get_inflight(self) -> tuple[int, int]:
        """GET_INFLIGHT_FD: the backend's new region (fd, size)."""
        self.send(31, struct.pack("<QQHHxxxx", 0, 0, 1, NUM))
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, 12 + 24, 1)
        assert struct.unpack_from("<I", msg, 8)[0] == 24  # QEMU refuses any other size
        size = struct.unpack_from("<Q", msg, 12)[0]
        assert len(fds) == 1 and size >= 16 + 16 * NUM
        return fds[0], size

    def config(self) -> bytes:
        self.send(24, struct.pack("<III", 0, 60, 0) + bytes(60))
        return self.recv()[1][12:]

    def put(self, descs: list[tuple[int, int, int, int]], table: int = DESC) -> None:
        for i, (addr, ln, flags, nxt) in enumerate(descs):
            self.ram[table + 16 * i: table + 16 * i + 16] = struct.pack("<QIHH", addr, ln, flags, nxt)

    def submit(self, head: int = 0) -> None:
        slot = AVAIL + 4 + 2 * (self.avail_idx % NUM)
        self.ram[slot: slot + 2] = struct.pack("<H", head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram[AVAIL + 2: AVAIL + 4] = struct.pack("<H", self.avail_idx)
        os.eventfd_write(self.kick, 1)

    def wait_used(self, timeout: float = 10) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while struct.unpack("<H", self.ram[USED + 2: USED + 4])[0] == self.used_seen:
            if time.monotonic() > deadline:
                raise TimeoutError("no completion")
            select.select([self.call], [], [], 0.1)
        e = USED + 4 + 8 * (self.used_seen % NUM)
        self.used_seen += 1
        return struct.unpack("<II", self.ram[e: e + 8])

    def request(self, typ: int, sector: int, data: bytes | int = 0, write: bool = False) -> tuple[int, bytes]:
        """One request (hdr, data, status as three descriptors); (status, data read)."""
        self.ram[HDR: HDR + 16] = struct.pack("<IIQ", typ, 0, sector)
        n = len(data) if isinstance(data, bytes) else data
        if isinstance(data, bytes):
            self.ram[DATA: DATA + n] = data
        self.ram[STATUS] = 0xFF
        if n:
            descs = [(HDR, 16, NEXT, 1), (DATA, n, NEXT | (0 if write else WRITE), 2), (STATUS, 1, WRITE, 0)]
        else:
            descs = [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)]
        self.put(descs)
        self.submit(0)
        self.wait_used()
        return self.ram[STATUS], bytes(self.ram[DATA: DATA + n]) if not write else b""


@pytest.fixture()
def env(as_root, tmp_path):
    if nbdfast.load() is None:
        pytest.fail(f"the native data path must build here: {nbdfast.why()}")
    pool = Pool.create_file(tmp_path / "pool.img", 32)
    # 8 logical blocks: lbn i -> pbn 20 - 2i for the even ones; odd ones unbacked.
    exp = Export("vm1", 8, pool, {0: 20, 2: 18, 4: 16, 6: 14}, native=True)
    srv = VhostUserServer(exp, tmp_path / "vm1.vhost.sock", "symbiont-cache")
    srv.start()
    drivers: list[Driver] = []

    def connect() -> Driver:
        d = Driver(str(srv.socket_path))
        drivers.append(d)
        return d

    yield {"pool": pool, "exp": exp, "srv": srv, "connect": connect}
    for d in drivers:
        d.close()
    srv.close()
    pool.close(detach=True)


def test_reads_and_writes_land_where_the_translation_says(env) -> None:
    d = env["connect"]()
    d.setup()
    assert struct.unpack_from("<Q", d.config(), 0)[0] == 8 * BLOCK_SIZE // 512  # capacity in sectors
    assert d.request(1, 0, b"\xab" * 65536, write=True)[0] == 0  # OUT at lbn 0
    assert d.request(1, (4 * BLOCK_SIZE + 512) // 512, b"\x5e" * 512, write=True)[0] == 0
    pool: Pool = env["pool"]
    assert pool.pread(20 * BLOCK_SIZE, 65536) == b"\xab" * 65536  # lbn 0 -> pbn 20
    assert pool.pread(16 * BLOCK_SIZE + 512, 512) == b"\x5e" * 512  # lbn 4 -> pbn 16
    assert pool.pread(19 * BLOCK_SIZE, 4096) == bytes(4096)  # nothing next door
    st, data = d.request(0, 0, 65536)  # IN
    assert st == 0 and data == b"\xab" * 65536
    st, ident = d.request(8, 0, 20)  # GET_ID
    assert st == 0 and ident.rstrip(b"\0") == b"symbiont-cache"
    assert d.request(4, 0)[0] == 0  # FLUSH
    assert d.request(99, 0)[0] == 2  # unknown type: UNSUPP
    stats = env["exp"].stats
    assert stats.writes >= 2 and stats.reads >= 1


def test_unbacked_or_out_of_range_requests_fail_whole_and_write_nothing(env) -> None:
    d = env["connect"]()
    d.setup()
    st, _ = d.request(0, BLOCK_SIZE // 512, 4096)  # lbn 1: unbacked
    assert st == 1
    # 8 KiB across lbn 0 | lbn 1: refused whole, the backed half untouched
    st, _ = d.request(1, (BLOCK_SIZE - 4096) // 512, b"\x77" * 8192, write=True)
    assert st == 1
    assert env["pool"].pread(20 * BLOCK_SIZE + BLOCK_SIZE - 4096, 4096) == bytes(4096)
    assert d.request(0, 8 * BLOCK_SIZE // 512, 512)[0] == 1  # past the end
    assert d.request(0, 0, 100)[0] == 1  # not a multiple of 512
    assert env["exp"].stats.unbacked_errors >= 2


def test_a_remap_takes_effect_for_the_next_request(env) -> None:
    d = env["connect"]()
    d.setup()
    exp: Export = env["exp"]
    exp.map_blocks({1: 25})
    assert d.request(1, BLOCK_SIZE // 512, b"\x42" * 4096, write=True)[0] == 0
    assert env["pool"].pread(25 * BLOCK_SIZE, 4096) == b"\x42" * 4096
    exp.unmap_blocks([1])
    assert d.request(0, BLOCK_SIZE // 512, 4096)[0] == 1


def test_indirect_descriptors(env) -> None:
    d = env["connect"]()
    d.setup()
    table = 0x5000
    d.ram[HDR: HDR + 16] = struct.pack("<IIQ", 1, 0, 2 * BLOCK_SIZE // 512)
    d.ram[DATA: DATA + 8192] = b"\x31" * 4096 + b"\x32" * 4096
    d.put([(HDR, 16, NEXT, 1), (DATA, 4096, NEXT, 2), (DATA + 4096, 4096, NEXT, 3), (STATUS, 1, WRITE, 0)], table)
    d.put([(table, 64, INDIRECT, 0)])
    d.submit(0)
    d.wait_used()
    assert d.ram[STATUS] == 0
    assert env["pool"].pread(18 * BLOCK_SIZE, 8192) == b"\x31" * 4096 + b"\x32" * 4096


HOSTILE = {
    "desc-outside-ram": [(RAM - 8, 16, NEXT, 1), (STATUS, 1, WRITE, 0)],
    "chain-loop": [(HDR, 16, NEXT, 1), (DATA, 512, NEXT, 0)],
    "next-out-of-ring": [(HDR, 16, NEXT, NUM + 3)],
    "readable-after-writable": [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE | NEXT, 2), (DATA, 512, 0, 0)],
    "no-status": [(HDR, 16, 0, 0)],
    "short-header": [(HDR, 8, NEXT, 1), (STATUS, 1, WRITE, 0)],
    "nested-indirect": [(0x5000, 16, INDIRECT, 0)],
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_malformed_chain_ends_that_connection_alone(env, attack: str) -> None:
    before = env["pool"].pread(20 * BLOCK_SIZE, 4096)
    d = env["connect"]()
    d.setup()
    d.ram[HDR: HDR + 16] = struct.pack("<IIQ", 1, 0, 0)
    # for nested-indirect: a table whose entry is itself an indirect table (of a valid request)
    d.ram[0x5000: 0x5010] = struct.pack("<QIHH", 0x6000, 32, INDIRECT, 0)
    d.ram[0x6000: 0x6020] = struct.pack("<QIHHQIHH", HDR, 16, NEXT, 1, STATUS, 1, WRITE, 0)
    d.put(HOSTILE[attack])
    d.submit(0)
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(50):  # the backend closes the connection; reads see EOF
            d.recv()
    assert env["pool"].pread(20 * BLOCK_SIZE, 4096) == before
    assert "malformed" in env["exp"].stats.last_error
    deadline = time.monotonic() + 5
    while env["srv"].last_drop == "" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "malformed" in env["srv"].last_drop
    d2 = env["connect"]()  # the next connection (QEMU's reconnect) is served
    d2.setup()
    assert d2.request(0, 0, 4096)[0] == 0


def test_vring_outside_guest_ram_is_refused(env) -> None:
    d = env["connect"]()
    with pytest.raises((ConnectionError, OSError)):
        d.setup(ring_uva=UVA + RAM)  # the rings would lie past the shared region
        d.recv()  # the backend closed the connection
    d2 = env["connect"]()
    d2.setup()
    assert d2.request(0, 0, 4096)[0] == 0


def test_a_peer_that_is_not_the_vms_qemu_is_refused(env) -> None:
    srv: VhostUserServer = env["srv"]
    srv.allow_peer = lambda pid: pid != os.getpid()
    d = env["connect"]()
    with pytest.raises((ConnectionError, OSError)):
        d.setup()
    assert srv.refused == 1
    srv.allow_peer = lambda pid: pid == os.getpid()
    d2 = env["connect"]()
    d2.setup()
    assert d2.request(0, 0, 4096)[0] == 0


def test_many_requests_in_flight_complete_each_once(env) -> None:
    """16 reads at once on different blocks: every head completes exactly once, with its data."""
    d = env["connect"]()
    d.setup()
    pool: Pool = env["pool"]
    for lbn, pbn in ((0, 20), (2, 18), (4, 16), (6, 14)):
        pool.pwrite(pbn * BLOCK_SIZE, bytes([lbn + 1]) * BLOCK_SIZE)
    heads = []
    # each request: hdr, data, status = 3 descriptors -> at most 5 requests in a 16-entry table
    for k in range(5):
        j = k % 4
        base = 3 * k
        d.put([(HDR + 16 * k, 16, NEXT, base + 1), (DATA + k * 65536, 65536, NEXT | WRITE, base + 2),
               (STATUS + k, 1, WRITE, 0)], DESC + 16 * base)  # fmt: skip
        d.ram[HDR + 16 * k: HDR + 16 * k + 16] = struct.pack("<IIQ", 0, 0, (2 * j * BLOCK_SIZE) // 512)
        d.ram[STATUS + k] = 0xFF
        heads.append(base)
    for h in heads:
        slot = AVAIL + 4 + 2 * (d.avail_idx % NUM)
        d.ram[slot: slot + 2] = struct.pack("<H", h)
        d.avail_idx += 1
    d.ram[AVAIL + 2: AVAIL + 4] = struct.pack("<H", d.avail_idx)
    os.eventfd_write(d.kick, 1)
    done = sorted(d.wait_used()[0] for _ in heads)
    assert done == sorted(heads)
    for k in range(5):
        j = k % 4
        assert d.ram[STATUS + k] == 0
        assert bytes(d.ram[DATA + k * 65536: DATA + k * 65536 + 65536]) == bytes([2 * j + 1]) * 65536


def test_close_ends_a_live_connection(env) -> None:
    d = env["connect"]()
    d.setup()
    t = threading.Thread(target=env["srv"].close)
    t.start()
    t.join(10)
    assert not t.is_alive()
    with pytest.raises((ConnectionError, OSError)):
        d.recv()


def test_requests_in_flight_at_a_crash_are_resubmitted_exactly_once(env) -> None:
    """The backend dies with A taken but unfinished while B, taken after A, finished (completions
    come out of order). QEMU then restarts the ring at the guest's used index, where B's avail
    slot is: without the inflight region B would be done twice and A never. With it, the next
    backend finishes A, once, and resumes after both."""
    d = env["connect"]()
    fd, size = d.get_inflight()
    d.setup(inflight=(fd, size))
    assert d.request(0, 0, 4096)[0] == 0  # one request the normal way: used idx 1
    region = mmap.mmap(fd, size)
    assert region[16] == 0 and struct.unpack_from("<H", region, 14)[0] == 1  # flag cleared, used idx 1
    d.sock.close()  # the backend "crashes" (its connection ends)
    # What the dead backend left: A (write 0x66 at lbn 2, descs 0-2) and B (read lbn 0, descs 3-5)
    # taken from avail slots 1 and 2; B completed into used slot 1; A marked in flight.
    d.ram[HDR: HDR + 16] = struct.pack("<IIQ", 1, 0, 2 * BLOCK_SIZE // 512)
    d.ram[DATA: DATA + 4096] = b"\x66" * 4096
    d.ram[STATUS] = 0xFF
    d.ram[HDR + 16: HDR + 32] = struct.pack("<IIQ", 0, 0, 0)
    d.ram[STATUS + 1] = 0
    d.put([(HDR, 16, NEXT, 1), (DATA, 4096, NEXT, 2), (STATUS, 1, WRITE, 0),
           (HDR + 16, 16, NEXT, 4), (DATA + 8192, 4096, NEXT | WRITE, 5), (STATUS + 1, 1, WRITE, 0)])  # fmt: skip
    d.ram[AVAIL + 4 + 2: AVAIL + 4 + 6] = struct.pack("<HH", 0, 3)
    d.ram[AVAIL + 2: AVAIL + 4] = struct.pack("<H", 3)
    d.ram[USED + 4 + 8: USED + 4 + 16] = struct.pack("<II", 3, 4097)
    d.ram[USED + 2: USED + 4] = struct.pack("<H", 2)
    struct.pack_into("<HH", region, 12, 3, 2)  # last_batch_head B, used_idx 2
    struct.pack_into("<BxxxxxHQ", region, 16 + 16 * 0, 1, 0, 7)  # A: in flight, taken 7th
    region.close()
    d2 = Driver(str(env["srv"].socket_path), ram_of=d)
    try:
        d2.avail_idx = 3
        d2.setup(base=2, inflight=(fd, size))  # QEMU: last avail = the guest's used index
        assert d2.wait_used() == (0, 1)  # A, resubmitted without a kick
        assert d2.ram[STATUS] == 0
        assert env["pool"].pread(18 * BLOCK_SIZE, 4096) == b"\x66" * 4096  # lbn 2 -> pbn 18
        time.sleep(0.3)
        assert struct.unpack("<H", d2.ram[USED + 2: USED + 4])[0] == 3  # B was not done again
        assert d2.request(0, 0, 4096)[0] == 0  # the ring goes on after both (avail slot 3)
    finally:
        d2.close()
        os.close(fd)


def test_regions_that_do_not_hold_what_they_claim_are_refused_not_faulted_on(env) -> None:
    """A peer's memory or inflight file shorter than the size it declares would make the backend
    fault (SIGBUS past the file's end) when it touches it: the message is refused instead. An
    inflight region sized for a smaller ring than the one started is not used (no index into it
    past its end), and the ring is served without it."""
    d = env["connect"]()
    short = os.memfd_create("short")
    os.ftruncate(short, 4096)
    d.u64(1)
    d.send(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, RAM, UVA, 0), [short])  # 8 MiB claimed
    with pytest.raises((ConnectionError, OSError)):
        d.recv()
    os.close(short)
    assert "bad vhost-user request 5" in env["exp"].stats.last_error
    # an inflight region for 4 descriptors, whose header claims a 16-entry ring with all in flight
    small = os.memfd_create("inflight")
    os.ftruncate(small, 128)
    region = mmap.mmap(small, 128)
    struct.pack_into("<QHHHH", region, 0, 0, 1, NUM, 0, 0)
    region.close()
    d2 = env["connect"]()
    d2.setup(inflight=(small, 128), inflight_queue=4)  # the ring itself has NUM = 16 entries
    assert d2.request(0, 0, 4096)[0] == 0
    assert struct.unpack("<H", d2.ram[USED + 2: USED + 4])[0] == 1  # nothing resubmitted
    os.close(small)
