"""The NBD data path on a real loop device, with QEMU's own NBD client (qemu-io) as the client.

What is checked: data lands exactly where SymFlex's translation says on the loop device;
unbacked blocks are refused with EIO and counted; remapping under the lock; the handshake
variants QEMU and others use; and a hostile client (bad magic, oversized write, truncated
frames, garbage) is dropped alone while another client keeps working.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from symbiont.ssdcache import nbdserver as nbd
from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.nbdserver import Export, IoThread, NbdServer
from symbiont.ssdcache.pool import Pool, loop_devices_of

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module", params=["native", "python"])
def env(request, as_root, tmp_path_factory):
    """Every test runs against both data paths: the C one (nbdfast) and the Python one."""
    tmp = tmp_path_factory.mktemp("nbd")
    pool = Pool.create_file(tmp / "pool.img", 32)
    io = IoThread()
    io.start()
    # vm1: 8 logical blocks, lbn i → pbn 20 - 2i for the even ones; odd ones unbacked.
    exp = Export("vm1", 8, pool, {0: 20, 2: 18, 4: 16, 6: 14}, native=request.param == "native")
    assert (exp.native is not None) == (request.param == "native")
    srv = NbdServer(exp, tmp / "vm1.sock", executor=io.executor)
    io.submit(srv.start())
    yield {"pool": pool, "exp": exp, "srv": srv, "io": io, "sock": tmp / "vm1.sock", "tmp": tmp, "path": request.param}
    io.submit(srv.close())
    io.stop()
    dev = pool.device
    pool.close(detach=True)
    assert dev not in loop_devices_of(tmp / "pool.img")
    (tmp / "pool.img").unlink()


def qemu_io(sock: Path, *cmds: str, export: str = "vm1") -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw", f"nbd+unix:///{export}?socket={sock}"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def test_writes_land_where_the_translation_says(env) -> None:
    r = qemu_io(env["sock"], "write -P 0xab 0 1M", "write -P 0xcd 2M 4k", "write -P 0x5e 4194816 512", "flush")
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    pool: Pool = env["pool"]
    assert pool.pread(20 * BLOCK_SIZE, BLOCK_SIZE) == b"\xab" * BLOCK_SIZE  # lbn 0 → pbn 20
    assert pool.pread(18 * BLOCK_SIZE, 4096) == b"\xcd" * 4096  # lbn 2 → pbn 18
    # sector 8193 = lbn 4, offset 1 → physical sector 16·2048 + 1
    assert pool.pread((16 * 2048 + 1) * 512, 512) == b"\x5e" * 512
    assert pool.pread(19 * BLOCK_SIZE, 4096) == bytes(4096)  # nothing leaked next door
    r = qemu_io(env["sock"], "read -P 0xab 0 1M", "read -P 0xcd 2M 4k", "read -P 0x5e 4194816 512")
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_unbacked_blocks_are_refused_and_counted(env) -> None:
    st = env["exp"].stats
    before = st.unbacked_errors
    r = qemu_io(env["sock"], "read 1M 4k")
    assert "Input/output error" in r.stdout + r.stderr
    r = qemu_io(env["sock"], "write -P 0x11 1M 4k")
    assert "Input/output error" in r.stdout + r.stderr
    # A request spanning a backed and an unbacked block is refused whole: nothing is written.
    r = qemu_io(env["sock"], "write -P 0x77 1044480 8k")
    assert "Input/output error" in r.stdout + r.stderr
    assert env["pool"].pread(20 * BLOCK_SIZE + 1044480, 4096) == b"\xab" * 4096
    assert st.unbacked_errors == before + 3


def test_remapping_takes_effect_for_the_next_request(env) -> None:
    exp: Export = env["exp"]
    exp.map_blocks({1: 3})
    r = qemu_io(env["sock"], "write -P 0x42 1M 64k", "read -P 0x42 1M 64k")
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout
    assert env["pool"].pread(3 * BLOCK_SIZE, 16) == b"\x42" * 16
    assert exp.unmap_blocks([1]) == {1: 3}
    assert "Input/output error" in qemu_io(env["sock"], "read 1M 4k").stdout


def test_out_of_range_and_zero_writes(env) -> None:
    r = qemu_io(env["sock"], "write -z 0 64k", "read -P 0 0 64k")
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout
    sock = raw_session(env["sock"])
    assert request(sock, nbd.CMD_READ, 8 * BLOCK_SIZE, 4096)[0] == 22  # EINVAL past the end
    assert request(sock, nbd.CMD_WRITE, 8 * BLOCK_SIZE - 512, 1024, b"x" * 1024)[0] == 28  # ENOSPC
    assert request(sock, nbd.CMD_READ, 0, 0)[0] == 22
    assert request(sock, 99, 0, 512)[0] == 22  # unknown command: EINVAL, connection kept
    err, data = request(sock, nbd.CMD_READ, 0, 512)
    assert err == 0 and data == bytes(512)
    assert request(sock, nbd.CMD_FLUSH, 0, 0)[0] == 0
    assert request(sock, nbd.CMD_TRIM, 0, 4096)[0] == 0
    sock.close()


# -- a hand-written client: handshakes and attacks --------------------------------------------
def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def greet(s: socket.socket, flags: int = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES) -> None:
    hello = recv_exact(s, 18)
    assert hello[:8] == b"NBDMAGIC" and struct.unpack(">QH", hello[8:]) == (nbd.IHAVEOPT, 3)
    s.sendall(struct.pack(">I", flags))


def option(s: socket.socket, opt: int, data: bytes = b"") -> None:
    s.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)


def replies(s: socket.socket, until: set[int]) -> list[tuple[int, bytes]]:
    out = []
    while True:
        magic, _opt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == nbd.REPLY_MAGIC
        out.append((rtype, recv_exact(s, n)))
        if rtype in until or rtype >= 1 << 31:
            return out


def go(s: socket.socket, name: bytes = b"vm1", infos: tuple[int, ...] = (nbd.INFO_BLOCK_SIZE,)) -> list:
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + struct.pack(f">{len(infos)}H", *infos)
    option(s, nbd.OPT_GO, data)
    return replies(s, {nbd.REP_ACK})


def raw_session(path: Path) -> socket.socket:
    s = connect(path)
    greet(s)
    got = go(s)
    assert got[-1][0] == nbd.REP_ACK
    return s


def request(s: socket.socket, cmd: int, offset: int, length: int, payload: bytes = b"") -> tuple[int, bytes]:
    s.sendall(struct.pack(">IHH8sQI", nbd.REQUEST_MAGIC, 0, cmd, b"handle01", offset, length) + payload)
    magic, err, handle = struct.unpack(">II8s", recv_exact(s, 16))
    assert magic == nbd.SIMPLE_REPLY_MAGIC and handle == b"handle01"
    data = recv_exact(s, length) if cmd == nbd.CMD_READ and not err else b""
    return err, data


def test_handshake_options(env) -> None:
    s = connect(env["sock"])
    greet(s)
    option(s, 8)  # STRUCTURED_REPLY: not supported, client falls back to simple replies
    assert replies(s, set())[0][0] == nbd.REP_ERR_UNSUP
    option(s, nbd.OPT_LIST)
    got = replies(s, {nbd.REP_ACK})
    assert got[0][0] == nbd.REP_SERVER and got[0][1][4:] == b"vm1"
    assert go(s, b"nope")[-1][0] == nbd.REP_ERR_UNKNOWN
    option(s, nbd.OPT_INFO, b"\x00\x00")  # malformed INFO: an error reply, not a disconnect
    assert replies(s, set())[0][0] == nbd.REP_ERR_INVALID
    got = go(s)
    info = {struct.unpack(">H", d[:2])[0]: d for t, d in got if t == nbd.REP_INFO}
    assert struct.unpack(">HQH", info[nbd.INFO_EXPORT])[1] == 8 * BLOCK_SIZE
    assert struct.unpack(">HIII", info[nbd.INFO_BLOCK_SIZE])[1:] == (512, 4096, nbd.MAX_REQUEST)
    assert request(s, nbd.CMD_READ, 0, 4096)[0] == 0
    s.close()
    # The old way: EXPORT_NAME (with the 124 zero bytes when NO_ZEROES was not agreed).
    s = connect(env["sock"])
    greet(s, nbd.FLAG_FIXED_NEWSTYLE)
    option(s, nbd.OPT_EXPORT_NAME, b"vm1")
    size, flags = struct.unpack(">QH", recv_exact(s, 10))
    assert size == 8 * BLOCK_SIZE and flags & nbd.TF_SEND_FLUSH and recv_exact(s, 124) == bytes(124)
    assert request(s, nbd.CMD_READ, 0, 512)[0] == 0
    s.close()


def closed_by_server(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


ATTACKS = {
    "bad-client-flags": lambda s: s.sendall(struct.pack(">I", 0xFFFF)),
    "bad-option-magic": lambda s: (greet(s), s.sendall(b"\x00" * 16)),
    "huge-option": lambda s: (greet(s), s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 1 << 30))),
    "unknown-export-name": lambda s: (greet(s), option(s, nbd.OPT_EXPORT_NAME, b"other")),
    "bad-request-magic": lambda s: (greet(s), go(s), s.sendall(b"\xde\xad\xbe\xef" * 7)),
    "oversized-write": lambda s: (greet(s), go(s), s.sendall(struct.pack(
        ">IHH8sQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, b"h" * 8, 0, 1 << 31))),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_malformed_client_is_dropped_alone(env, attack: str) -> None:
    good = raw_session(env["sock"])  # another client, connected before and during the attack
    st = env["exp"].stats
    errors = st.protocol_errors
    s = connect(env["sock"])
    if attack == "bad-client-flags":
        recv_exact(s, 18)
    ATTACKS[attack](s)
    assert closed_by_server(s)
    deadline = time.monotonic() + 5
    while st.protocol_errors == errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.protocol_errors == errors + 1
    assert request(good, nbd.CMD_READ, 0, 4096)[0] == 0  # the other client is unaffected
    good.close()
    assert qemu_io(env["sock"], "read 0 4k").returncode == 0  # and new clients are served


def test_truncated_handshake_times_out_alone(env) -> None:
    srv: NbdServer = env["srv"]
    old = srv.handshake_timeout
    srv.handshake_timeout = 0.5
    try:
        s = connect(env["sock"])
        recv_exact(s, 18)
        s.sendall(b"\x00\x00")  # half of the client flags, then silence
        assert closed_by_server(s, 5)
    finally:
        srv.handshake_timeout = old
    assert qemu_io(env["sock"], "read 0 4k").returncode == 0


def test_too_many_clients_are_turned_away(env) -> None:
    conns = [raw_session(env["sock"]) for _ in range(nbd.MAX_CLIENTS)]
    extra = connect(env["sock"])
    assert closed_by_server(extra, 5)
    assert env["exp"].stats.rejected_clients >= 1
    for c in conns:
        c.close()


# -- the native data path -----------------------------------------------------------------------
def test_a_connection_is_served_by_the_path_under_test(env) -> None:
    st = env["exp"].stats
    deadline = time.monotonic() + 5
    while st.active_clients and time.monotonic() < deadline:  # the last test's clients are leaving
        time.sleep(0.05)
    s = raw_session(env["sock"])
    assert request(s, nbd.CMD_READ, 0, 4096)[0] == 0  # answered: the transmission phase is running
    assert st.native_clients == (1 if env["path"] == "native" else 0)
    s.sendall(struct.pack(">IHH8sQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, b"h" * 8, 0, 0))
    assert closed_by_server(s)
    deadline = time.monotonic() + 5
    while st.native_clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.native_clients == 0


def test_requests_in_flight_at_once_land_where_the_translation_says(env) -> None:
    """16 requests in flight (qemu-img bench -d 16): every 4 KiB of lbn 6 lands on pbn 14."""
    uri = f"nbd+unix:///vm1?socket={env['sock']}"
    r = subprocess.run(["qemu-img", "bench", "-f", "raw", "-w", "-d", "16", "-c", "256", "-s", "4096",
                        "--pattern", "0x3c", "-o", str(6 * BLOCK_SIZE), uri], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert env["pool"].pread(14 * BLOCK_SIZE, BLOCK_SIZE) == b"\x3c" * BLOCK_SIZE
    r = subprocess.run(["qemu-img", "bench", "-f", "raw", "-d", "16", "-c", "16", "-s", "65536",
                        "-o", str(6 * BLOCK_SIZE), uri], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = qemu_io(env["sock"], "read -P 0x3c 6M 1M")
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    # 2 MiB across two blocks far apart on the pool (lbn 0 → pbn 20, lbn 1 → pbn 3): the native
    # path sends large requests to the pool as parallel chunks and streams a lone read.
    exp: Export = env["exp"]
    exp.map_blocks({1: 3})
    try:
        r = qemu_io(env["sock"], "write -P 0x6d 0 2M", "read -P 0x6d 0 2M", "read -P 0x3c 6M 1M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
        assert "error" not in r.stdout.lower(), r.stdout
        assert env["pool"].pread(20 * BLOCK_SIZE, BLOCK_SIZE) == b"\x6d" * BLOCK_SIZE
        assert env["pool"].pread(3 * BLOCK_SIZE, BLOCK_SIZE) == b"\x6d" * BLOCK_SIZE
    finally:
        exp.unmap_blocks([1])
    r = qemu_io(env["sock"], "read 0 2M")  # half of it unbacked now: refused whole
    assert "Input/output error" in r.stdout + r.stderr


def test_large_reads_in_flight_together_return_each_its_own_block(env) -> None:
    """Reads of whole blocks (and a part of one) with others in flight: on the native path they
    go pool -> pipe -> socket (splice) and must still carry each the bytes its block holds."""
    pats = {0: 0x11, 2: 0x22, 4: 0x44, 6: 0x66}
    r = qemu_io(env["sock"], *(f"write -P {p:#x} {lbn}M 1M" for lbn, p in pats.items()))
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    before = env["exp"].stats.spliced_reads
    reads = [f"aio_read -P {p:#x} {lbn}M 1M" for lbn, p in pats.items()] + ["aio_read -P 0x44 4352k 512k"]
    r = qemu_io(env["sock"], *(reads * 4), "aio_flush")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" not in r.stdout.lower() and "error" not in r.stdout.lower(), r.stdout
    assert r.stdout.count("read 1048576/1048576") == 16, r.stdout
    if env["path"] == "native":
        assert env["exp"].stats.spliced_reads > before  # the splice path served some of them
    r = qemu_io(env["sock"], "aio_read 0 1M", "aio_read 1M 1M", "aio_flush")  # lbn 1 is unbacked
    assert "Input/output error" in r.stdout + r.stderr


def test_a_remap_under_load_waits_for_requests_in_flight(env) -> None:
    """While a client keeps 16 reads of lbn 0 in flight, lbn 1 is mapped and unmapped again and
    again: no read of the backed block fails, each commit is short, and once an unmap returned
    the block is refused."""
    exp: Export = env["exp"]
    uri = f"nbd+unix:///vm1?socket={env['sock']}"
    times: list[float] = []
    stop = threading.Event()

    def remap() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            exp.map_blocks({1: 3})
            exp.unmap_blocks([1])
            times.append(time.perf_counter() - t0)

    th = threading.Thread(target=remap)
    th.start()
    try:
        for _ in range(8):  # 256 x 4 KiB = all of lbn 0, 16 at a time
            r = subprocess.run(["qemu-img", "bench", "-f", "raw", "-d", "16", "-c", "256", "-s", "4096", uri],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        stop.set()
        th.join()
    assert len(times) > 10 and sorted(times)[len(times) // 2] < 0.020, times[:20]
    assert "Input/output error" in qemu_io(env["sock"], "read 1M 4k").stdout


def test_a_client_that_stops_reading_does_not_hold_up_a_remap(env) -> None:
    """An 8 MiB read whose reply the client does not read (more than the socket buffer holds:
    wmem_max 4 MiB, doubled): the reply waits, a resize does not."""
    exp: Export = env["exp"]
    extra = {1: 3, 3: 5, 5: 7, 7: 9}  # now all 8 logical blocks are backed
    exp.map_blocks(extra)
    s = raw_session(env["sock"])
    try:
        s.sendall(struct.pack(">IHH8sQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, b"stalled!", 0, 8 * BLOCK_SIZE))
        time.sleep(0.5)  # the server has read the chunks and is stuck sending
        t0 = time.perf_counter()
        done = threading.Event()
        th = threading.Thread(target=lambda: (exp.unmap_blocks([7]), exp.map_blocks({7: 9}), done.set()))
        th.start()
        assert done.wait(5), "the remap waited for a client that does not read"
        assert time.perf_counter() - t0 < 1.0
        magic, err, handle = struct.unpack(">II8s", recv_exact(s, 16))
        assert (magic, err, handle) == (nbd.SIMPLE_REPLY_MAGIC, 0, b"stalled!")
        data = recv_exact(s, 8 * BLOCK_SIZE)
        assert data == b"".join(env["pool"].pread(exp.map[lbn] * BLOCK_SIZE, BLOCK_SIZE) for lbn in range(8))
        assert request(s, nbd.CMD_READ, 0, 4096)[0] == 0  # and the connection goes on
        th.join()
    finally:
        s.close()
        exp.unmap_blocks(list(extra))


def test_without_a_compiler_the_python_path_serves() -> None:
    """A failed build (here: CC=false, no gcc on PATH) leaves the Python data path, with the reason."""
    code = ("from symbiont.ssdcache import nbdfast; lib = nbdfast.load(); "
            "print(lib is None, nbdfast.why())")
    for env, why in ((dict(os.environ, CC="/bin/false"), "compiling nbdfast.c failed"),
                     (dict(os.environ, CC="cc", PATH="/nonexistent"), "no C compiler")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert out.stdout.startswith("True") and why in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, SYMBIONT_NATIVE_NBD="0"))  # fmt: skip
    assert out.stdout.startswith("True") and "SYMBIONT_NATIVE_NBD=0" in out.stdout, out.stdout + out.stderr
