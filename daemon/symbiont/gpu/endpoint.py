"""Flyt-style elastic GPU endpoints: a host-side service that owns the GPUs for its clients.

Applications (in VMs or on the host) never touch a device: they hold *handles* to buffers and
operations of an endpoint, and the service maps them onto a backend context on some device.
Because the mapping is the service's, it can

* enforce **quotas** (an SM share and a memory quota per client),
* scale a client **vertically** (change its SM share while it runs; we measure the time from
  the request until the device runs the client at the new share),
* scale it **horizontally** (migrate the endpoint, with its device buffers, to another GPU or
  server; handles stay valid; we measure the downtime),
* and **isolate** critical clients: their shares are guarantees (admission keeps the sum of
  critical shares <= 1 per device) and non-critical clients are squeezed into what is left.
  Devices should use the simulator's ``spatial`` mode (guarantees plus lending of idle SMs).

Remoting protocol (unix socket, asyncio). Every message is a frame::

    u32 big-endian JSON length | u32 big-endian payload length | JSON | payload bytes

A request is ``{"id": N, "op": NAME, "args": {...}}`` and may carry a binary payload (the
data of ``h2d``); a reply is ``{"id": N, "ok": true, "result": {...}}`` (``d2h`` data in the
payload) or ``{"id": N, "ok": false, "error": {"code": C, "message": M}}``. Binary data is
never base64 in JSON. The first request of a connection is ``hello {"client": NAME}`` (or
``{"admin": true}`` when the server allows admin connections). Errors go to the offending
connection only: a malformed JSON body or a bad argument gets an error reply and the
connection stays usable; a frame over the size limits gets an error reply and the connection
is closed (its remaining bytes cannot be trusted). Other clients never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from symbiont.gpu import metrics
from symbiont.gpu.backend import GpuBackend, GpuError, KernelSpec, check_share

log = logging.getLogger(__name__)

HEADER = struct.Struct(">II")
MAX_JSON = 64 * 1024
MAX_PAYLOAD = 256 * 2**20


class EndpointError(Exception):
    """An error reported to one client, with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class ScaleResult:
    """One vertical scaling: from ``old`` to ``new`` share, on the backend clock."""

    client: str
    old_share: float
    new_share: float
    requested_at: float
    control_wall_s: float
    effective_at: float | None = None

    @property
    def effect_s(self) -> float | None:
        return None if self.effective_at is None else self.effective_at - self.requested_at

    def as_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "old_share": self.old_share,
            "new_share": self.new_share,
            "requested_at": self.requested_at,
            "control_wall_s": self.control_wall_s,
            "effective_at": self.effective_at,
            "effect_s": self.effect_s,
        }


@dataclass
class MigrationResult:
    """One horizontal scaling (endpoint migration), on the backend clock."""

    client: str
    src_device: int
    dst_device: int
    nbytes: int
    buffers: int
    drain_s: float  # waiting for in-flight work before the freeze (not downtime)
    downtime_s: float  # frozen: new context + copies of every buffer + switch-over
    control_wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Client:
    name: str
    device: int
    sm_share: float  # requested
    mem_quota: int
    critical: bool
    ctx: int
    effective_share: float = 1.0
    mem_used: int = 0
    buffers: dict[int, int] = field(default_factory=dict)  # client handle -> backend buffer
    ops: dict[int, int] = field(default_factory=dict)  # client handle -> backend op
    inflight: list[int] = field(default_factory=list)
    next_handle: int = 1
    scales: list[ScaleResult] = field(default_factory=list)
    migrations: list[MigrationResult] = field(default_factory=list)

    def handle(self) -> int:
        h = self.next_handle
        self.next_handle += 1
        return h

    def info(self) -> dict[str, Any]:
        return {
            "client": self.name,
            "device": self.device,
            "sm_share": self.sm_share,
            "effective_share": self.effective_share,
            "critical": self.critical,
            "mem_quota": self.mem_quota,
            "mem_used": self.mem_used,
            "buffers": len(self.buffers),
            "scales": [s.as_dict() for s in self.scales[-5:]],
            "migrations": [m.as_dict() for m in self.migrations[-5:]],
        }


