"""The daemon's end of one VM's virtio-serial channel: connect, handshake, request, recover.

The guest is untrusted. Every frame is size-checked before it is buffered; a malformed,
oversized or truncated frame (one that does not complete within ``frame_timeout_s``) drops
this connection only, and the link reconnects with back-off, hunting for the next frame
boundary. A frame must complete within ``frame_timeout_s`` of its first byte, however slowly
its bytes trickle in. Whatever a guest triggers in the host's log is rate-limited per VM and
truncated. A VM whose agent does not answer is marked *uncooperative*: the daemon goes on
serving the others, and the link recovers by itself when the agent greets again (after a
guest reboot, or the agent's restart).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from symbiont_agent import protocol as proto

log = logging.getLogger(__name__)

LOG_TRUNCATE = 200  # characters of guest data in one log line
LOG_BURST = 20  # log lines a guest may trigger at once ...
LOG_RATE = 1.0  # ... and per second after that
STOP_TIMEOUT = 5.0  # AgentLink.stop() waits this long for its task, then gives up on it
# Bytes taken from the QEMU socket per loop iteration: a relayed 4 MiB chunk in 4 reads, not 64
# (each read is a frame-reader feed, a timeout scope and a yield to the event loop).
READ_SIZE = 1 << 20


class AgentUnavailable(Exception):
    """No agent session on this VM's channel right now."""


class AgentRequestTimeout(AgentUnavailable):
    """The agent did not answer a request in time (a type, so callers never parse the text)."""


class AgentOpError(Exception):
    """The agent answered a request with an error: ``code`` is one of
    ``ops_schema.ERROR_CODES``, or None for an old agent's ``"TypeName: message"`` string."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def _op_error(err: Any) -> AgentOpError:
    """The guest's ``error`` field (untrusted) as an AgentOpError, bounded."""
    from symbiont_agent import ops_schema

    if isinstance(err, dict):
        code, message = err.get("code"), err.get("message")
        if code in ops_schema.ERROR_CODES and isinstance(message, str):
            return AgentOpError(message[:2000], code)
        return AgentOpError(f"malformed error from the agent: {_trunc(err)}", ops_schema.BAD_REPLY)
    return AgentOpError(str(err if err is not None else "unknown error")[:2000])


@dataclass
class LinkStats:
    connects: int = 0
    handshakes: int = 0
    protocol_errors: int = 0
    timeouts: int = 0
    frames_in: int = 0
    frames_out: int = 0
    bytes_discarded: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    history: list[str] = field(default_factory=list)


