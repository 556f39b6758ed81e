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
* ``resp`` — ``id``, ``ok`` (bool), ``result`` or ``error``: ``{"code", "message"}`` with a code
  from ``ops_schema.ERROR_CODES`` (agents up to 0.1.0 sent a ``"TypeName: message"`` string).
* ``event`` — ``event`` (str), ``data`` (object); unsolicited, e.g. after a vCPU came online.

virtio-serial is a byte stream that survives the peer restarting, so a reader that joins
mid-stream *hunts* for the magic before its first frame (:meth:`FrameReader.hunt`); after
that, any malformed frame is a protocol error and the connection is dropped. The peer is
untrusted: hunting costs O(input) whatever the bytes (a candidate's JSON header, at most
``HUNT_MAX_JSON``, is checked before its payload is waited for), any JSON failure is a
ProtocolError, headers nest at most ``MAX_DEPTH`` deep and hello fields are typed and bounded.
"""

from __future__ import annotations

import json
import math
import re
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


def encode_head(header: dict[str, Any], payload_len: int = 0) -> bytes:
    """A frame without its payload (fixed header + JSON): writers that send the payload
    after it, from their own buffer, save a copy of a multi-MiB chunk."""
    body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if not body or len(body) > MAX_JSON:
        raise ProtocolError(f"JSON header of {len(body)} bytes exceeds {MAX_JSON}")
    if payload_len > MAX_BINARY:
        raise ProtocolError(f"binary payload of {payload_len} bytes exceeds {MAX_BINARY}")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, len(body), payload_len) + body


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Encode one frame. Raises ProtocolError when it would exceed the limits."""
    head = encode_head(header, len(payload))
    return head + bytes(payload) if payload else head


