"""The host–guest framing: round trips, limits, resync, and fuzzing the decoder."""

from __future__ import annotations

import json
import os
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
    # The partial frame claims more bytes than follow it, but its JSON region runs into the
    # next frame's header (version and flags bytes cannot be JSON): it is skipped at once,
    # without waiting for bytes that would never parse, and neither good frame is lost.
    msgs = reader.feed(b"\x00garbage SYMB\x01" + partial + good)
    assert [m.type for m in msgs] == ["hello"] and not reader.hunting
    msgs = reader.feed(good)
    assert [m.type for m in msgs] == ["hello"]
    assert reader.discarded > 0 and not reader.hunting and reader.buffered == 0


def test_hunting_waits_for_a_clean_candidate_then_resyncs() -> None:
    good = proto.encode(proto.hello("agent", "1", []))
    # A candidate whose (clean, so far) JSON region is incomplete: the reader waits ...
    bogus = struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, 40, 0) + b'{"type": "hel'
    reader = proto.FrameReader()
    reader.hunt()
    assert reader.feed(bogus) == [] and reader.hunting and reader.mid_frame
    # ... and once its region is complete and does not parse, resyncs on the next magic.
    msgs = reader.feed(b"x" * 27 + good)
    assert [m.type for m in msgs] == ["hello"] and not reader.hunting and reader.buffered == 0


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


# -- hostile peers (issue 16) -------------------------------------------------------------


def _json_bytes_parsed(monkeypatch) -> list[int]:
    """Count the bytes the decoder hands to json.loads: parsing is where hunting used to burn."""
    parsed = [0]
    real = json.loads

    def counting(s, *args, **kwargs):
        parsed[0] += len(s)
        return real(s, *args, **kwargs)

    monkeypatch.setattr(proto.json, "loads", counting)
    return parsed


@pytest.mark.parametrize("jlen, blen", [(0x7F7F, 8 << 10), (4096, 8 << 10), (64, 0)])
def test_hunting_cost_is_linear_in_the_input(monkeypatch, jlen: int, blen: int) -> None:
    """Issue 16 item 1: fake headers with plausible sizes, 14 bytes apart, used to cost one
    wait + copy + parse of a whole frame each: O(input x frame size)."""
    parsed = _json_bytes_parsed(monkeypatch)
    attack = (b"SYMB\x01\x00" + struct.pack("!II", jlen, blen)) * ((256 << 10) // 14)
    good = proto.encode(proto.hello("agent", "1", []))
    reader = proto.FrameReader(max_binary=64 << 10)
    reader.hunt()
    got = []
    for k in range(0, len(attack), 65536):
        got.extend(reader.feed(attack[k : k + 65536]))
    assert parsed[0] <= len(attack), f"parsed {parsed[0]} bytes of JSON for {len(attack)} bytes of input"
    assert getattr(reader, "work", 0) <= 4 * len(attack)
    assert reader.buffered <= proto.HEADER_SIZE + jlen
    # The last fake header's region is still open; a real frame right after it resyncs.
    got.extend(reader.feed(b"\0" + good))
    assert [m.type for m in got] == ["hello"]


def test_the_issues_17_mib_payload_is_cheap(monkeypatch) -> None:
    """The exact payload of issue 16 item 1 (default limits): bounded work, nothing parsed."""
    parsed = _json_bytes_parsed(monkeypatch)
    chunk = (b"SYMB\x01\x00" + struct.pack("!II", 0x7F7F, 16 << 20)) * (65536 // 14)
    reader = proto.FrameReader()
    reader.hunt()
    total = 0
    while total < (17 << 20) + 300_000:
        assert reader.feed(chunk) == []
        total += len(chunk)
    assert parsed[0] == 0 and reader.work <= 4 * total and reader.buffered < 1024


def test_hunting_does_not_wait_for_a_large_candidate() -> None:
    """While hunting, a candidate may not make the reader wait for more than a small JSON."""
    good = proto.encode(proto.hello("agent", "1", []))
    big = struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, proto.HUNT_MAX_JSON + 1, 0)
    reader = proto.FrameReader()
    reader.hunt()
    assert [m.type for m in reader.feed(big + b"{" + good)] == ["hello"]


def test_hunting_parses_each_clean_region_once(monkeypatch) -> None:
    """Candidates whose JSON regions hold no control bytes are parsed, but they cannot overlap:
    parse cost stays within the input."""
    parsed = _json_bytes_parsed(monkeypatch)
    body = b'{"type": "nope", "pad": "' + b"y" * 1000 + b'"}'
    cand = struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, len(body), 0) + body
    reader = proto.FrameReader()
    reader.hunt()
    assert reader.feed(cand * 200) == []
    assert parsed[0] <= 200 * len(cand)


