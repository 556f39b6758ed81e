"""The daemon's end of one VM's virtio-serial channel: connect, handshake, request, recover.

The guest is untrusted. Every frame is size-checked before it is buffered; a malformed,
oversized or truncated frame (one that does not complete within ``frame_timeout_s``) drops
this connection only, and the link reconnects with back-off, hunting for the next frame
boundary. A VM whose agent does not answer is marked *uncooperative*: the daemon goes on
serving the others, and the link recovers by itself when the agent greets again (after a
guest reboot, or the agent's restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from symbiont_agent import protocol as proto

log = logging.getLogger(__name__)


class AgentUnavailable(Exception):
    """No agent session on this VM's channel right now."""


class AgentOpError(Exception):
    """The agent answered a request with an error."""


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
            log.info("vm %s: agent %s (%s)", self.vm, "cooperative" if value else "uncooperative", reason)
            if self.on_state:
                self.on_state(self.vm, value, reason)

    def _error(self, text: str) -> None:
        self.stats.last_error = text
        self.stats.last_error_at = time.time()
        self.stats.history = (self.stats.history + [f"{time.strftime('%H:%M:%S')} {text}"])[-20:]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"agent-{self.vm}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
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
        backoff = 0.2
        while True:
            path = None
            try:
                path = self._channel_path()
            except Exception as exc:  # the VM may be gone or shut off
                self._error(f"no channel: {exc}")
            if not path:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max)
                continue
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError as exc:
                self._error(f"connect {path}: {exc.strerror or exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max)
                continue
            self._writer = writer
            self.connected = True
            self.stats.connects += 1
            try:
                await self._session(reader)
                reason = "channel closed"
            except proto.ProtocolError as exc:
                self.stats.protocol_errors += 1
                reason = f"protocol error: {exc}"
                log.warning("vm %s: dropping connection: %s", self.vm, exc)
            except (ConnectionError, OSError) as exc:
                reason = f"connection error: {exc}"
            self._error(reason)
            self._drop(reason)
            # Reconnect promptly after a clean close; back off after errors.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.reconnect_max) if "error" in reason else 0.2

    async def _session(self, reader: asyncio.StreamReader) -> None:
        frames = proto.FrameReader(self.max_json, self.max_binary)
        frames.hunt()  # QEMU may hold bytes of an earlier session
        await self._send(proto.hello("host", _version(), [], time=time.time()))
        greet_at = time.monotonic()
        while True:
            timeout = self.frame_timeout if frames.mid_frame else 2.0
            try:
                async with asyncio.timeout(timeout):  # not wait_for: see wait_ready
                    data = await reader.read(65536)
            except TimeoutError:
                if frames.mid_frame:
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
            for msg in msgs:
                self.stats.frames_in += 1
                self._dispatch(msg)

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
            self.hello = {k: h[k] for k in ("proto", "version", "caps", "boot_id", "pid", "started") if k in h}
            self.hello_at = time.time()
            if new_session:
                self.stats.handshakes += 1
                log.info("vm %s: agent hello (version %s, caps %s)", self.vm, h.get("version"), h.get("caps"))
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
                fut.set_exception(AgentOpError(str(h.get("error", "unknown error"))[:2000]))
        elif h["type"] == "event":
            data = h.get("data") if isinstance(h.get("data"), dict) else {}
            stream = self.stream_handlers.get(h["event"])
            if stream is not None:
                stream(data, msg.payload)
            elif self.on_event:
                self.on_event(self.vm, h["event"], data)
        # A guest sending us requests is ignored: the host serves no guest requests (yet).

    async def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._writer is None:
            raise AgentUnavailable(f"{self.vm}: not connected")
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
            raise AgentUnavailable(f"{self.vm}: agent did not answer {op!r} in time") from None
        finally:
            self._pending.pop(mid, None)
        self._failed_requests = 0
        self._set_cooperative(True, "answered")
        return result


def _version() -> str:
    from symbiont import __version__

    return __version__
