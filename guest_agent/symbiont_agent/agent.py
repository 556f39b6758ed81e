"""The agent's main loop: open the virtio-serial port, say hello, answer requests.

Operations are plain functions registered with :func:`op`; later parts (containers,
ballooning cooperation, cache membership, CRIU) add theirs the same way, and the hello's
``caps`` lists them so the daemon knows what this guest can do.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from symbiont_agent import __version__, cpus, stats
from symbiont_agent import ops_schema as schema
from symbiont_agent import protocol as proto

log = logging.getLogger("symbiont-agent")

Handler = Callable[[dict[str, Any], bytes], Any]
OPS: dict[str, Handler] = {}
THREADED: set[str] = set()
_CURRENT: Channel | None = None  # the open channel, for emit() from worker threads


def op(name: str, threaded: bool = False) -> Callable[[Handler], Handler]:
    """Register a handler for request ``name``: ``fn(args, payload) -> result``.

    ``name`` must be declared in :mod:`symbiont_agent.ops_schema` (canonical or an old alias);
    the handler is served under the canonical name and every alias. Its ``args`` have passed
    the op's request schema before it runs, and its result must fit the reply schema.

    A handler may return ``(result, payload_bytes)`` to send binary data back. A ``threaded``
    handler (a CRIU dump, a stream of image chunks) runs in a worker thread and answers when
    it is done, so ``ping``/``stats`` and other requests keep being answered meanwhile.
    """

    sp = schema.OPS.get(schema.ALIASES.get(name, ""))
    if sp is None:  # tests/unit/test_ops_schema.py fails on any undeclared op in the tree
        log.warning("op %r is not declared in ops_schema: served without validation", name)
    names = (sp.name, *sp.aliases) if sp is not None else (name,)

    def register(fn: Handler) -> Handler:
        for n in names:
            OPS[n] = fn
            if threaded:
                THREADED.add(n)
            else:
                THREADED.discard(n)
        return fn

    return register


def emit(header: dict[str, Any], payload: bytes = b"") -> bool:
    """Send an unsolicited frame (an event, possibly with a binary payload) from any thread."""
    ch = _CURRENT
    if ch is None or ch.fd is None:
        return False
    return ch.send(header, payload)


def load_op_modules() -> list[str]:
    """Import every ``symbiont_agent.ops_*`` module: each registers its operations with @op.

    Parts extend the agent by adding such a module (containers, cache membership, CRIU...);
    the hello's ``caps`` then tells the daemon what this guest supports.
    """
    import importlib
    import pkgutil

    import symbiont_agent

    loaded = []
    for m in pkgutil.iter_modules(symbiont_agent.__path__):
        if m.name.startswith("ops_"):
            importlib.import_module(f"symbiont_agent.{m.name}")
            loaded.append(m.name)
    return sorted(loaded)


@op("core.ping")
def _ping(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return {"pong": True, "echo": args.get("echo"), "payload_len": len(payload), "time": time.time()}


@op("core.stats")
def _stats(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return stats.collect()


@op("cpu.online")
def _online_cpus(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return cpus.online_cpus(args.get("target"))  # typed and bounded by the schema


class Channel:
    """The guest end of the virtio-serial port, with reconnect and resync."""

    def __init__(self, path: str, write_timeout: float = 5.0) -> None:
        self.path = path
        self.write_timeout = write_timeout
        self.fd: int | None = None
        self.reader = proto.FrameReader()
        self.lock = threading.Lock()  # worker threads send too (threaded ops, emit)

    def open(self) -> None:
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENXIO):
                    raise
                _load_virtio_console()
                time.sleep(0.5)
        self.reader = proto.FrameReader()
        self.reader.hunt()  # bytes queued before we opened may start mid-frame
        log.info("opened %s", self.path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        with self.lock:
            return self._send(header, payload)

    def _send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        """Write the frame's head, then the payload from the caller's buffer (no joined copy
        of a multi-MiB chunk). Writes first and waits in select only when the port is full:
        virtio-console takes at most 32 KiB per write, so a 4 MiB chunk is ~128 writes."""
        if self.fd is None:
            return False
        head = proto.encode_head(header, len(payload))
        if len(payload) <= 65536:
            return self._write_all(header, memoryview(head + bytes(payload)))
        return self._write_all(header, memoryview(head)) and self._write_all(header, memoryview(payload))

    def _write_all(self, header: dict[str, Any], data: memoryview) -> bool:
        deadline = time.monotonic() + self.write_timeout
        while data:
            assert self.fd is not None
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("write timed out (host not reading); dropped %s", header.get("type"))
                return False
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                select.select([], [self.fd], [], left)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ENOTCONN):  # host side closed
                    time.sleep(0.2)
                    continue
                raise
            data = data[n:]
        return True


def _load_virtio_console() -> None:
    if not os.path.exists("/sys/module/virtio_console"):
        subprocess.run(["modprobe", "virtio_console"], check=False, capture_output=True)


def handle(msg: proto.Message) -> tuple[dict[str, Any], bytes] | None:
    """Answer one message; returns the reply frame (header, payload) or None."""
    if msg.type == "hello":
        return hello_frame(), b""
    if msg.type != "req":
        return None
    mid = msg.header["id"]
    name = msg.header["op"]
    fn = OPS.get(name)
    if fn is None:
        return proto.response_error(mid, f"unknown op {name!r}", schema.UNSUPPORTED), b""
    args = msg.header.get("args") or {}
    declared = name in schema.ALIASES
    try:
        if declared:
            schema.decode_request(name, args)
            schema.check_payload(name, msg.payload, "request")
    except schema.SchemaError as exc:
        return proto.response_error(mid, f"{name}: {exc}", schema.INVALID), b""
    try:
        result = fn(args, msg.payload)
    except Exception as exc:  # a failing op answers with an error; the agent lives on
        log.exception("op %s failed", name)
        return proto.response_error(mid, f"{type(exc).__name__}: {exc}", error_code(exc)), b""
    payload = b""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], (bytes, bytearray)):
        result, payload = result[0], bytes(result[1])
    try:
        if declared:
            schema.encode_reply(name, result)
            schema.check_payload(name, payload, "reply")
    except schema.SchemaError as exc:  # our own bug: say so rather than send what the host refuses
        log.error("op %s: reply does not fit its schema: %s", name, exc)
        return proto.response_error(mid, f"{name}: reply does not fit its schema: {exc}", schema.INTERNAL), b""
    return proto.response_ok(mid, result), payload


# Exception classes (by name, through the MRO: the agent's parts define their own) -> error code.
_CODES = {
    "InvalidSpec": schema.INVALID, "StreamError": schema.INVALID, "SchemaError": schema.INVALID,
    "ValueError": schema.INVALID, "TypeError": schema.INVALID,
    "NoSuchContainer": schema.NOT_FOUND, "FileNotFoundError": schema.NOT_FOUND,
    "Conflict": schema.CONFLICT, "FileExistsError": schema.CONFLICT,
    "NotImplementedError": schema.UNSUPPORTED, "BlockingIOError": schema.BUSY, "TimeoutError": schema.TIMEOUT,
}  # fmt: skip


def error_code(exc: BaseException) -> str:
    """The code of a handler's exception: its ``code`` attribute, else its nearest known class."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in schema.ERROR_CODES:
        return code
    for cls in type(exc).__mro__:
        if cls.__name__ in _CODES:
            return _CODES[cls.__name__]
    return schema.INTERNAL