def kernel_from_args(args: dict[str, Any]) -> KernelSpec:
    """Validate a launch request's kernel description."""
    try:
        blocks = int(args["blocks"])
        fpb = float(args["flops_per_block"])
        mem = int(args.get("mem_bytes", 0))
        dram = float(args.get("dram_bytes_per_block", 0.0))
        name = str(args.get("name", "kernel"))[:64]
    except KeyError as exc:
        raise EndpointError("bad_request", f"launch needs {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise EndpointError("bad_request", f"launch: {exc}") from None
    if not (1 <= blocks <= 2**31) or not math.isfinite(fpb) or fpb <= 0 or fpb > 1e12:
        raise EndpointError("bad_request", "launch: blocks in [1, 2^31] and 0 < flops_per_block <= 1e12")
    try:
        return KernelSpec(blocks=blocks, flops_per_block=fpb, mem_bytes=mem, dram_bytes_per_block=dram, name=name)
    except ValueError as exc:
        raise EndpointError("bad_request", str(exc)) from None


class GpuEndpointService:
    """The endpoint service over one backend (all its devices)."""

    def __init__(self, backend: GpuBackend) -> None:
        self.backend = backend
        self.clients: dict[str, Client] = {}

    # -- admin: quotas and scaling ---------------------------------------------------------
    def _client(self, name: str) -> Client:
        c = self.clients.get(name)
        if c is None:
            raise EndpointError("unknown_client", f"no client named {name!r}")
        return c

    def _check_device(self, device: int) -> None:
        if not isinstance(device, int) or not (0 <= device < len(self.backend.devices())):
            raise EndpointError("unknown_device", f"no device {device!r}")

    def _critical_sum(self, device: int, exclude: str | None = None) -> float:
        return sum(c.sm_share for c in self.clients.values() if c.device == device and c.critical and c.name != exclude)

    def _effective_shares(self, device: int) -> dict[str, float]:
        """Critical shares are kept; the others share what is left, proportionally."""
        on = [c for c in self.clients.values() if c.device == device]
        crit = sum(c.sm_share for c in on if c.critical)
        rest = [c for c in on if not c.critical]
        room = max(0.0, 1.0 - crit)
        want = sum(c.sm_share for c in rest)
        scale = 1.0 if want <= room or want == 0 else room / want
        sms = self.backend.devices()[device].gpu_type.sm_count
        floor = 1.0 / sms  # at least one SM, so a squeezed client still progresses
        out = {c.name: c.sm_share for c in on if c.critical}
        for c in rest:
            out[c.name] = min(1.0, max(floor, c.sm_share * scale))
        return out

    def _apply_shares(self, device: int) -> None:
        for name, share in self._effective_shares(device).items():
            c = self.clients[name]
            if abs(c.effective_share - share) > 1e-12 or self.backend.share(c.ctx) != share:
                self.backend.set_share(c.ctx, share)
            c.effective_share = share
            metrics.CLIENT_SM_SHARE.labels(name).set(share)

    def register_client(
        self, name: str, device: int = 0, sm_share: float = 1.0, mem_bytes: int = 2**30, critical: bool = False
    ) -> Client:
        if not name or len(name) > 64:
            raise EndpointError("bad_request", "client name must be 1..64 characters")
        if name in self.clients:
            raise EndpointError("exists", f"client {name!r} already registered")
        self._check_device(device)
        share = self._share(sm_share)
        if mem_bytes <= 0:
            raise EndpointError("bad_request", "memory quota must be > 0")
        if critical and self._critical_sum(device) + share > 1.0 + 1e-9:
            raise EndpointError(
                "over_capacity", f"critical shares on device {device} would exceed 1.0 (have {self._critical_sum(device)})"
            )
        ctx = self.backend.create_context(device, share, label=name)
        c = Client(name, device, share, int(mem_bytes), bool(critical), ctx, effective_share=share)
        self.clients[name] = c
        self._apply_shares(device)
        metrics.CLIENT_MEMORY_QUOTA.labels(name).set(c.mem_quota)
        metrics.CLIENT_MEMORY.labels(name).set(0)
        return c

    @staticmethod
    def _share(share: Any) -> float:
        try:
            return check_share(float(share))
        except (GpuError, TypeError, ValueError):
            raise EndpointError("bad_request", f"SM share must be in (0, 1], got {share!r}") from None

    def set_quota(
        self, name: str, sm_share: float | None = None, mem_bytes: int | None = None, critical: bool | None = None
    ) -> ScaleResult | None:
        """Change quotas; a share change is a vertical scaling and returns its measurement.

        Everything is validated before anything changes: a refused request leaves the client as it was.
        """
        c = self._client(name)
        t_wall = time.perf_counter()
        new_mem = c.mem_quota
        if mem_bytes is not None:
            if isinstance(mem_bytes, bool) or not isinstance(mem_bytes, int) or mem_bytes <= 0:
                raise EndpointError("bad_request", f"memory quota must be a positive integer, got {mem_bytes!r}")
            if mem_bytes < c.mem_used:
                raise EndpointError(
                    "bad_request", f"memory quota {mem_bytes} below what {name!r} already holds ({c.mem_used})"
                )
            new_mem = mem_bytes
        new_share = c.sm_share if sm_share is None else self._share(sm_share)
        new_crit = c.critical if critical is None else bool(critical)
        if new_crit and self._critical_sum(c.device, exclude=name) + new_share > 1.0 + 1e-9:
            raise EndpointError("over_capacity", f"critical shares on device {c.device} would exceed 1.0")
        c.mem_quota = new_mem
        metrics.CLIENT_MEMORY_QUOTA.labels(name).set(c.mem_quota)
        if sm_share is None and critical is None:
            return None
        old = c.effective_share
        requested_at = self.backend.now()
        c.sm_share, c.critical = new_share, new_crit
        self._apply_shares(c.device)
        res = ScaleResult(name, old, c.effective_share, requested_at, time.perf_counter() - t_wall)
        # unchanged effective share (e.g. squeezed by critical clients): nothing to wait for
        res.effective_at = requested_at if old == c.effective_share else self.backend.share_effective_at(c.ctx)
        c.scales.append(res)
        if res.effect_s is not None:
            metrics.VERTICAL_SCALE_SECONDS.observe(res.control_wall_s + res.effect_s)
        return res

    def scale_status(self, name: str) -> ScaleResult | None:
        """The latest vertical scaling of ``name``, with ``effective_at`` filled in once known."""
        c = self._client(name)
        if not c.scales:
            return None
        res = c.scales[-1]
        if res.effective_at is None:
            res.effective_at = self.backend.share_effective_at(c.ctx)
            if res.effect_s is not None:
                metrics.VERTICAL_SCALE_SECONDS.observe(res.control_wall_s + res.effect_s)
        return res

    def migrate(self, name: str, device: int) -> MigrationResult:
        """Horizontal scaling: move ``name``'s endpoint and buffers to ``device``.

        Synchronous: for a real backend call it where blocking is acceptable (the async
        server runs it under the client's lock, so the client's requests wait: downtime).
        """
        c = self._client(name)
        self._check_device(device)
        b = self.backend
        if device == c.device and len(b.devices()) > 1:
            raise EndpointError("bad_request", f"client {name!r} is already on device {device}")
        if c.critical and self._critical_sum(device, exclude=name) + c.sm_share > 1.0 + 1e-9:
            raise EndpointError("over_capacity", f"critical shares on device {device} would exceed 1.0")
        if b.mem_free(device) < c.mem_used:
            raise EndpointError("out_of_memory", f"device {device} cannot hold {c.mem_used} bytes of {name!r}")
        t_wall = time.perf_counter()
        t0 = b.now()
        b.synchronize(c.ctx)  # drain: the client's own work finishes first
        t1 = b.now()
        src = c.device
        new_ctx = b.create_context(device, c.effective_share, label=name)
        mapping: dict[int, int] = {}
        ops = []
        try:
            for h, old in c.buffers.items():
                nb = b.alloc(new_ctx, b.buffer_size(old))
                mapping[h] = nb
                ops.append(b.memcpy_d2d(old, nb))
            b.wait_all(ops)
        except GpuError as exc:
            for nb in mapping.values():
                with contextlib.suppress(GpuError):
                    b.free(nb)
            b.destroy_context(new_ctx)
            raise EndpointError(exc.code, f"migration failed, client left on device {src}: {exc}") from None
        old_ctx = c.ctx
        c.ctx, c.device, c.buffers = new_ctx, device, mapping
        c.inflight = []
        b.destroy_context(old_ctx)  # frees the old buffers
        t2 = b.now()
        self._apply_shares(src)
        self._apply_shares(device)
        res = MigrationResult(
            client=name,
            src_device=src,
            dst_device=device,
            nbytes=c.mem_used,
            buffers=len(mapping),
            drain_s=t1 - t0,
            downtime_s=t2 - t1,
            control_wall_s=time.perf_counter() - t_wall,
        )
        c.migrations.append(res)
        metrics.MIGRATION_DOWNTIME_SECONDS.observe(res.downtime_s)
        return res

    def remove_client(self, name: str) -> None:
        c = self._client(name)
        self.backend.synchronize(c.ctx)
        self.backend.destroy_context(c.ctx)
        del self.clients[name]
        self._apply_shares(c.device)
        for g in (metrics.CLIENT_SM_SHARE, metrics.CLIENT_MEMORY, metrics.CLIENT_MEMORY_QUOTA):
            with contextlib.suppress(KeyError):
                g.remove(name)

    # -- data plane ------------------------------------------------------------------------
    def _buf(self, c: Client, handle: Any) -> int:
        if not isinstance(handle, int) or isinstance(handle, bool) or handle not in c.buffers:
            raise EndpointError("unknown_buffer", f"client {c.name!r} has no buffer {handle!r}")
        return c.buffers[handle]

    def alloc(self, name: str, nbytes: Any) -> int:
        c = self._client(name)
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise EndpointError("bad_request", f"alloc size must be a positive integer, got {nbytes!r}")
        if c.mem_used + nbytes > c.mem_quota:
            raise EndpointError(
                "over_quota", f"client {name!r}: {c.mem_used} + {nbytes} bytes exceeds memory quota {c.mem_quota}"
            )
        try:
            buf = self.backend.alloc(c.ctx, nbytes)
        except GpuError as exc:
            raise EndpointError(exc.code, str(exc)) from None
        h = c.handle()
        c.buffers[h] = buf
        c.mem_used += nbytes
        metrics.CLIENT_MEMORY.labels(name).set(c.mem_used)
        return h

    def free(self, name: str, handle: Any) -> None:
        c = self._client(name)
        buf = self._buf(c, handle)
        self._drain_sync(c)
        n = self.backend.buffer_size(buf)
        self.backend.free(buf)
        del c.buffers[handle]
        c.mem_used -= n
        metrics.CLIENT_MEMORY.labels(name).set(c.mem_used)

    def _track(self, c: Client, op: int) -> int:
        h = c.handle()
        c.ops[h] = op
        c.inflight.append(op)
        if len(c.ops) > 10_000:  # keep the table bounded: forget the oldest finished ops
            for k in list(c.ops)[:1000]:
                c.ops.pop(k)
        return h

    def h2d(self, name: str, handle: Any, data: bytes | None = None, nbytes: int | None = None) -> int:
        c = self._client(name)
        buf = self._buf(c, handle)
        size = self.backend.buffer_size(buf)
        n = len(data) if data is not None else (size if nbytes is None else nbytes)
        if not isinstance(n, int) or isinstance(n, bool) or not (0 < n <= size):
            raise EndpointError("bad_request", f"h2d of {n!r} bytes does not fit buffer {handle} ({size} bytes)")
        return self._track(c, self.backend.memcpy_h2d(buf, data, None if data is not None else n))

    def launch(self, name: str, kernel: KernelSpec) -> int:
        c = self._client(name)
        try:
            return self._track(c, self.backend.launch(c.ctx, kernel))
        except GpuError as exc:
            raise EndpointError(exc.code, str(exc)) from None

    def d2h_submit(self, name: str, handle: Any, nbytes: int | None = None) -> int:
        c = self._client(name)
        buf = self._buf(c, handle)
        size = self.backend.buffer_size(buf)
        n = size if nbytes is None else nbytes
        if not isinstance(n, int) or isinstance(n, bool) or not (0 < n <= size):
            raise EndpointError("bad_request", f"d2h of {n!r} bytes does not fit buffer {handle} ({size} bytes)")
        return self._track(c, self.backend.memcpy_d2h(buf, n))

    def d2h_result(self, name: str, op_handle: int) -> np.ndarray:
        c = self._client(name)
        return self.backend.result(self._op(c, op_handle))

    def _op(self, c: Client, handle: Any) -> int:
        if not isinstance(handle, int) or isinstance(handle, bool) or handle not in c.ops:
            raise EndpointError("unknown_op", f"client {c.name!r} has no operation {handle!r}")
        return c.ops[handle]

    def timing(self, name: str, op_handle: Any) -> dict[str, Any]:
        c = self._client(name)
        t = self.backend.timing(self._op(c, op_handle))
        return {"op": op_handle, "kind": t.kind, "submit": t.submit, "start": t.start, "end": t.end,
                "nbytes": t.nbytes, "flops": t.flops}  # fmt: skip

    def _drain_sync(self, c: Client) -> None:
        self.backend.synchronize(c.ctx)
        c.inflight = []

    async def drain(self, c: Client) -> None:
        """Wait for the client's work without blocking the event loop on a real GPU."""
        b = self.backend
        if b.virtual_time:
            b.synchronize(c.ctx)
        else:
            while any(not b.done(o) for o in c.inflight):
                await asyncio.sleep(2e-4)
        c.inflight = []

    def sync(self, name: str) -> None:
        self._drain_sync(self._client(name))

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "devices": [d.as_dict() for d in self.backend.devices()],
            "clients": [c.info() for c in self.clients.values()],
        }