MAX_DEPTH = 32  # nesting of a JSON header: deeper is an attack, not a message
MAX_SHORT = 128  # hello's version, boot_id, role; each of its caps
MAX_CAPS = 256
HUNT_MAX_JSON = 64 << 10  # while hunting, a candidate frame's JSON header must be this small
# Bytes that cannot occur anywhere in a JSON text (RFC 8259: control characters other than
# tab, LF and CR must be escaped inside strings and are not whitespace outside them). Every
# frame header carries two of them (version 1, flags 0), so a candidate whose JSON region
# overlaps a later header is rejected without parsing it: hunting stays O(input).
_NOT_JSON = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _short(value: Any, limit: int = 60) -> str:
    """A peer's value, bounded, for an error message (the peer controls its size)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _depth_ok(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``value`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        if d > limit:
            return False
        stack.extend((c, d + 1) for c in items if isinstance(c, (dict, list)))
    return True


def _short_str(header: dict[str, Any], key: str) -> None:
    v = header.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > MAX_SHORT):
        raise ProtocolError(f"hello {key} must be a string of at most {MAX_SHORT} characters, not {_short(v)}")


def validate_hello(header: dict[str, Any]) -> None:
    """A hello is stored and served (``GET /v1/vms``): every field is typed and bounded."""
    proto_v = header.get("proto")
    if not isinstance(proto_v, int) or isinstance(proto_v, bool):
        raise ProtocolError("hello without integer proto")
    _short_str(header, "role")
    _short_str(header, "version")
    _short_str(header, "boot_id")
    caps = header.get("caps", [])
    if (
        not isinstance(caps, list)
        or len(caps) > MAX_CAPS
        or not all(isinstance(c, str) and len(c) <= MAX_SHORT for c in caps)
    ):
        raise ProtocolError(f"hello caps must be a list of at most {MAX_CAPS} short strings")
    pid = header.get("pid")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 2**32):
        raise ProtocolError(f"hello pid must be an integer, not {_short(pid)}")
    for key in ("started", "time"):
        v = header.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e12
        ):
            raise ProtocolError(f"hello {key} must be a finite number, not {_short(v)}")


def validate(header: Any) -> dict[str, Any]:
    """Check the shape of a decoded JSON header; return it or raise ProtocolError."""
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    mtype = header.get("type")
    if mtype not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {_short(mtype)}")
    if not _depth_ok(header):
        raise ProtocolError(f"frame header nests deeper than {MAX_DEPTH} levels")
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
        if not isinstance(header.get("event"), str) or len(header["event"]) > 64:
            raise ProtocolError("event without a valid name")
    elif mtype == "hello":
        validate_hello(header)
    return header


def decode_json(raw: bytes) -> dict[str, Any]:
    """Parse and validate a JSON header; *any* failure is a ProtocolError.

    ``json.loads`` raises more than JSONDecodeError on hostile input: ValueError for an
    integer of more than 4300 digits, RecursionError for deep nesting.
    """
    try:
        return validate(json.loads(raw.decode("utf-8")))
    except ProtocolError:
        raise
    except (ValueError, RecursionError, MemoryError) as exc:  # JSONDecodeError, UnicodeDecodeError too
        raise ProtocolError(f"frame header is not valid JSON: {_short(str(exc), 120)}") from None


class FrameReader:
    """Incremental decoder: feed bytes, take whole messages.

    Bounded: it never buffers more than one maximal frame, so a peer cannot make it grow.
    Linear: every byte fed is scanned a bounded number of times, also while hunting, so a
    peer cannot make it spend more than O(input) (``work`` counts the bytes it touched).
    """

    def __init__(self, max_json: int = MAX_JSON, max_binary: int = MAX_BINARY) -> None:
        self.max_json = max_json
        self.max_binary = max_binary
        self.hunt_max_json = min(max_json, HUNT_MAX_JSON)
        self._buf = bytearray()
        self.hunting = False
        self.discarded = 0
        self.consumed = 0  # stream offset of _buf[0]
        self.work = 0  # bytes scanned, parsed or copied: a cost meter for tests
        self._header: tuple[int, int] | None = None  # (jlen, blen) of a frame whose JSON parsed
        self._parsed: dict[str, Any] | None = None
        # While hunting: no _NOT_JSON byte in _buf[HEADER_SIZE:_clean_upto]; one at _bad_at.
        self._clean_upto = 0
        self._bad_at = -1

    def hunt(self) -> None:
        """Skip bytes until the next magic (after joining a stream mid-way)."""
        self.hunting = True
        self._header = self._parsed = None
        self._clean_upto = 0
        self._bad_at = -1

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def mid_frame(self) -> bool:
        """True when a partial frame is waiting for more bytes (a truncation, if it never comes).

        While hunting, up to three trailing bytes that may begin a magic are not a frame.
        """
        if self.hunting:
            return len(self._buf) >= len(MAGIC)
        return bool(self._buf)

    @property
    def pending_offset(self) -> int | None:
        """Stream offset of the first byte of the pending frame (or hunting candidate), None
        when nothing is pending: a frame's deadline runs from when this offset first appeared."""
        return self.consumed if self.mid_frame else None

    def _check_lengths(self, version: int, flags: int, jlen: int, blen: int, magic: bytes) -> None:
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {version}")
        if flags != 0:
            raise ProtocolError(f"reserved flags set: {flags:#x}")
        jmax = self.hunt_max_json if self.hunting else self.max_json
        if not 0 < jlen <= jmax:
            raise ProtocolError(f"JSON header length {jlen} outside 1..{jmax}")
        if blen > self.max_binary:
            raise ProtocolError(f"binary payload length {blen} exceeds {self.max_binary}")

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        self.work += len(data)
        out: list[Message] = []
        while True:
            if self.hunting and self._header is None:
                if not self._hunt_step():
                    return out
                continue
            if self._header is None:
                # In sync: the next bytes must be a frame header.
                if len(self._buf) < HEADER_SIZE:
                    return out
                magic, version, flags, jlen, blen = HEADER.unpack_from(self._buf)
                self._check_lengths(version, flags, jlen, blen, magic)
                if len(self._buf) < HEADER_SIZE + jlen:
                    return out
                self._parsed = decode_json(self._copy(HEADER_SIZE, HEADER_SIZE + jlen))
                self._header = (jlen, blen)
            jlen, blen = self._header
            total = HEADER_SIZE + jlen + blen
            if len(self._buf) < total:
                return out  # the JSON parsed; waiting for the binary payload only
            payload = self._copy(HEADER_SIZE + jlen, total) if blen else b""
            header = self._parsed
            assert header is not None
            del self._buf[:total]
            self.consumed += total
            self._header = self._parsed = None
            self.hunting = False
            self._clean_upto, self._bad_at = 0, -1
            out.append(Message(header, payload, total))

    def _copy(self, start: int, end: int) -> bytes:
        self.work += end - start
        with memoryview(self._buf) as mv:
            return bytes(mv[start:end])

    def _hunt_step(self) -> bool:
        """Hunt for the next frame; True once a candidate's JSON header parsed, False when
        more bytes are needed.

        A candidate costs O(1) plus the bytes newly scanned: its header fields are checked
        first, its JSON region is scanned once (incrementally, across feeds) for bytes that
        JSON cannot contain, and only a clean, complete region is parsed (regions that are
        parsed cannot overlap a later candidate's header, so parsing is O(input) in all).
        A rejected candidate is skipped by jumping to the next magic. Positions are offsets
        into the buffer, which is trimmed once at the end.
        """
        buf = self._buf
        n = len(buf)
        pos, clean, bad_at = 0, self._clean_upto, self._bad_at
        jmax, bmax = self.hunt_max_json, self.max_binary
        unpack, find, search = HEADER.unpack_from, buf.find, _NOT_JSON.search
        found = False
        work = 0
        while True:
            idx = find(MAGIC, pos)
            if idx < 0:
                work += n - pos
                pos = max(pos, n - (len(MAGIC) - 1))
                break
            work += idx - pos + len(MAGIC)
            pos = idx
            if n - pos < HEADER_SIZE:
                break
            _, version, flags, jlen, blen = unpack(buf, pos)
            if version != PROTOCOL_VERSION or flags or not 0 < jlen <= jmax or blen > bmax:
                pos += 1  # a false magic inside garbage: on to the next one
                continue
            first, end = pos + HEADER_SIZE, pos + HEADER_SIZE + jlen
            if first <= bad_at < end:
                pos += 1  # its JSON region holds a byte that JSON cannot contain
                continue
            start = max(first, clean)
            stop = min(end, n)
            if start < stop:
                m = search(buf, start, stop)
                if m is not None:
                    work += m.start() + 1 - start
                    clean = bad_at = m.start()
                    pos += 1
                    continue
                work += stop - start
                clean = stop
            if n < end:
                break  # a clean candidate, incomplete: wait for the rest of its JSON
            work += jlen
            try:
                with memoryview(buf) as mv:
                    self._parsed = decode_json(bytes(mv[first:end]))
            except ProtocolError:
                pos += 1
                continue
            self._header = (jlen, blen)
            found = True
            break
        self.work += work
        if pos:
            del buf[:pos]
            self.discarded += pos
            self.consumed += pos
        self._clean_upto, self._bad_at = max(0, clean - pos), max(-1, bad_at - pos)
        return found


def hello(role: str, version: str, caps: list[str], **extra: Any) -> dict[str, Any]:
    return {"type": "hello", "proto": PROTOCOL_VERSION, "role": role, "version": version, "caps": caps, **extra}


def request(mid: int, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "req", "id": mid, "op": op, "args": args or {}}


def response_ok(mid: int, result: Any) -> dict[str, Any]:
    return {"type": "resp", "id": mid, "ok": True, "result": result}


def response_error(mid: int, error: str, code: str = "internal") -> dict[str, Any]:
    """A failed response: the error as a code the host acts on and a message for people."""
    return {"type": "resp", "id": mid, "ok": False, "error": {"code": code, "message": error[:2000]}}


def event(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "event", "event": name, "data": data or {}}