def _trunc(value: Any, limit: int = LOG_TRUNCATE) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class LogLimiter:
    """A token bucket for the log lines one guest can trigger: ``burst`` at once, then
    ``rate`` per second; the lines it suppresses are counted and the count is logged with
    the next line that passes. Arguments are truncated: a guest's data can be 1 MiB."""

    def __init__(self, rate: float = LOG_RATE, burst: int = LOG_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.suppressed = 0  # since the last line that passed
        self.suppressed_total = 0

    def log(self, level: int, fmt: str, *args: Any) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            self.suppressed += 1
            self.suppressed_total += 1
            return False
        self._tokens -= 1
        args = tuple(a if isinstance(a, (int, float)) else _trunc(a) for a in args)
        if self.suppressed:
            fmt += " (%d similar lines suppressed)"
            args += (self.suppressed,)
            self.suppressed = 0
        log.log(level, fmt, *args)
        return True


class AgentLink:
    """One VM's channel, owned by the daemon's event loop."""

    def __init__(
        self,
        vm: str,
        channel_path: Callable[[], str | None],
        frame_timeout: float = 10.0,
        request_timeout: float = 5.0,
        reconnect_max: float = 5.0,
        max_json: int = proto.MAX_JSON,
        max_binary: int = proto.MAX_BINARY,
        on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
        on_state: Callable[[str, bool, str], None] | None = None,
    ) -> None:
        self.vm = vm
        self._channel_path = channel_path
        self.frame_timeout = frame_timeout
        self.request_timeout = request_timeout
        self.reconnect_max = reconnect_max
        self.max_json = max_json
        self.max_binary = max_binary
        self.on_event = on_event
        self.on_state = on_state
        self.hello: dict[str, Any] | None = None
        self.hello_at: float = 0.0
        self.connected = False
        self.stats = LinkStats()
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[tuple[Any, bytes]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._failed_requests = 0
        self._cooperative = False
        self.guest_log = LogLimiter()
        # Event name -> handler(data, payload): binary streams from the guest (migration images).
        self.stream_handlers: dict[str, Callable[[dict[str, Any], bytes], None]] = {}

    # -- state ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.connected and self.hello is not None

    @property
    def cooperative(self) -> bool:
        """An agent that greeted and answers its requests."""
        return self.ready and self._cooperative

    @property
    def caps(self) -> list[str]:
        return list(self.hello.get("caps", [])) if self.hello else []

    def _set_cooperative(self, value: bool, reason: str) -> None:
        if value != self._cooperative:
            self._cooperative = value
            self.guest_log.log(logging.INFO, "vm %s: agent %s (%s)", self.vm,
                               "cooperative" if value else "uncooperative", reason)
            if self.on_state:
                self.on_state(self.vm, value, reason)

    def _error(self, text: str) -> None:
        text = _trunc(text, 300)
        self.stats.last_error = text
        self.stats.last_error_at = time.time()
        self.stats.history = (self.stats.history + [f"{time.strftime('%H:%M:%S')} {text}"])[-20:]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"agent-{self.vm}")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Cancel the link's task and wait for it, at most ``timeout`` seconds: callers may
        hold the daemon's lock, so this must never wait unboundedly."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                log.error("vm %s: agent link did not stop within %.1f s; abandoned", self.vm, timeout)
            elif not task.cancelled() and task.exception() is not None:
                log.warning("vm %s: agent link ended with %r", self.vm, task.exception())
        self._drop("link stopped")

    async def wait_ready(self, timeout: float) -> bool:
        try:
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a
            # cancellation that races with the inner await completing (bpo-42130), which
            # wedged AgentLink.stop() while the daemon's lock was held (issue 16, item 2).
            async with asyncio.timeout(timeout):
                await self._ready.wait()
            return True
        except TimeoutError:
            return False

    def _drop(self, reason: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.connected = False
        self.hello = None
        self._ready.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(AgentUnavailable(f"{self.vm}: {reason}"))
        self._pending.clear()
        self._set_cooperative(False, reason)

    async def _run(self) -> None:
        """Connect, serve a session, reconnect: forever, whatever a session throws."""
        backoff = 0.2
        while True:
            try:
                backoff = await self._connect_and_serve(backoff)
            except Exception as exc:  # never die silently while the API says "connected"
                reason = f"internal error: {type(exc).__name__}: {exc}"
                self.stats.protocol_errors += 1
                self.guest_log.log(logging.ERROR, "vm %s: agent link: %s", self.vm, reason)
                log.debug("vm %s: agent link traceback", self.vm, exc_info=True)
                self._error(reason)
                self._drop(reason)
                backoff = min(backoff * 2, self.reconnect_max)
                await asyncio.sleep(backoff)

    async def _connect_and_serve(self, backoff: float) -> float:
        """One connection attempt and its session; returns the next back-off."""
        path = None
        try:
            path = self._channel_path()
        except Exception as exc:  # the VM may be gone or shut off
            self._error(f"no channel: {exc}")
        if not path:
            await asyncio.sleep(backoff)
            return min(backoff * 2, self.reconnect_max)
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=READ_SIZE)
        except OSError as exc:
            self._error(f"connect {path}: {exc.strerror or exc}")
            await asyncio.sleep(backoff)
            return min(backoff * 2, self.reconnect_max)
        self._writer = writer
        self.connected = True
        self.stats.connects += 1
        try:
            await self._session(reader)
            reason = "channel closed"
        except proto.ProtocolError as exc:
            self.stats.protocol_errors += 1
            reason = f"protocol error: {exc}"
            self.guest_log.log(logging.WARNING, "vm %s: dropping connection: %s", self.vm, exc)
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        self._error(reason)
        self._drop(reason)
        # Reconnect promptly after a clean close; back off after errors.
        await asyncio.sleep(backoff)
        return min(backoff * 2, self.reconnect_max) if "error" in reason else 0.2

    async def _session(self, reader: asyncio.StreamReader) -> None:
        frames = proto.FrameReader(self.max_json, self.max_binary)
        frames.hunt()  # QEMU may hold bytes of an earlier session
        await self._send(proto.hello("host", _version(), [], time=time.time()))
        greet_at = time.monotonic()
        # The deadline is per frame, not per read: a trickle of bytes does not renew it. It runs
        # from the arrival of the pending frame's first byte (while hunting: of the candidate's).
        pending: int | None = None
        frame_started = 0.0
        while True:
            if pending is not None:
                timeout = frame_started + self.frame_timeout - time.monotonic()
            else:
                timeout = 2.0
            try:
                if timeout <= 0:
                    raise TimeoutError
                async with asyncio.timeout(timeout):  # not wait_for: see wait_ready
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                if pending is not None:
                    raise proto.ProtocolError(
                        f"truncated frame: {frames.buffered} bytes pending for {self.frame_timeout:.1f} s"
                    ) from None
                if self.hello is None and time.monotonic() - greet_at > 3.0:
                    # The agent may have opened its port after our hello: greet again.
                    await self._send(proto.hello("host", _version(), [], time=time.time()))
                    greet_at = time.monotonic()
                continue
            if not data:
                return
            before = frames.discarded
            msgs = frames.feed(data)
            self.stats.bytes_discarded += frames.discarded - before
            if frames.pending_offset != pending:
                pending = frames.pending_offset
                frame_started = time.monotonic()  # a new frame began in this chunk
            for msg in msgs:
                self.stats.frames_in += 1
                self._dispatch(msg)
            # Let the other VMs' links, the API and the control loop run between chunks:
            # one busy guest must not monopolise the loop.
            await asyncio.sleep(0)

    def _dispatch(self, msg: proto.Message) -> None:
        h = msg.header
        if h["type"] == "hello":
            if h.get("role") != "agent":
                raise proto.ProtocolError(f"hello from role {h.get('role')!r}, expected agent")
            if h.get("proto") != proto.PROTOCOL_VERSION:
                raise proto.ProtocolError(f"agent speaks protocol {h.get('proto')}, we speak {proto.PROTOCOL_VERSION}")
            new_session = self.hello is None or (h.get("pid"), h.get("boot_id")) != (
                self.hello.get("pid"),
                self.hello.get("boot_id"),
            )
            # Typed and bounded by proto.validate_hello: safe to store and serve.
            self.hello = {k: h[k] for k in ("proto", "version", "caps", "boot_id", "pid", "started") if k in h}
            self.hello_at = time.time()
            if new_session:
                self.stats.handshakes += 1
                self.guest_log.log(logging.INFO, "vm %s: agent hello (version %s, caps %s)", self.vm,
                                   h.get("version"), h.get("caps"))
            self._failed_requests = 0
            self._ready.set()
            self._set_cooperative(True, "agent hello")
        elif h["type"] == "resp":
            fut = self._pending.pop(h["id"], None)
            if fut is None or fut.done():
                return  # a late answer to a request that timed out
            if h["ok"]:
                fut.set_result((h.get("result"), msg.payload))
            else:
                fut.set_exception(_op_error(h.get("error")))
        elif h["type"] == "event":
            data = h.get("data") if isinstance(h.get("data"), dict) else {}
            stream = self.stream_handlers.get(h["event"])
            if stream is not None:
                stream(data, msg.payload)
                return
            self.guest_log.log(logging.INFO, "vm %s: event %s %s", self.vm, h["event"], data)
            if self.on_event:
                self.on_event(self.vm, h["event"], data)
        # A guest sending us requests is ignored: the host serves no guest requests (yet).

    async def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._writer is None:
            raise AgentUnavailable(f"{self.vm}: not connected")
        if len(payload) > 65536:  # a relayed chunk: the transport sends it from our buffer, no joined copy
            self._writer.write(proto.encode_head(header, len(payload)))
            self._writer.write(payload)
        else:
            self._writer.write(proto.encode(header, payload))
        self.stats.frames_out += 1
        await self._writer.drain()

    async def request(
        self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"", timeout: float | None = None
    ) -> tuple[Any, bytes]:
        """Send a request and wait for its answer: ``(result, payload)``."""
        if not self.ready:
            raise AgentUnavailable(f"{self.vm}: agent not connected")
        if self.hello is not None and op not in self.caps:
            raise AgentOpError(f"{self.vm}: agent does not support {op!r} (caps: {', '.join(self.caps)})")
        mid = next(self._ids)
        fut: asyncio.Future[tuple[Any, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        try:
            await self._send(proto.request(mid, op, args), payload)
            async with asyncio.timeout(timeout or self.request_timeout):  # not wait_for: see wait_ready
                result = await fut
        except TimeoutError:
            self.stats.timeouts += 1
            self._failed_requests += 1
            if self._failed_requests >= 2:
                self._set_cooperative(False, f"{self._failed_requests} requests timed out")
            raise AgentRequestTimeout(f"{self.vm}: agent did not answer {op!r} in time") from None
        finally:
            self._pending.pop(mid, None)
        self._failed_requests = 0
        self._set_cooperative(True, "answered")
        return result


def _version() -> str:
    from symbiont import __version__

    return __version__