def hello_frame() -> dict[str, Any]:
    return proto.hello(
        "agent",
        __version__,
        sorted(OPS),
        boot_id=stats.boot_id(),
        pid=os.getpid(),
        started=_STARTED,
    )


_STARTED = time.time()


def _answer_in_thread(channel: Channel, msg: proto.Message) -> None:
    reply = handle(msg)
    if reply is not None:
        channel.send(*reply)


HUNG_UP_SLEEP_S = (0.5, 2.0)  # host not connected: re-check after 0.5 s, backing off to 2 s


def serve(channel: Channel, stop: Callable[[], bool] = lambda: False, wake_fd: int | None = None) -> None:
    """Serve until ``stop()``; reopen the port after protocol errors or hang-ups.

    With ``wake_fd`` (readable when ``stop()`` may have turned true: main() gives the signal
    wake-up pipe) an idle agent blocks in poll until the host writes: no timer of its own
    wakes the guest (under TCG each wake-up costs host CPU). Without it, poll wakes once a
    second to look at ``stop()``. While the host end is not connected the port reports
    POLLHUP at once, so the loop sleeps instead, backing off from 0.5 to 2 s (the host greets
    again every 3 s until it has a hello).
    """
    global _CURRENT
    _CURRENT = channel
    timeout_ms = -1 if wake_fd is not None else 1000
    while not stop():
        channel.open()
        channel.send(hello_frame())
        hung_up = False
        hup_sleep = HUNG_UP_SLEEP_S[0]
        try:
            while not stop():
                assert channel.fd is not None
                poll = select.poll()
                poll.register(channel.fd, select.POLLIN | select.POLLHUP)
                if wake_fd is not None:
                    poll.register(wake_fd, select.POLLIN)
                events = poll.poll(timeout_ms)
                if wake_fd is not None and any(fd == wake_fd for fd, _ in events):
                    _drain(wake_fd)
                ev = next((e for fd, e in events if fd == channel.fd), 0)
                if not ev:
                    continue
                if ev & select.POLLHUP and not ev & select.POLLIN:
                    # Host side not connected: wait, and greet it when it comes back.
                    hung_up = True
                    _sleep_unless_woken(hup_sleep, wake_fd)
                    hup_sleep = min(2 * hup_sleep, HUNG_UP_SLEEP_S[1])
                    continue
                hup_sleep = HUNG_UP_SLEEP_S[0]
                if hung_up:
                    hung_up = False
                    channel.reader.hunt()
                    channel.send(hello_frame())
                try:
                    data = _drain_port(channel.fd)
                except BlockingIOError:
                    continue
                if not data:
                    hung_up = True
                    _sleep_unless_woken(hup_sleep, wake_fd)
                    hup_sleep = min(2 * hup_sleep, HUNG_UP_SLEEP_S[1])
                    continue
                for msg in channel.reader.feed(data):
                    if msg.type == "req" and msg.header["op"] in THREADED:
                        threading.Thread(target=_answer_in_thread, args=(channel, msg), daemon=True).start()
                        continue
                    reply = handle(msg)
                    if reply is not None:
                        channel.send(*reply)
        except proto.ProtocolError as exc:
            log.warning("protocol error from host, resetting channel: %s", exc)
        finally:
            channel.close()