def _frame(body: bytes) -> bytes:
    return struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, len(body), 0) + body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"type": "event", "event": "x", "data": {"n": ' + b"9" * 5000 + b"}}", id="5000-digits"),
        pytest.param(b'{"type": "event", "event": "x", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     id="recursion"),
        pytest.param(b'{"type": "event", "event": "x", "data": ' + b"[" * 260 + b"]" * 260 + b"}", id="260-deep"),
        pytest.param(b'{"type": "event", "event": "x", "data": "\xff\xfe"}', id="not-utf8"),
    ],
)
def test_any_json_failure_is_a_protocol_error(body: bytes) -> None:
    """Issue 16 items 6/7: json.loads raises plain ValueError (int digits) and RecursionError."""
    with pytest.raises(proto.ProtocolError):
        proto.FrameReader().feed(_frame(body))


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", [[[["x"]]]]),
        ("version", "v" * 10_000),
        ("boot_id", {"a": 1}),
        ("role", "r" * 1000),
        ("pid", "1"),
        ("pid", True),
        ("pid", 2**70),
        ("started", "yesterday"),
        ("started", 1e300),
        ("caps", ["ok"] * 257),
        ("caps", ["c" * 1000]),
        ("caps", [1, 2]),
    ],
)
def test_hello_fields_are_typed_and_bounded(field: str, value) -> None:
    """Issue 16 item 7: a hello is stored and served; every field must be sane."""
    h = proto.hello("agent", "1.0", ["stats"], boot_id="b", pid=3, started=1.5)
    h[field] = value
    with pytest.raises(proto.ProtocolError, match=field if field != "version" else "version|deeper"):
        proto.FrameReader().feed(_frame(json.dumps(h).encode()))


def test_a_valid_hello_passes() -> None:
    h = proto.hello("agent", "1.0", ["stats"] * 256, boot_id="b" * 36, pid=3, started=1.5)
    assert proto.FrameReader().feed(proto.encode(h))[0].header == h


def test_error_messages_do_not_echo_unbounded_peer_data() -> None:
    with pytest.raises(proto.ProtocolError) as info:
        proto.FrameReader().feed(_frame(json.dumps({"type": "x" * 100_000}).encode()))
    assert len(str(info.value)) < 300


def test_pending_offset_marks_one_frame_however_slowly_it_arrives() -> None:
    """Item 10: the link's frame deadline runs from the pending frame's first byte; a trickle
    of bytes of the same frame must not look like a new frame."""
    a, b = proto.encode(proto.response_ok(1, {"x": 1})), proto.encode(proto.response_ok(2, {"y": 2}))
    reader = proto.FrameReader()
    assert reader.pending_offset is None
    reader.feed(a[:3])
    assert reader.pending_offset == 0
    for i in range(3, len(a) - 1):
        reader.feed(a[i : i + 1])
        assert reader.pending_offset == 0
    assert len(reader.feed(a[-1:] + b[:5])) == 1
    assert reader.pending_offset == len(a)


# -- the agent's end of the channel: batched reads, frames written without a joined copy ----------
def test_agent_drains_the_port_in_one_batch_up_to_a_limit() -> None:
    """virtio-console returns one 4 KiB receive buffer per read(); a SOCK_SEQPACKET pair does the
    same. The agent takes everything waiting (up to its batch limit) in one loop iteration."""
    import socket

    from symbiont_agent import agent

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        b.setblocking(False)
        a.setblocking(False)  # 12 packets fit its buffer; a full one raises instead of hanging
        data = os.urandom(12 * 4096)  # within the socket's buffer: the sends do not block
        for i in range(0, len(data), 4096):
            a.send(data[i:i + 4096])
        assert agent._drain_port(b.fileno(), limit=4 * 4096) == data[:4 * 4096]  # stops at the limit
        assert agent._drain_port(b.fileno()) == data[4 * 4096:]  # the rest, until EAGAIN
        with pytest.raises(BlockingIOError):
            agent._drain_port(b.fileno())
        a.close()
        assert agent._drain_port(b.fileno()) == b""  # hang-up: end of file
    finally:
        a.close()
        b.close()


def test_agent_channel_writes_big_frames_whole_through_a_full_port() -> None:
    """A 4 MiB chunk goes out as head + payload (no joined copy) and arrives intact, also when
    the port is full most of the time (the reader is slow: the writer waits in select)."""
    import socket
    import threading

    from symbiont_agent import agent

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    ch = agent.Channel("/nonexistent")
    ch.fd = a.fileno()
    payload = os.urandom(4 << 20)
    got: list[proto.Message] = []

    def slow_reader() -> None:
        reader = proto.FrameReader()
        while len(got) < 3:
            data = b.recv(32768)
            if not data:
                return
            got.extend(reader.feed(data))

    t = threading.Thread(target=slow_reader, daemon=True)
    t.start()
    try:
        assert ch.send(proto.event("mig-chunk", {"n": 1}), payload)
        assert ch.send(proto.event("small", {"n": 2}), b"xyz")
        assert ch.send(proto.event("none", {"n": 3}))
        t.join(10)
        assert [m.header["data"]["n"] for m in got] == [1, 2, 3]
        assert got[0].payload == payload and got[1].payload == b"xyz" and got[2].payload == b""
        assert proto.encode(proto.event("x"), payload)[-len(payload):] == payload  # encode unchanged
    finally:
        ch.fd = None
        a.close()
        b.close()