# -- framing -----------------------------------------------------------------------------------
class FrameError(Exception):
    """The byte stream cannot be trusted any more: reply once, then close."""


def encode_frame(msg: dict[str, Any], payload: bytes = b"") -> bytes:
    body = json.dumps(msg, separators=(",", ":"), default=_json_default).encode()
    return HEADER.pack(len(body), len(payload)) + body + payload


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


async def read_frame(reader: asyncio.StreamReader, max_payload: int = MAX_PAYLOAD) -> tuple[bytes, bytes] | None:
    """One frame as (json bytes, payload); None at a clean end of stream."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("truncated frame header") from None
    jlen, plen = HEADER.unpack(head)
    if jlen == 0 or jlen > MAX_JSON:
        raise FrameError(f"JSON part of {jlen} bytes (limit {MAX_JSON})")
    if plen > max_payload:
        raise FrameError(f"payload of {plen} bytes (limit {max_payload})")
    try:
        body = await reader.readexactly(jlen)
        payload = await reader.readexactly(plen) if plen else b""
    except asyncio.IncompleteReadError:
        raise FrameError("truncated frame") from None
    return body, payload


class EndpointServer:
    """Serves a :class:`GpuEndpointService` on a unix socket.

    ``resolve`` (optional) maps a client name to the service that holds it, so one socket can
    serve clients of several backends (the daemon has one service per backend kind); without
    it every client is looked up in ``service``. Admin operations always go to ``service``.
    """

    def __init__(
        self,
        service: GpuEndpointService | None,
        path: str | Path,
        allow_admin: bool = False,
        max_payload: int = MAX_PAYLOAD,
        resolve: Callable[[str], GpuEndpointService] | None = None,
        mode: int = 0o660,
    ) -> None:
        if service is None and resolve is None:
            raise ValueError("an endpoint server needs a service or a resolver")
        self.service = service
        self.path = Path(path)
        self.allow_admin = allow_admin and service is not None
        self.max_payload = max_payload
        self.mode = mode
        self._resolve = resolve
        self._server: asyncio.base_events.Server | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()

    def service_of(self, name: str) -> GpuEndpointService:
        """The service holding client ``name`` (EndpointError ``unknown_client`` when none)."""
        if self._resolve is not None:
            return self._resolve(name)
        assert self.service is not None
        self.service._client(name)
        return self.service

    def client_lock(self, name: str) -> asyncio.Lock:
        """Held while one of ``name``'s requests runs; admins take it to migrate the client."""
        return self._lock(name)

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        self.path.chmod(self.mode)

    async def stop(self) -> None:
        """Stop listening and end open connections (their clients see the stream end)."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> EndpointServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _lock(self, name: str) -> asyncio.Lock:
        lk = self._locks.get(name)
        if lk is None:
            lk = self._locks[name] = asyncio.Lock()
        return lk

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve_connection(reader, writer)

    async def serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        bound: str | None = None,
        max_payload: int | None = None,
    ) -> None:
        """Serve one byte stream until it ends: a socket connection, or a relayed guest channel.

        ``bound``: the only client this stream may speak for (a VM's channel is bound to the
        VM's client, so an untrusted guest cannot use another client's quotas, nor admin
        operations). ``max_payload`` lowers the payload limit for such streams.
        """
        session: dict[str, Any] = {"client": None, "admin": False, "bound": bound}
        limit = self.max_payload if max_payload is None else min(max_payload, self.max_payload)
        self.connections += 1
        self._writers.add(writer)
        metrics.ENDPOINT_CONNECTIONS.set(self.connections)
        try:
            while True:
                try:
                    frame = await read_frame(reader, limit)
                except FrameError as exc:
                    metrics.ENDPOINT_REQUESTS.labels("frame", "error").inc()
                    writer.write(encode_frame({"id": None, "ok": False,
                                               "error": {"code": "bad_frame", "message": str(exc)}}))  # fmt: skip
                    await writer.drain()
                    return
                if frame is None:
                    return
                body, payload = frame
                reply, out = await self._dispatch(session, body, payload)
                writer.write(encode_frame(reply, out))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # never let one connection take the server down
            log.exception("endpoint connection failed")
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            metrics.ENDPOINT_CONNECTIONS.set(self.connections)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, session: dict[str, Any], body: bytes, payload: bytes) -> tuple[dict[str, Any], bytes]:
        rid: Any = None
        op = "?"
        try:
            try:
                msg = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise EndpointError("malformed", f"request is not valid JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise EndpointError("malformed", "request must be a JSON object")
            rid = msg.get("id")
            if rid is not None and not isinstance(rid, (int, str)):
                rid = None
            op = msg.get("op")
            args = msg.get("args", {})
            if not isinstance(op, str) or not isinstance(args, dict):
                raise EndpointError("malformed", "request needs a string 'op' and an object 'args'")
            result, out = await self._call(session, op, args, payload)
            metrics.ENDPOINT_REQUESTS.labels(_label(op), "ok").inc()
            return {"id": rid, "ok": True, "result": result}, out
        except EndpointError as exc:
            metrics.ENDPOINT_REQUESTS.labels(_label(op), "error").inc()
            return {"id": rid, "ok": False, "error": exc.as_dict()}, b""
        except GpuError as exc:
            metrics.ENDPOINT_REQUESTS.labels(_label(op), "error").inc()
            return {"id": rid, "ok": False, "error": {"code": exc.code, "message": str(exc)}}, b""
        except (TypeError, ValueError, OverflowError) as exc:
            metrics.ENDPOINT_REQUESTS.labels(_label(op), "error").inc()
            return {"id": rid, "ok": False, "error": {"code": "bad_request", "message": f"{op}: {exc}"}}, b""
        except Exception as exc:  # a bug must not close other clients' endpoints
            log.exception("endpoint request %s failed", op)
            metrics.ENDPOINT_REQUESTS.labels(_label(op), "error").inc()
            return {"id": rid, "ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}, b""

    async def _call(
        self, session: dict[str, Any], op: str, args: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        if op == "hello":
            bound = session.get("bound")
            if bound is not None and (args.get("admin") or args.get("client") != bound):
                raise EndpointError("forbidden", f"this connection may only speak for client {bound!r}")
            if args.get("admin"):
                if not self.allow_admin:
                    raise EndpointError("forbidden", "admin connections are disabled on this endpoint")
                session["admin"] = True
                return {"admin": True}, b""
            name = args.get("client")
            if not isinstance(name, str):
                raise EndpointError("bad_request", "hello needs a 'client' name")
            svc = self.service_of(name)
            session["client"] = name
            return {"client": name, "info": svc._client(name).info()}, b""
        if op in _ADMIN_OPS:
            if not session["admin"]:
                raise EndpointError("forbidden", f"{op} needs an admin connection")
            return self._admin(op, args), b""
        if op not in _OPS:
            raise EndpointError("unknown_op", f"unknown operation {op!r}")
        name = session["client"]
        if name is None:
            raise EndpointError("not_registered", "send hello with a client name first")
        async with self._lock(name):
            svc = self.service_of(name)  # looked up per request: the client may have been removed
            c = svc._client(name)
            if op == "alloc":
                return {"buf": svc.alloc(name, args.get("nbytes"))}, b""
            if op == "free":
                svc.free(name, args.get("buf"))
                return {}, b""
            if op == "h2d":
                data = payload if payload else None
                return {"op": svc.h2d(name, args.get("buf"), data, args.get("nbytes"))}, b""
            if op == "d2h":
                h = svc.d2h_submit(name, args.get("buf"), args.get("nbytes"))
                await svc.drain(c)
                return {"op": h}, svc.d2h_result(name, h).tobytes()
            if op == "launch":
                return {"op": svc.launch(name, kernel_from_args(args))}, b""
            if op == "sync":
                await svc.drain(c)
                return {"now": svc.backend.now()}, b""
            if op == "timing":
                return svc.timing(name, args.get("op")), b""
            if op == "info":
                return c.info(), b""
        raise EndpointError("unknown_op", f"unknown operation {op!r}")  # pragma: no cover

    def _admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        svc = self.service
        assert svc is not None  # allow_admin needs a service
        name = args.get("client")
        if not isinstance(name, str):
            raise EndpointError("bad_request", f"{op} needs a 'client' name")
        if op == "register":
            c = svc.register_client(
                name,
                int(args.get("device", 0)),
                args.get("sm_share", 1.0),
                int(args.get("mem_bytes", 2**30)),
                bool(args.get("critical", False)),
            )
            return c.info()
        if op == "set_quota":
            res = svc.set_quota(name, args.get("sm_share"), args.get("mem_bytes"), args.get("critical"))
            return {"scale": res.as_dict() if res else None}
        if op == "scale_status":
            res = svc.scale_status(name)
            return {"scale": res.as_dict() if res else None}
        if op == "migrate":
            dev = args.get("device")
            if not isinstance(dev, int):
                raise EndpointError("bad_request", "migrate needs an integer 'device'")
            return svc.migrate(name, dev).as_dict()
        raise EndpointError("unknown_op", op)  # pragma: no cover


_OPS = {"alloc", "free", "h2d", "d2h", "launch", "sync", "timing", "info"}
_ADMIN_OPS = {"register", "set_quota", "scale_status", "migrate"}


def _label(op: object) -> str:
    """A bounded metrics label: clients choose op names, so unknown ones collapse."""
    return op if isinstance(op, str) and (op in _OPS or op in _ADMIN_OPS or op == "hello") else "other"


class EndpointClient:
    """An asyncio client of :class:`EndpointServer` (one connection, one request at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer
        self._id = 0

    @classmethod
    async def connect(cls, path: str | Path, client: str | None = None, admin: bool = False) -> EndpointClient:
        reader, writer = await asyncio.open_unix_connection(str(path))
        self = cls(reader, writer)
        if admin:
            await self.call("hello", admin=True)
        elif client is not None:
            await self.call("hello", client=client)
        return self

    async def close(self) -> None:
        self._w.close()
        with contextlib.suppress(Exception):
            await self._w.wait_closed()

    async def request(self, op: str, args: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Send one request; return the raw reply and its payload (errors are not raised)."""
        self._id += 1
        self._w.write(encode_frame({"id": self._id, "op": op, "args": args}, payload))
        await self._w.drain()
        frame = await read_frame(self._r)
        if frame is None:
            raise ConnectionError("endpoint closed the connection")
        return json.loads(frame[0]), frame[1]

    async def call(self, op: str, /, _payload: bytes = b"", **args: Any) -> dict[str, Any]:
        """Call ``op`` with keyword ``args``; an error reply raises :class:`EndpointError`."""
        reply, _ = await self.request(op, args, _payload)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise EndpointError(err.get("code", "error"), err.get("message", ""))
        return reply["result"]

    async def alloc(self, nbytes: int) -> int:
        return int((await self.call("alloc", nbytes=nbytes))["buf"])

    async def free(self, buf: int) -> None:
        await self.call("free", buf=buf)

    async def h2d(self, buf: int, data: bytes | None = None, nbytes: int | None = None) -> int:
        args: dict[str, Any] = {"buf": buf}
        if nbytes is not None:
            args["nbytes"] = nbytes
        return int((await self.call("h2d", _payload=data or b"", **args))["op"])

    async def d2h(self, buf: int, nbytes: int | None = None) -> bytes:
        args: dict[str, Any] = {"buf": buf}
        if nbytes is not None:
            args["nbytes"] = nbytes
        reply, payload = await self.request("d2h", args)
        if not reply.get("ok"):
            err = reply["error"]
            raise EndpointError(err["code"], err["message"])
        return payload

    async def launch(self, blocks: int, flops_per_block: float, **extra: Any) -> int:
        return int((await self.call("launch", blocks=blocks, flops_per_block=flops_per_block, **extra))["op"])

    async def sync(self) -> float:
        return float((await self.call("sync"))["now"])

    async def timing(self, op: int) -> dict[str, Any]:
        return await self.call("timing", op=op)
