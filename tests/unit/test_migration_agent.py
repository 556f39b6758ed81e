"""The destination agent's stream checks on a temporary folder: chunks, verification, CRIU's chain."""

from __future__ import annotations

import os

import pytest

from symbiont_agent import migration_rate as rate
from symbiont_agent import ops_migration as om
from symbiont_agent.containers import InvalidSpec


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setattr(om, "BASE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("kind", ["crc32", "sha256"])  # crc32 now; sha256 from an older source agent
def test_chunks_written_verified_and_damage_refused(base, kind) -> None:
    data = os.urandom(300_000)
    a, b = data[:200_000], data[200_000:]
    digest = rate.crc32(data) if kind == "crc32" else rate.sha256(data)
    man = [{"path": "img/final/pages-1.img", "size": len(data), kind: digest}]
    om._recv({"mid": "m1", "path": "img/final/pages-1.img", "off": 0, "crc": rate.crc32(a)}, a)
    with pytest.raises(InvalidSpec, match="truncated"):  # the last chunk never came
        om._verify({"mid": "m1", "files": man}, b"")
    bad = bytes([b[0] ^ 1]) + b[1:]
    with pytest.raises(InvalidSpec, match="checksum mismatch"):
        om._recv({"mid": "m1", "path": "img/final/pages-1.img", "off": 200_000, "crc": rate.crc32(b)}, bad)
    om._recv({"mid": "m1", "path": "img/final/pages-1.img", "off": 200_000, "crc": rate.crc32(b)}, b)
    assert om._verify({"mid": "m1", "files": man}, b"") == {"verified": 1, "bytes": len(data)}
    assert (base / "m1" / "img" / "final" / "pages-1.img").read_bytes() == data
    with pytest.raises(InvalidSpec, match="missing"):
        om._verify({"mid": "m1", "files": [*man, {"path": "files.tar", "size": 1, "sha256": "0" * 64}]}, b"")
    # A hole (a chunk in the middle never written) keeps the size but not the checksum.
    om._recv({"mid": "m4", "path": "f", "off": 200_000, "crc": rate.crc32(b)}, b)
    with pytest.raises(InvalidSpec, match="checksum mismatch"):
        om._verify({"mid": "m4", "files": [{**man[0], "path": "f"}]}, b"")
    for bad_path in ("../../etc/passwd", "/etc/shadow"):
        with pytest.raises(rate.StreamError):
            om._recv({"mid": "m1", "path": bad_path, "off": 0, "crc": rate.crc32(b"x")}, b"x")
    with pytest.raises(rate.StreamError):
        om._recv({"mid": "../m1", "path": "x", "off": 0, "crc": rate.crc32(b"x")}, b"x")


def test_parent_chain_and_abort_marker(base) -> None:
    d = base / "m2"
    for n in ("1", "2", "final"):
        (d / "img" / n).mkdir(parents=True)
    om._link_parents(str(d))
    assert os.readlink(d / "img" / "2" / "parent") == "../1"
    assert os.readlink(d / "img" / "final" / "parent") == "../2"
    assert not (d / "img" / "1" / "parent").exists()
    assert not om._is_aborted("m2")
    om._cleanup({"mid": "m2"}, b"")
    assert not d.exists()
    om._set_aborted("m2")
    assert om._is_aborted("m2")


def test_manifest_lists_files_with_checksums(base) -> None:
    d = base / "m3" / "img" / "1"
    d.mkdir(parents=True)
    (d / "a.img").write_bytes(b"hello")
    (d / "parent").symlink_to("../0")
    out = om._manifest({"mid": "m3", "paths": ["img/1"]}, b"")
    assert out["files"] == [{"path": "img/1/a.img", "size": 5, "crc32": rate.crc32(b"hello")}]
    big = os.urandom(3 << 20)  # the whole file's CRC-32, across the 1 MiB reads
    (d / "b.img").write_bytes(big)
    assert rate.file_crc32(str(d / "b.img")) == rate.crc32(big)
    with pytest.raises(InvalidSpec):
        om._manifest({"mid": "m3", "paths": []}, b"")


def test_huge_pages_split_per_anonymous_mapping_before_a_predump(tmp_path) -> None:
    """THP makes soft-dirty tracking 2 MiB-granular: the source agent splits the container's
    huge pages (one debugfs write per big private anonymous mapping) before each pre-dump."""
    from symbiont_agent import migration_criu as criu

    maps = (
        "55d0c0000000-55d0c0021000 r--p 00000000 fe:01 123 /usr/bin/python3.11\n"
        "55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0 [heap]\n"
        "7f0000000000-7f0002001000 rw-p 00000000 00:00 0 \n"
        "7f0002001000-7f0002002000 rw-p 00000000 00:00 0 \n"  # too small for a THP
        "7f0003000000-7f0004000000 rw-s 00000000 00:01 9 /dev/zero (deleted)\n"  # shared
        "7f0005000000-7f0006000000 rw-p 00000000 fe:01 77 /var/lib/x.db\n"  # file-backed
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n"
    )
    assert criu.anon_ranges(maps) == [(0x55D0C1000000, 0x55D0C1400000), (0x7F0000000000, 0x7F0002001000)]
    control = tmp_path / "split_huge_pages"
    control.write_text("")
    pid = os.getpid()  # a real process: its maps are read from /proc
    r = criu.split_huge_pages([pid, 1 << 30], str(control))  # the second pid does not exist
    lines = control.read_text()
    want = [f"{pid},{lo:#x},{hi:#x}" for lo, hi in criu.anon_ranges(open(f"/proc/{pid}/maps").read())]
    assert r["ranges"] == len(want) and all(w in lines for w in want)
    assert criu.split_huge_pages([pid], str(tmp_path / "missing"))["ranges"] == 0


def _pci(tmp_path, dev: str, size: int, token: bytes, ids: tuple[str, str] = ("0x1af4", "0x1110")):
    """A sysfs PCI device folder as the guest shows an ivshmem-plain device: ids, enable, BAR2."""
    d = tmp_path / "pci" / dev
    d.mkdir(parents=True)
    (d / "vendor").write_text(ids[0] + "\n")
    (d / "device").write_text(ids[1] + "\n")
    (d / "enable").write_text("0\n")
    with open(d / "resource2", "wb") as fh:
        fh.truncate(size)
        fh.write(token)
    return d


def test_shm_region_is_checked_and_chunks_are_written_from_it(base, tmp_path, monkeypatch) -> None:
    """The destination's side of the shm channel: the device must be ivshmem-plain of the
    right size with the host's token; a chunk is written from the region at ``at`` after its
    CRC; a span outside the region is refused."""
    monkeypatch.setattr(om, "PCI_DEVICES", str(tmp_path / "pci"))
    size, token = 1 << 20, os.urandom(16)
    d = _pci(tmp_path, "0000:00:07.0", size, token)
    _pci(tmp_path, "0000:00:08.0", size, os.urandom(16))  # another region: not this migration's
    _pci(tmp_path, "0000:00:09.0", size, token, ids=("0x1af4", "0x1000"))  # not ivshmem
    desc = {"dev": "0000:00:07.0", "size": size, "token": token.hex()}
    for dev, words in (("0000:00:08.0", "token"), ("0000:00:09.0", "not ivshmem"), ("0000:00:0a.0", "no PCI")):
        with pytest.raises(om.Conflict, match=words):
            om._shm({"mid": "m9", "shm": {**desc, "dev": dev}, "wait": 0.0}, b"")
    with pytest.raises(InvalidSpec, match="shm.size"):
        om._shm({"mid": "m9", "shm": {**desc, "size": size + 1}}, b"")
    with pytest.raises(om.Conflict, match="BAR2 has"):
        om._shm({"mid": "m9", "shm": {**desc, "size": size * 2}, "wait": 0.0}, b"")
    assert om._shm({"mid": "m9", "shm": desc}, b"") == {"mapped": size}
    assert (d / "enable").read_text() == "1"
    data = os.urandom(5000)
    with open(d / "resource2", "r+b") as fh:  # the relay's copy, at 1234 in the data area
        fh.seek(rate.SHM_HEADER + 1234)
        fh.write(data)
    args = {"mid": "m9", "path": "img/1/pages-1.img", "off": 0, "len": len(data), "crc": rate.crc32(data),
            "shm": desc, "at": 1234}  # fmt: skip
    assert om._recv(args, b"") == {"written": len(data)}
    assert (base / "m9" / "img" / "1" / "pages-1.img").read_bytes() == data
    with pytest.raises(InvalidSpec, match="checksum mismatch"):
        om._recv({**args, "crc": rate.crc32(data) ^ 1}, b"")
    nocrc = {k: v for k, v in args.items() if k != "crc"}  # what the relay forwards for shm chunks
    assert om._recv({**nocrc, "path": "img/1/pages-2.img"}, b"") == {"written": len(data)}
    assert (base / "m9" / "img" / "1" / "pages-2.img").read_bytes() == data
    with pytest.raises(InvalidSpec, match="checksum"):  # a framed chunk must carry one
        om._recv({k: v for k, v in nocrc.items() if k not in ("shm", "at")}, data)
    with pytest.raises(InvalidSpec, match="outside the region"):
        om._recv({**args, "at": size - rate.SHM_HEADER - 10}, b"")
    with pytest.raises(InvalidSpec):
        om._recv({**args, "at": -1}, b"")
    assert om._shm({"mid": "m9", "release": True}, b"") == {"released": True}
    assert om._shm({"mid": "m9", "release": True}, b"") == {"released": False}


def test_shm_sender_reads_into_its_region_and_reuses_what_the_relay_took(base, tmp_path, monkeypatch) -> None:
    """The source's side: each chunk lies in the region at ``at`` (no payload in the event), and
    with a window smaller than the files the ring is reused as the credits say chunks were taken."""
    from symbiont_agent import agent

    monkeypatch.setattr(om, "PCI_DEVICES", str(tmp_path / "pci"))
    size, token = 1 << 20, os.urandom(16)
    _pci(tmp_path, "0000:00:07.0", size, token)
    desc = {"dev": "0000:00:07.0", "size": size, "token": token.hex()}
    files = {"img/1/pages-1.img": os.urandom(2_500_000), "img/1/empty.img": b"", "img/1/core.img": os.urandom(3000)}
    for p, data in files.items():
        (base / "m8" / os.path.dirname(p)).mkdir(parents=True, exist_ok=True)
        (base / "m8" / p).write_bytes(data)
    got: dict[str, bytearray] = {p: bytearray() for p in files}
    n = {"taken": 0, "acked": 0}

    def emit(msg: dict, payload: bytes = b"") -> bool:
        meta = msg["data"]
        assert payload == b"" and 0 <= meta["at"] and meta["at"] + meta["len"] <= size - rate.SHM_HEADER
        with open(tmp_path / "pci" / "0000:00:07.0" / "resource2", "rb") as fh:  # the relay's copy
            fh.seek(rate.SHM_HEADER + meta["at"])
            chunk = fh.read(meta["len"])
        # no per-chunk CRC on this channel: each file is checked once at the end (mig-verify)
        assert "crc" not in meta and meta["off"] == len(got[meta["path"]])
        got[meta["path"]] += chunk
        n["taken"] += 1
        n["acked"] += len(chunk)
        om._credit({"mid": "m8", "acked": n["acked"], "taken": n["taken"], "bw": 1e9}, b"")
        return True

    monkeypatch.setattr(agent, "emit", emit)
    r = om._send({"mid": "m8", "paths": sorted(files), "chunk": 64 << 10, "window": 256 << 10, "shm": desc}, b"")
    assert r["channel"] == "shm" and r["bytes"] == sum(len(d) for d in files.values())
    assert {p: bytes(b) for p, b in got.items()} == files
    assert r["bytes"] > 2 * size  # the ring went round: the relay's ``taken`` freed its spans


def test_adaptive_sender_wakes_at_the_credit_not_at_a_low_estimate(base, monkeypatch) -> None:
    """A drain-rate estimate far too low (1 byte/s: Portkey's delay would be its 2 s cap per
    full window) must not hold the sender: it wakes when the relay's credit makes room."""
    import threading

    from symbiont_agent import agent

    data = os.urandom(64 << 10)
    (base / "m7" / "img").mkdir(parents=True)
    (base / "m7" / "img" / "a.img").write_bytes(data)
    acked = {"n": 0}

    def emit(msg: dict, payload: bytes = b"") -> bool:
        def ack() -> None:
            acked["n"] += msg["data"]["len"]
            om._credit({"mid": "m7", "acked": acked["n"], "bw": 1.0}, b"")

        threading.Timer(0.02, ack).start()
        return True

    monkeypatch.setattr(agent, "emit", emit)
    r = om._send({"mid": "m7", "paths": ["img/a.img"], "chunk": 4096, "window": 8192, "bw": 1.0}, b"")
    assert r["chunks"] == 16 and r["bytes"] == len(data)
    assert r["slept_s"] < 2.0, r  # 14 full windows: 28 s of estimated delay without the wake-up


def test_sender_stops_once_the_host_aborted_its_migration(base, monkeypatch) -> None:
    """A daemon killed mid-transfer leaves the sender running; the recovery's abort marker
    (mig-resume) stops it at its next chunk, before it reaches the next migration's relay."""
    from symbiont_agent import agent

    (base / "m6" / "img").mkdir(parents=True)
    (base / "m6" / "img" / "a.img").write_bytes(os.urandom(40 << 10))
    sent: list[dict] = []

    def emit(msg: dict, payload: bytes = b"") -> bool:
        sent.append(msg["data"])
        if len(sent) == 2:
            om._set_aborted("m6")
        return True

    monkeypatch.setattr(agent, "emit", emit)
    with pytest.raises(OSError, match="aborted"):
        om._send({"mid": "m6", "paths": ["img/a.img"], "chunk": 4096, "window": 1 << 20}, b"")
    assert len(sent) == 2
