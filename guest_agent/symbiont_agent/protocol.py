"""The host–guest protocol: versioned, framed, JSON headers with binary payloads.

Standard library only: the same module runs in the daemon and under a stock guest python3.

A frame is::

    magic   4 bytes  b"SYMB"
    version 1 byte   PROTOCOL_VERSION
    flags   1 byte   reserved, must be 0
    jlen    4 bytes  big-endian length of the JSON header (1 .. MAX_JSON)
    blen    4 bytes  big-endian length of the binary payload (0 .. MAX_BINARY)
    json    jlen bytes, UTF-8, one JSON object
    binary  blen bytes, raw (CRIU images, block contents: never base64)

The JSON object has a ``type``:

* ``hello`` — either side, first frame after the channel opens: ``proto``, ``role``
  (``agent``/``host``), ``version``, ``caps`` (list of operation names), ``boot_id``.
* ``req`` — ``id`` (int), ``op`` (str), ``args`` (object).
* ``resp`` — ``id``, ``ok`` (bool), ``result`` or ``error`` (str).
* ``event`` — ``event`` (str), ``data`` (object); unsolicited, e.g. after a vCPU came online.

virtio-serial is a byte stream that survives the peer restarting, so a reader that joins
mid-stream *hunts* for the magic before its first frame (:meth:`FrameReader.hunt`); after
that, any malformed frame is a protocol error and the connection is dropped.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"SYMB"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sBBII")
HEADER_SIZE = HEADER.size  # 14
MAX_JSON = 1 << 20  # 1 MiB of JSON header
MAX_BINARY = 16 << 20  # 16 MiB of binary payload per frame
MAX_ID = 2**53
MESSAGE_TYPES = frozenset({"hello", "req", "resp", "event"})


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame: drop its connection."""


@dataclass
class Message:
    """One decoded frame."""

    header: dict[str, Any]
    payload: bytes = b""
    size: int = field(default=0)

    @property
    def type(self) -> str:
        return self.header["type"]


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Encode one frame. Raises ProtocolError when it would exceed the limits."""
    body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if not body or len(body) > MAX_JSON:
        raise ProtocolError(f"JSON header of {len(body)} bytes exceeds {MAX_JSON}")
    if len(payload) > MAX_BINARY:
        raise ProtocolError(f"binary payload of {len(payload)} bytes exceeds {MAX_BINARY}")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, len(body), len(payload)) + body + bytes(payload)


def validate(header: Any) -> dict[str, Any]:
    """Check the shape of a decoded JSON header; return it or raise ProtocolError."""
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    mtype = header.get("type")
    if mtype not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {mtype!r}")
    if mtype in ("req", "resp"):
        mid = header.get("id")
        if not isinstance(mid, int) or isinstance(mid, bool) or not 0 <= mid < MAX_ID:
            raise ProtocolError(f"{mtype} without a valid integer id")
    if mtype == "req":
        if not isinstance(header.get("op"), str) or len(header["op"]) > 64:
            raise ProtocolError("req without a valid op")
        if not isinstance(header.get("args", {}), dict):
            raise ProtocolError("req args must be an object")
    elif mtype == "resp":
        if not isinstance(header.get("ok"), bool):
            raise ProtocolError("resp without boolean ok")
    elif mtype == "event":
        if not isinstance(header.get("event"), str):
            raise ProtocolError("event without a name")
    elif mtype == "hello":
        if not isinstance(header.get("proto"), int):
            raise ProtocolError("hello without integer proto")
        caps = header.get("caps", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps) or len(caps) > 256:
            raise ProtocolError("hello caps must be a list of at most 256 strings")
    return header


class FrameReader:
    """Incremental decoder: feed bytes, take whole messages.

    Bounded: it never buffers more than one maximal frame, so a peer cannot make it grow.
    """

    def __init__(self, max_json: int = MAX_JSON, max_binary: int = MAX_BINARY) -> None:
        self.max_json = max_json
        self.max_binary = max_binary
        self._buf = bytearray()
        self.hunting = False
        self.discarded = 0

    def hunt(self) -> None:
        """Skip bytes until the next magic (after joining a stream mid-way)."""
        self.hunting = True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def mid_frame(self) -> bool:
        """True when a partial frame is waiting for more bytes (a truncation, if it never comes)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            if self.hunting:
                idx = self._buf.find(MAGIC)
                if idx < 0:
                    keep = len(MAGIC) - 1
                    drop = max(0, len(self._buf) - keep)
                    self.discarded += drop
                    del self._buf[:drop]
                    return out
                self.discarded += idx
                del self._buf[:idx]
            if len(self._buf) < HEADER_SIZE:
                return out
            magic, version, flags, jlen, blen = HEADER.unpack_from(self._buf)
            try:
                if magic != MAGIC:
                    raise ProtocolError(f"bad magic {bytes(magic)!r}")
                if version != PROTOCOL_VERSION:
                    raise ProtocolError(f"unsupported protocol version {version}")
                if flags != 0:
                    raise ProtocolError(f"reserved flags set: {flags:#x}")
                if not 0 < jlen <= self.max_json:
                    raise ProtocolError(f"JSON header length {jlen} outside 1..{self.max_json}")
                if blen > self.max_binary:
                    raise ProtocolError(f"binary payload length {blen} exceeds {self.max_binary}")
            except ProtocolError:
                if self.hunting:
                    # A false magic inside garbage: skip it and keep hunting.
                    del self._buf[:1]
                    self.discarded += 1
                    continue
                raise
            total = HEADER_SIZE + jlen + blen
            if len(self._buf) < total:
                return out
            raw = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + jlen])
            payload = bytes(self._buf[HEADER_SIZE + jlen : total])
            try:
                header = validate(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                if self.hunting:
                    del self._buf[:1]
                    self.discarded += 1
                    continue
                raise ProtocolError(f"frame header is not valid JSON: {exc}") from None
            except ProtocolError:
                if self.hunting:
                    del self._buf[:1]
                    self.discarded += 1
                    continue
                raise
            del self._buf[:total]
            self.hunting = False
            out.append(Message(header, payload, total))


def hello(role: str, version: str, caps: list[str], **extra: Any) -> dict[str, Any]:
    return {"type": "hello", "proto": PROTOCOL_VERSION, "role": role, "version": version, "caps": caps, **extra}


def request(mid: int, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "req", "id": mid, "op": op, "args": args or {}}


def response_ok(mid: int, result: Any) -> dict[str, Any]:
    return {"type": "resp", "id": mid, "ok": True, "result": result}


def response_error(mid: int, error: str) -> dict[str, Any]:
    return {"type": "resp", "id": mid, "ok": False, "error": error[:2000]}


def event(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "event", "event": name, "data": data or {}}