READ_BATCH = 1 << 20  # bytes taken from the port per loop iteration at most


def _drain_port(fd: int, limit: int = READ_BATCH) -> bytes:
    """Read what the port holds, up to ``limit``: the first read may raise BlockingIOError.

    virtio-console hands over one receive buffer (4 KiB) per read(), whatever its size, so a
    relayed 4 MiB frame took ~1000 poll-loop iterations (poll object, poll, read, frame
    reader) under TCG. Reading on until EAGAIN and feeding the frame reader once per batch
    costs one read per buffer and nothing else. b"" means end of file (host hung up).
    """
    first = os.read(fd, 65536)
    if not first:
        return first
    parts = [first]
    got = len(first)
    while got < limit:
        try:
            more = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            break
        if not more:
            break  # a hang-up: the next poll reports it
        parts.append(more)
        got += len(more)
    return first if len(parts) == 1 else b"".join(parts)


def _drain(fd: int) -> None:
    """Empty the (readable) wake-up fd: one read, so that a blocking pipe cannot hang us."""
    try:
        os.read(fd, 512)
    except (BlockingIOError, InterruptedError):
        pass


def _sleep_unless_woken(seconds: float, wake_fd: int | None) -> None:
    """Sleep, but return early when ``wake_fd`` turns readable (a stop signal)."""
    if wake_fd is None:
        time.sleep(seconds)
        return
    r, _, _ = select.select([wake_fd], [], [], seconds)
    if r:
        _drain(wake_fd)


def stop_pipe() -> int:
    """A pipe that the SIGTERM/SIGINT handlers' wake-up writes to: its read end for serve()."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="symbiont-agent", description=__doc__)
    ap.add_argument("--port", default="/dev/virtio-ports/org.symbiont.agent.0", help="virtio-serial port")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    wake = stop_pipe()
    load_op_modules()
    log.info("symbiont-agent %s starting on %s (ops: %s)", __version__, args.port, ", ".join(sorted(OPS)))
    serve(Channel(args.port), stop=lambda: stopping, wake_fd=wake)


if __name__ == "__main__":
    main()
