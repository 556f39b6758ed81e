"""The host–guest framing: round trips, limits, resync, and fuzzing the decoder."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont_agent import protocol as proto


def test_round_trip_with_binary_payload() -> None:
    payload = bytes(range(256)) * 100
    frame = proto.encode(proto.request(7, "ping", {"echo": "x"}), payload)
    msgs = proto.FrameReader().feed(frame)
    assert len(msgs) == 1
    assert msgs[0].header == {"type": "req", "id": 7, "op": "ping", "args": {"echo": "x"}}
    assert msgs[0].payload == payload  # raw bytes, no base64


def test_byte_by_byte_feeding_yields_the_same_frames() -> None:
    frames = proto.encode(proto.hello("agent", "1", ["ping"])) + proto.encode(proto.response_ok(3, {"a": 1}))
    reader = proto.FrameReader()
    got = []
    for b in frames:
        got.extend(reader.feed(bytes([b])))
    assert [m.type for m in got] == ["hello", "resp"]
    assert not reader.mid_frame


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda f: b"XXXX" + f[4:], "bad magic"),
        (lambda f: f[:4] + b"\x09" + f[5:], "unsupported protocol version"),
        (lambda f: f[:5] + b"\x01" + f[6:], "reserved flags"),
    ],
)
def test_corrupt_headers_are_protocol_errors(mutate, reason) -> None:
    frame = mutate(proto.encode(proto.request(1, "ping")))
    with pytest.raises(proto.ProtocolError, match=reason):
        proto.FrameReader().feed(frame)


def test_oversized_lengths_are_refused_before_buffering() -> None:
    header = struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, proto.MAX_JSON + 1, 0)
    with pytest.raises(proto.ProtocolError, match="JSON header length"):
        proto.FrameReader().feed(header)
    header = struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, 10, proto.MAX_BINARY + 1)
    with pytest.raises(proto.ProtocolError, match="binary payload length"):
        proto.FrameReader().feed(header)


def test_smaller_configured_limits_apply() -> None:
    frame = proto.encode(proto.request(1, "ping"), b"x" * 100)
    with pytest.raises(proto.ProtocolError):
        proto.FrameReader(max_binary=10).feed(frame)


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"not json", "not valid JSON"),
        (b"[1,2]", "not a JSON object"),
        (json.dumps({"type": "nope"}).encode(), "unknown message type"),
        (json.dumps({"type": "req", "id": "1", "op": "x"}).encode(), "valid integer id"),
        (json.dumps({"type": "req", "id": -1, "op": "x"}).encode(), "valid integer id"),
        (json.dumps({"type": "req", "id": 1}).encode(), "valid op"),
        (json.dumps({"type": "resp", "id": 1}).encode(), "boolean ok"),
        (json.dumps({"type": "hello", "proto": 1, "caps": "ping"}).encode(), "caps"),
    ],
)
def test_invalid_json_headers(body: bytes, reason: str) -> None:
    frame = struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, len(body), 0) + body
    with pytest.raises(proto.ProtocolError, match=reason):
        proto.FrameReader().feed(frame)


def test_encode_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(proto.ProtocolError):
        proto.encode(proto.request(1, "x"), b"\0" * (proto.MAX_BINARY + 1))


def test_hunting_skips_garbage_and_partial_frames() -> None:
    good = proto.encode(proto.hello("agent", "1", []))
    partial = proto.encode(proto.response_ok(1, {"x": "y" * 50}))[:30]
    reader = proto.FrameReader()
    reader.hunt()
    msgs = reader.feed(b"\x00garbage SYMB\x01" + partial + good)
    # The partial frame claims more bytes than have arrived: the reader must wait ...
    assert msgs == [] and reader.hunting
    # ... and once they arrive, the bogus frame fails to parse and the reader resyncs on the
    # next magic, losing neither of the good frames.
    msgs = reader.feed(good)
    assert [m.type for m in msgs] == ["hello", "hello"]
    assert reader.discarded > 0 and not reader.hunting and reader.buffered == 0


def test_hunting_keeps_buffer_bounded() -> None:
    reader = proto.FrameReader()
    reader.hunt()
    for _ in range(100):
        reader.feed(b"\xff" * 10000)
    assert reader.buffered < len(proto.MAGIC)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_fuzz_decoder_raises_only_protocol_errors(data: bytes) -> None:
    reader = proto.FrameReader(max_json=1024, max_binary=1024)
    try:
        reader.feed(data)
    except proto.ProtocolError:
        return
    # Whatever was not consumed is less than one maximal frame.
    assert reader.buffered <= proto.HEADER_SIZE + 2048


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**31), st.text(min_size=1, max_size=20), st.binary(max_size=300)),
        min_size=1, max_size=8,
    ),
    st.integers(1, 64),
)
def test_any_split_of_a_stream_decodes_identically(items, chunk: int) -> None:
    stream = b"".join(proto.encode(proto.request(i, op), p) for i, op, p in items)
    reader = proto.FrameReader()
    got = []
    for k in range(0, len(stream), chunk):
        got.extend(reader.feed(stream[k : k + chunk]))
    assert [(m.header["id"], m.header["op"], m.payload) for m in got] == list(items)
