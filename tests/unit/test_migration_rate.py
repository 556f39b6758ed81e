"""The migration stream's pure rules: Portkey's adaptive delay, the window, chunk validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from symbiont_agent import migration_rate as rate

MiB = 1 << 20


def test_seed_example() -> None:
    # The seed: 1 Gbps available, 4 MB to send, 3 MB free -> (4 - 3) MB / 1 Gbps = 7.8 ms.
    # 7.8 ms is 2**20 bytes over 2**30 bits/s (MB and Gbps in powers of two, as the slide computed).
    delay = rate.adaptive_delay(4 * MiB, 3 * MiB, (1 << 30) / 8)
    assert delay == pytest.approx(0.0078125)
    assert rate.adaptive_delay(4 * MiB, 4 * MiB, 1e9) == 0.0
    assert rate.adaptive_delay(4 * MiB, 0, 0) == rate.MAX_DELAY


@given(st.integers(0, 64 * MiB), st.integers(0, 64 * MiB), st.floats(1.0, 1e10))
def test_adaptive_delay_is_the_time_to_drain_the_missing_room(data: int, free: int, bw: float) -> None:
    d = rate.adaptive_delay(data, free, bw)
    assert 0.0 <= d <= rate.MAX_DELAY
    if data <= free:
        assert d == 0.0
    else:
        assert d == pytest.approx(min(rate.MAX_DELAY, (data - free) / bw))
        # More bandwidth never means a longer wait; more free space never either.
        assert rate.adaptive_delay(data, free, bw * 2) <= d
        assert rate.adaptive_delay(data, min(data, free + 1), bw) <= d


@given(st.integers(1, 1 << 30), st.integers(0, 1 << 31), st.integers(0, 1 << 31))
def test_free_space_never_exceeds_the_window(window: int, sent: int, acked: int) -> None:
    f = rate.free_space(window, sent, acked)
    assert 0 <= f <= window
    if acked >= sent:
        assert f == window


def test_fixed_delay_and_bandwidth_estimate() -> None:
    assert rate.fixed_delay(MiB, MiB) == 1.0
    with pytest.raises(ValueError):
        rate.fixed_delay(MiB, 0)
    est = rate.BandwidthEstimator(1e6, alpha=0.5)
    assert est.observe(4e6, 1.0) == pytest.approx(2.5e6)
    assert est.observe(0, 1.0) == pytest.approx(2.5e6)  # nothing observed: unchanged
    with pytest.raises(ValueError):
        rate.BandwidthEstimator(0)


def _manifest(data: bytes) -> dict[str, dict[str, object]]:
    return rate.validate_manifest([{"path": "img/1/pages-1.img", "size": len(data), "sha256": rate.sha256(data)}],
                                  1 << 30)  # fmt: skip


def test_chunk_validation_accepts_a_good_chunk_and_rejects_damage() -> None:
    data = bytes(range(256)) * 64
    files = _manifest(data)
    part = data[:4096]
    meta = {"path": "img/1/pages-1.img", "off": 0, "len": 4096, "crc": rate.crc32(part)}
    assert rate.validate_chunk(meta, part, files, MiB)["len"] == 4096
    flipped = bytes([part[0] ^ 1]) + part[1:]
    with pytest.raises(rate.StreamError, match="checksum"):
        rate.validate_chunk(meta, flipped, files, MiB)
    with pytest.raises(rate.StreamError, match="payload has"):
        rate.validate_chunk(meta, part[:-1], files, MiB)
    with pytest.raises(rate.StreamError, match="beyond"):
        rate.validate_chunk({**meta, "off": len(data) - 100}, part, files, MiB)
    with pytest.raises(rate.StreamError, match="not in the manifest"):
        rate.validate_chunk({**meta, "path": "img/1/other.img"}, part, files, MiB)
    with pytest.raises(rate.StreamError, match="chunk limit"):
        rate.validate_chunk(meta, part, files, 1024)
    for bad in ("../etc/passwd", "/etc/passwd", "img/../../x", "", "a/b/c/d/e"):
        with pytest.raises(rate.StreamError):
            rate.validate_chunk({**meta, "path": bad}, part, files, MiB)
    with pytest.raises(rate.StreamError):
        rate.validate_chunk({**meta, "off": -1}, part, files, MiB)
    with pytest.raises(rate.StreamError):
        rate.validate_chunk({**meta, "len": True}, part, files, MiB)


def test_manifest_limits() -> None:
    good = {"path": "files.tar", "size": 10, "sha256": "0" * 64}
    assert list(rate.validate_manifest([good], 10)) == ["files.tar"]
    with pytest.raises(rate.StreamError, match="limit"):
        rate.validate_manifest([good], 9)
    with pytest.raises(rate.StreamError, match="twice"):
        rate.validate_manifest([good, good], 100)
    with pytest.raises(rate.StreamError, match="sha256"):
        rate.validate_manifest([{**good, "sha256": "xyz"}], 100)
    with pytest.raises(rate.StreamError, match="size"):
        rate.validate_manifest([{**good, "size": -1}], 100)
    crc = {"path": "files.tar", "size": 10, "crc32": 0xDEADBEEF}  # what agents send now
    assert rate.validate_manifest([crc], 10)["files.tar"] == crc
    for bad in (-1, 1 << 32, True, "deadbeef", 1.5):
        with pytest.raises(rate.StreamError, match="crc32"):
            rate.validate_manifest([{**crc, "crc32": bad}], 100)
    with pytest.raises(rate.StreamError, match="sha256"):  # neither checksum
        rate.validate_manifest([{"path": "files.tar", "size": 10}], 100)
    with pytest.raises(rate.StreamError):
        rate.validate_manifest("nope", 100)
    with pytest.raises(rate.StreamError):
        rate.validate_mid("../x")
    assert rate.validate_mid("20260101-000000-abcdef") == "20260101-000000-abcdef"


def test_chunk_crc_must_be_an_unsigned_32_bit_integer() -> None:
    data = b"x" * 4096
    files = _manifest(data)
    meta = {"path": "img/1/pages-1.img", "off": 0, "len": 4096, "crc": rate.crc32(data)}
    for bad in (rate.sha256(data), -1, 1 << 32, True, None):
        with pytest.raises(rate.StreamError, match="crc"):
            rate.validate_chunk({**meta, "crc": bad}, data, files, MiB)


def test_precopy_stops_when_small_or_no_longer_shrinking() -> None:
    from symbiont.migration.controller import converged

    assert converged([40 * MiB], MiB) is None  # the first pre-dump is the whole memory
    assert converged([40 * MiB, 6 * MiB], MiB) is None
    assert converged([40 * MiB, 6 * MiB, 900 << 10], MiB) == "below-threshold"
    assert converged([40 * MiB, 6 * MiB, 5 * MiB], MiB) == "not-shrinking"  # writes as fast as it copies
    assert converged([40 * MiB, 6 * MiB, 3 * MiB], MiB) is None  # still halving: one more round
    assert converged([40 * MiB, 512 << 10], MiB) == "below-threshold"
