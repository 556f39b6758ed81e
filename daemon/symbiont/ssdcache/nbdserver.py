"""A userspace NBD server (asyncio) serving one VM's elastic disk from the pool.

Why: the host kernel has neither device-mapper nor the NBD module, and QEMU's NBD client
cannot resize a disk. So each VM's virtual SSD is an NBD export of a fixed ``size`` on a unix
socket, which QEMU (attached through libvirt) connects to; every request is translated lbn→pbn
onto the pool's block device, exactly as SymFlex's back-end driver does:
``sector s → lbn = s // 2048, offset = s % 2048 → physical sector = pbn·2048 + offset``.
I/O touching an unbacked logical block is refused with ``EIO`` (and counted); nothing of such
a request is read or written.

Protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): fixed newstyle
handshake with ``NBD_FLAG_NO_ZEROES``; options ``NBD_OPT_GO``, ``NBD_OPT_INFO``,
``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_LIST``, ``NBD_OPT_ABORT`` (anything else: ``NBD_REP_ERR_UNSUP``,
so clients fall back to simple replies); commands READ, WRITE (with FUA), FLUSH, TRIM,
WRITE_ZEROES and DISC.

The client (QEMU, on behalf of the guest) is untrusted: the handshake has a deadline and a
bounded number of options of bounded length, requests are bounded (32 MiB), and anything
malformed — a bad magic, an oversized write, a truncated frame — drops *that client only*; the
server and every other connection go on.

Concurrency: servers run on one event loop in a thread of their own (:class:`IoThread`), so
the daemon's control loop never waits behind guest I/O. The handshake (and the export-name
check) is Python's; the transmission phase runs in C (:mod:`symbiont.ssdcache.nbdfast`, a thread
per connection with the GIL released, workers per request) whenever that builds, else in Python
(asyncio + a thread pool). Either way, translation and the positioned read/write of a request
happen under the export's shared lock (the Python :class:`RWLock` or the native rwlock), which
:meth:`Export.map_blocks`/:meth:`Export.unmap_blocks` take exclusively: once a block is unmapped,
no request can still be using it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import os
import socket
import struct
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symbiont.ssdcache import nbdfast
from symbiont.ssdcache.layout import BLOCK_SHIFT, BLOCK_SIZE, UNBACKED, Unbacked, translate_range
from symbiont.ssdcache.pool import BUFFERS, Pool

log = logging.getLogger(__name__)

# -- protocol constants ------------------------------------------------------------------
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_NAMES = {0: "read", 1: "write", 2: "disc", 3: "flush", 4: "trim", 6: "write_zeroes"}

CMDFLAG_FUA = 1 << 0
CMDFLAG_NO_HOLE = 1 << 1
CMDFLAGS_KNOWN = CMDFLAG_FUA | CMDFLAG_NO_HOLE

REQUEST = struct.Struct(">IHH8sQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">II8s")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")

# -- limits (the client is untrusted) ----------------------------------------------------
MAX_REQUEST = 32 << 20  # largest READ/WRITE payload; advertised as the maximum block size
MAX_OPTION_DATA = 8192  # NBD strings are at most 4096 bytes
MAX_OPTIONS = 64  # options per handshake
HANDSHAKE_TIMEOUT_S = 10.0
MAX_CLIENTS = 4  # per export: QEMU uses one
SOCKET_BUFFER = 4 << 20
MAX_INFLIGHT = 16  # requests of one client served at once
NATIVE_THREADS = 16  # native workers per connection: QEMU's NBD client keeps at most 16 requests in flight


class ClientError(Exception):
    """The client broke the protocol: drop its connection."""


# Counters that the native data path (``nbdfast``) keeps too: reading one sums both paths.
IO_COUNTERS = ("reads", "writes", "flushes", "trims", "zeroes", "read_bytes", "write_bytes",
               "unbacked_errors", "io_errors", "invalid_requests", "spliced_reads")  # fmt: skip


@dataclass
class ExportStats:
    connections: int = 0
    active_clients: int = 0
    native_clients: int = 0  # connections whose transmission phase runs in C
    rejected_clients: int = 0
    protocol_errors: int = 0
    py_last_error: str = ""
    py: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IO_COUNTERS, 0))  # Python path
    native: Any = None  # the export's NativeExport, if any
    window: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, ops, rbytes, wbytes)

    def count(self, name: str, n: int = 1) -> None:
        self.py[name] += n

    def counters(self) -> dict[str, int]:
        out = dict(self.py)
        if self.native is not None:
            for k, v in self.native.stats().items():
                out[k] += v
        return out

    def __getattr__(self, name: str) -> Any:  # st.reads, st.unbacked_errors, ...: both paths
        if name in IO_COUNTERS:
            return self.counters()[name]
        raise AttributeError(name)

    py_error_seq: int = 0  # the native path's error count when py_last_error was set

    @property
    def last_error(self) -> str:
        """The most recent error of either path."""
        if self.native is not None:
            seq, msg = self.native.last_error()
            if seq > self.py_error_seq or not self.py_last_error:
                return msg
        return self.py_last_error

    @last_error.setter
    def last_error(self, value: str) -> None:
        self.py_last_error = value
        self.py_error_seq = self.native.last_error()[0] if self.native is not None else 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in ("connections", "active_clients", "native_clients",
                                                           "rejected_clients", "protocol_errors")}
        d.update(self.counters())
        d["last_error"] = self.last_error
        d["throughput"] = self.rate()
        return d

    def sample(self) -> None:
        """Remember the counters now (for :meth:`rate`); called once per control period."""
        c = self.counters()
        self.window.append((time.monotonic(), c["reads"] + c["writes"], c["read_bytes"], c["write_bytes"]))
        del self.window[:-16]

    def rate(self) -> dict[str, float]:
        """ops/s and bytes/s over the last sampled interval."""
        if len(self.window) < 2:
            return {"ops_per_s": 0.0, "read_bytes_per_s": 0.0, "write_bytes_per_s": 0.0}
        (t0, o0, r0, w0), (t1, o1, r1, w1) = self.window[-2], self.window[-1]
        dt = max(t1 - t0, 1e-6)
        return {"ops_per_s": (o1 - o0) / dt, "read_bytes_per_s": (r1 - r0) / dt, "write_bytes_per_s": (w1 - w0) / dt}


class RWLock:
    """Many I/O requests at once (shared), or one remap (exclusive); a waiting remap goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Export:
    """One VM's virtual SSD: ``size_blocks`` logical blocks, some backed by pool blocks."""

    def __init__(self, name: str, size_blocks: int, pool: Pool, mapping: dict[int, int] | None = None,
                 read_only: bool = False, native: bool | None = None) -> None:
        """``native``: serve the transmission phase in C (:mod:`nbdfast`); None: when it builds."""
        if size_blocks < 1:
            raise ValueError("an export needs at least one block")
        self.name = name
        self.size_blocks = size_blocks
        self.size = size_blocks << BLOCK_SHIFT
        self.pool = pool
        self.read_only = read_only
        self.map = array("q", [UNBACKED]) * size_blocks
        self.last_access = array("d", [0.0]) * size_blocks
        self.lock = RWLock()
        self.stats = ExportStats()
        for lbn, pbn in (mapping or {}).items():
            self.map[lbn] = pbn
        self.native: nbdfast.NativeExport | None = None
        lib = nbdfast.load() if native is not False else None
        if native and lib is None:
            raise RuntimeError(f"native NBD data path unavailable: {nbdfast.why()}")
        if lib is not None:
            self.native = nbdfast.NativeExport(lib, self.map, self.last_access, size_blocks, pool.fd, pool.dfd,
                                               read_only, pool.nblocks << BLOCK_SHIFT, MAX_REQUEST)
            self.stats.native = self.native

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Both data paths stopped: the Python one (RWLock) and the native one (its rwlock)."""
        with self.lock.exclusive(), (self.native.exclusive() if self.native is not None else contextlib.nullcontext()):
            yield

    def set_direct(self, direct: bool) -> None:
        """Use the pool's O_DIRECT descriptor for aligned I/O (default) or go through the page
        cache (benchmarks: the warm pairing)."""
        if self.native is not None:
            self.native.set_fds(self.pool.fd, self.pool.dfd if direct else -1)

    # -- map (controller side; caller holds no lock) -------------------------------------
    def pbn_of(self, lbn: int) -> int:
        return self.map[lbn] if 0 <= lbn < self.size_blocks else UNBACKED

    def backed(self) -> list[int]:
        return [lbn for lbn in range(self.size_blocks) if self.map[lbn] >= 0]

    def map_blocks(self, pairs: dict[int, int]) -> None:
        with self._exclusive():
            for lbn, pbn in pairs.items():
                self.map[lbn] = pbn
                self.last_access[lbn] = 0.0

    def unmap_blocks(self, lbns: list[int]) -> dict[int, int]:
        """Unmap under the exclusive lock: when this returns, no request is using these blocks."""
        out = {}
        with self._exclusive():
            for lbn in lbns:
                if self.map[lbn] >= 0:
                    out[lbn] = self.map[lbn]
                    self.map[lbn] = UNBACKED
        return out

    def coldest(self, n: int, exclude: set[int] | None = None) -> list[int]:
        """The ``n`` backed logical blocks least recently accessed (host-side view)."""
        ex = exclude or set()
        cands = [lbn for lbn in range(self.size_blocks) if self.map[lbn] >= 0 and lbn not in ex]
        cands.sort(key=lambda lbn: (self.last_access[lbn], lbn))
        return cands[:n]

    # -- data path (server side) ----------------------------------------------------------
    def read(self, offset: int, length: int, headroom: int = 0) -> memoryview:
        """Read a virtual byte range into a fresh page-aligned buffer, after ``headroom`` bytes
        left free for the reply header (so header and data leave in one send)."""
        pad = -headroom % 4096 + headroom if headroom else 0
        buf = BUFFERS.get(pad + length)
        mv = memoryview(buf)
        now = time.monotonic()
        with self.lock.shared():
            pieces = translate_range(offset, length, self.pbn_of)
            for phys, boff, n in pieces:
                self.pool.read_into(mv[pad + boff : pad + boff + n], phys)
            self._touch(offset, length, now)
        return mv[pad - headroom : pad + length]

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        mv = memoryview(data)
        now = time.monotonic()
        with self.lock.shared():
            pieces = translate_range(offset, len(mv), self.pbn_of)
            for phys, boff, n in pieces:
                self.pool.pwrite(phys, mv[boff : boff + n])
            self._touch(offset, len(mv), now)
        if fua:
            self.pool.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        now = time.monotonic()
        with self.lock.shared():
            pieces = translate_range(offset, length, self.pbn_of)
            for phys, _boff, n in pieces:
                left, pos = n, phys
                while left:
                    k = min(left, BLOCK_SIZE)
                    self.pool.pwrite(pos, bytes(k))
                    pos += k
                    left -= k
            self._touch(offset, length, now)
        if fua:
            self.pool.flush()

    def _touch(self, offset: int, length: int, now: float) -> None:
        first = offset >> BLOCK_SHIFT
        last = (offset + length - 1) >> BLOCK_SHIFT
        for lbn in range(first, last + 1):
            self.last_access[lbn] = now


class NbdServer:
    """Serves one :class:`Export` on a unix socket (call from the I/O loop)."""

    def __init__(self, export: Export, socket_path: str | Path, *, socket_mode: int = 0o660,
                 socket_gid: int | None = None, max_clients: int = MAX_CLIENTS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 on_disconnect: Callable[[str], None] | None = None,
                 executor: ThreadPoolExecutor | None = None, export_name: str | None = None,
                 native_threads: int = NATIVE_THREADS) -> None:
        """``export_name``: the only name a client may open (the VM's credential: no default
        export, no listing); None serves ``export.name`` and the default name (tests, tools).
        ``native_threads``: workers per connection when the export has the native data path."""
        self.native_threads = native_threads
        self._native_fds: set[int] = set()
        self.export = export
        self.export_name = export_name
        self.executor = executor
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.on_disconnect = on_disconnect
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def stats(self) -> ExportStats:
        return self.export.stats

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.socket_path))
        os.chmod(self.socket_path, self.socket_mode)
        if self.socket_gid is not None:
            os.chown(self.socket_path, -1, self.socket_gid)
        log.info("export %s: NBD on %s (%d MiB)", self.export.name, self.socket_path, self.export.size >> 20)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for fd in list(self._native_fds):  # native connections: their threads see EOF and return
            _shutdown(fd)
        for t in list(self._clients):
            t.cancel()
        for t in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        st = self.stats
        if st.active_clients >= self.max_clients:
            st.rejected_clients += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        st.connections += 1
        st.active_clients += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:  # a 1 MiB read reply leaves in one send, not in 5 partial ones
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        try:
            await self._serve(reader, writer)
        except (ClientError, asyncio.IncompleteReadError, TimeoutError) as exc:
            st.protocol_errors += 1
            st.last_error = msg = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("export %s: dropping client: %s", self.export.name, msg)
        except (ConnectionError, BrokenPipeError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            st.active_clients -= 1
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if self.on_disconnect is not None:
                with contextlib.suppress(Exception):
                    self.on_disconnect(self.export.name)

    # -- handshake ------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(self.handshake_timeout):
            no_zeroes = await self._handshake(reader, writer)
        if no_zeroes is None:
            return
        if self.export.native is not None:
            await self._native_transmission(reader, writer)
        else:
            await self._transmission(reader, writer)

    async def _native_transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand the connected socket to the C data path (its own thread, the GIL released) and
        wait for the connection to end. A protocol error there drops this client, as here."""
        native = self.export.native
        assert native is not None
        await writer.drain()
        writer.transport.pause_reading()
        prefix = bytes(reader._buffer)  # noqa: SLF001 -- requests the client pipelined behind the handshake
        reader._buffer.clear()  # noqa: SLF001
        sock = writer.get_extra_info("socket")
        fd = os.dup(sock.fileno())
        os.set_blocking(fd, True)  # the asyncio transport is paused: the C workers block on it
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()

        def run() -> None:
            why: str | None = None
            err: BaseException | None = None
            try:
                why = native.serve(fd, prefix, self.native_threads)
            except BaseException as exc:  # noqa: BLE001 -- reported to the awaiting task
                err = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(_settle, done, why, err)

        self._native_fds.add(fd)
        self.stats.native_clients += 1
        try:
            threading.Thread(target=run, name=f"nbd-{self.export.name}", daemon=True).start()
            try:
                why = await asyncio.shield(done)
            except asyncio.CancelledError:
                _shutdown(fd)
                with contextlib.suppress(Exception):
                    await done  # the workers return once the socket is shut down
                raise
            if why:
                raise ClientError(why)
        finally:
            self.stats.native_clients -= 1
            self._native_fds.discard(fd)
            if done.done():
                os.close(fd)

    def _tflags(self) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        if self.export.read_only:
            f |= TF_READ_ONLY
        return f

    def _name_ok(self, name: bytes) -> bool:
        if self.export_name is not None:
            return hmac.compare_digest(name, self.export_name.encode())
        return name in (b"", self.export.name.encode())

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool | None:
        """Returns True/False (no-zeroes) when transmission starts, None when the client left."""
        writer.write(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        (cflags,) = struct.unpack(">I", await reader.readexactly(4))
        if cflags & ~CLIENT_FLAGS_KNOWN:
            raise ClientError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = OPTION.unpack(await reader.readexactly(OPTION.size))
            if magic != IHAVEOPT:
                raise ClientError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise ClientError(f"option {opt} with {length} bytes of data")
            data = await reader.readexactly(length) if length else b""
            if opt == OPT_EXPORT_NAME:
                if not self._name_ok(data):
                    raise ClientError(f"unknown export {data[:64]!r}")
                writer.write(struct.pack(">QH", self.export.size, self._tflags()))
                if not no_zeroes:
                    writer.write(bytes(124))
                await writer.drain()
                return no_zeroes
            if opt == OPT_ABORT:
                self._opt_reply(writer, opt, REP_ACK)
                await writer.drain()
                return None
            if opt == OPT_LIST:
                if data:
                    self._opt_reply(writer, opt, REP_ERR_INVALID, b"LIST takes no data")
                else:
                    if self.export_name is None:  # a named export is a secret: never listed
                        name = self.export.name.encode()
                        self._opt_reply(writer, opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                    self._opt_reply(writer, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                go = self._info(writer, opt, data)
                await writer.drain()
                if go and opt == OPT_GO:
                    return no_zeroes
            else:
                self._opt_reply(writer, opt, REP_ERR_UNSUP, b"unsupported option")
            await writer.drain()
        raise ClientError(f"more than {MAX_OPTIONS} options")

    def _opt_reply(self, writer: asyncio.StreamWriter, opt: int, rtype: int, data: bytes = b"") -> None:
        writer.write(OPTION_REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _info(self, writer: asyncio.StreamWriter, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            self._opt_reply(writer, opt, REP_ERR_INVALID, b"short INFO/GO request")
            return False
        (nlen,) = struct.unpack_from(">I", data, 0)
        if 4 + nlen + 2 > len(data):
            self._opt_reply(writer, opt, REP_ERR_INVALID, b"bad name length")
            return False
        name = data[4 : 4 + nlen]
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            self._opt_reply(writer, opt, REP_ERR_INVALID, b"bad information request count")
            return False
        reqs = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        if not self._name_ok(name):
            self._opt_reply(writer, opt, REP_ERR_UNKNOWN, b"no such export")
            return False
        self._opt_reply(writer, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.export.size, self._tflags()))
        if INFO_BLOCK_SIZE in reqs:
            self._opt_reply(writer, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 512, 4096, MAX_REQUEST))
        if INFO_NAME in reqs:
            n = name or self.export.name.encode()
            self._opt_reply(writer, opt, REP_INFO, struct.pack(">H", INFO_NAME) + n)
        self._opt_reply(writer, opt, REP_ACK)
        return True

    # -- transmission ---------------------------------------------------------------------
    async def _transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read requests in order; run up to ``MAX_INFLIGHT`` at once in the I/O thread pool
        (positioned reads and writes release the GIL); reply as each completes (replies carry
        the request's handle, so their order does not matter)."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(MAX_INFLIGHT)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    hdr = await reader.readexactly(REQUEST.size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise
                    return  # closed between two requests (no DISC): it just left
                magic, flags, cmd, handle, offset, length = REQUEST.unpack(hdr)
                if magic != REQUEST_MAGIC:
                    raise ClientError(f"bad request magic {magic:#x}")
                payload = b""
                if cmd == CMD_WRITE:
                    if length > MAX_REQUEST:
                        raise ClientError(f"write of {length} bytes exceeds {MAX_REQUEST}")
                    payload = await reader.readexactly(length)
                if cmd == CMD_DISC:
                    if running:
                        await asyncio.gather(*running, return_exceptions=True)
                    return
                err = self._validate(cmd, flags, offset, length)
                if err:
                    writer.write(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
                    await writer.drain()
                    continue
                await slots.acquire()
                if self.executor is None:  # inline: one request at a time, no thread hand-off
                    await self._request(writer, slots, cmd, flags, handle, offset, length, payload)
                    continue
                task = loop.create_task(self._request(writer, slots, cmd, flags, handle, offset, length, payload))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for t in running:
                t.cancel()

    async def _request(self, writer: asyncio.StreamWriter, slots: asyncio.Semaphore, cmd: int, flags: int,
                       handle: bytes, offset: int, length: int, payload: bytes) -> None:
        exp = self.export
        st = exp.stats
        try:
            err = 0
            reply: memoryview | None = None
            try:
                if self.executor is None:
                    reply = self._do(cmd, flags, offset, length, payload)
                else:
                    reply = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self._do, cmd, flags, offset, length, payload)
            except Unbacked as exc:
                err = errno.EIO
                st.count("unbacked_errors", 1)
                st.last_error = f"{CMD_NAMES.get(cmd, cmd)} {offset}+{length}: {exc}"
            except OSError as exc:
                err = errno.EIO
                st.count("io_errors", 1)
                st.last_error = f"{CMD_NAMES.get(cmd, cmd)} {offset}+{length}: {exc}"
                log.warning("export %s: %s", exp.name, st.last_error)
            if not err:
                if cmd == CMD_READ:
                    st.count("reads", 1)
                    st.count("read_bytes", length)
                elif cmd == CMD_WRITE:
                    st.count("writes", 1)
                    st.count("write_bytes", length)
                elif cmd == CMD_FLUSH:
                    st.count("flushes", 1)
                elif cmd == CMD_TRIM:
                    st.count("trims", 1)
                elif cmd == CMD_WRITE_ZEROES:
                    st.count("zeroes", 1)
            if reply is not None and not err:
                SIMPLE_REPLY.pack_into(reply, 0, SIMPLE_REPLY_MAGIC, 0, handle)
                writer.write(reply)
                if writer.transport.get_write_buffer_size() == 0:
                    # Sent in full: the transport keeps no reference, the buffer can be reused.
                    buf = reply.obj
                    reply.release()
                    BUFFERS.put(buf)  # type: ignore[arg-type]
            else:
                writer.write(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
            with contextlib.suppress(ConnectionError):
                await writer.drain()  # returns at once unless the client stopped reading
        finally:
            slots.release()

    def _do(self, cmd: int, flags: int, offset: int, length: int, payload: bytes) -> memoryview | None:
        """One request's I/O (in a pool thread)."""
        exp = self.export
        fua = bool(flags & CMDFLAG_FUA)
        if cmd == CMD_READ:
            return exp.read(offset, length, headroom=SIMPLE_REPLY.size)
        if cmd == CMD_WRITE:
            exp.write(offset, payload, fua)
        elif cmd == CMD_FLUSH:
            exp.pool.flush()
        elif cmd == CMD_WRITE_ZEROES:
            exp.write_zeroes(offset, length, fua)
        # CMD_TRIM is advisory: the block stays allocated to the VM.
        return None

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> int:
        st = self.stats
        if cmd not in CMD_NAMES:
            st.count("invalid_requests", 1)
            return errno.EINVAL
        if flags & ~CMDFLAGS_KNOWN:
            st.count("invalid_requests", 1)
            return errno.EINVAL
        if cmd == CMD_FLUSH:
            return 0
        if self.export.read_only and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            st.count("invalid_requests", 1)
            return errno.EPERM
        if cmd == CMD_READ and length > MAX_REQUEST:
            st.count("invalid_requests", 1)
            return errno.EINVAL
        if length == 0 or offset + length > self.export.size:
            st.count("invalid_requests", 1)
            return errno.EINVAL if length == 0 else errno.ENOSPC if cmd == CMD_WRITE else errno.EINVAL
        return 0


def _settle(fut: asyncio.Future[str], result: str | None, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result or "")


def _shutdown(fd: int) -> None:
    """Shut a socket down by descriptor: blocked readers and writers on it return."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


class IoThread:
    """An event loop in a thread of its own, for the NBD servers."""

    def __init__(self, name: str = "ssdcache-io", workers: int = 8) -> None:
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-worker")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def submit(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` on the I/O loop and wait for it (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)  # type: ignore[arg-type]

    async def run(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` on the I/O loop; await it from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._started:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self._started = False
        self.executor.shutdown(wait=True)
        if not self.loop.is_running():
            self.loop.close()
