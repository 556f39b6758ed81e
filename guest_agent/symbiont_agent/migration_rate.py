"""Pure pacing and validation rules of the migration stream (standard library only).

Shared by the guest agent (the sender paces itself) and the daemon (the relay checks what a
guest sends): both sides import this one module, and the unit tests exercise it directly.

Portkey's adaptive send rate: before a send of ``data`` bytes, with ``free`` bytes of room
left in the send buffer (here: the hypervisor relay's window) and ``bw`` bytes/s of available
bandwidth (the relay's measured drain rate), the sender waits

    delay = (data - free) / bw        (0 when the data fits now)

so that it wakes up when just enough has drained instead of polling the hypervisor. The
fixed-rate baseline sends every ``data / rate`` seconds whatever the buffer holds, and must
try again (a wasted VM-hypervisor interaction) whenever the buffer turns out to be full.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import deque

MODES = ("adaptive", "fixed")
MAX_CHUNK = (16 << 20) - (64 << 10)  # one frame: the protocol's 16 MiB payload less room for headers
MIN_CHUNK = 4096
MAX_DELAY = 2.0  # never sleep longer than this on an estimate: re-check instead
MID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}){0,3}$")


class StreamError(ValueError):
    """A chunk or manifest that must not be accepted (corrupt, out of bounds, unknown)."""


def adaptive_delay(data: int, free: int, bw: float) -> float:
    """Portkey's delay before sending ``data`` bytes: (data - free) / bw, at least 0."""
    if data <= free:
        return 0.0
    if bw <= 0:
        return MAX_DELAY
    return min(MAX_DELAY, (data - free) / bw)


def fixed_delay(data: int, rate: float) -> float:
    """The fixed-rate baseline: one send every ``data / rate`` seconds."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    return data / rate


def free_space(window: int, sent: int, acked: int) -> int:
    """Room left in the relay window: what was sent and not yet acknowledged takes space."""
    return max(0, window - max(0, sent - acked))


class BandwidthEstimator:
    """Exponentially weighted drain rate (bytes/s) from (bytes, seconds) observations."""

    def __init__(self, initial: float, alpha: float = 0.3) -> None:
        if initial <= 0 or not 0 < alpha <= 1:
            raise ValueError("initial > 0 and 0 < alpha <= 1")
        self.value = float(initial)
        self.alpha = alpha

    def observe(self, nbytes: int, seconds: float) -> float:
        if nbytes > 0 and seconds > 0:
            self.value = (1 - self.alpha) * self.value + self.alpha * (nbytes / seconds)
        return self.value


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_crc32(path: str, block: int = 1 << 20) -> int:
    """CRC-32 of a whole file (unsigned), read in ``block``-sized pieces."""
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc & 0xFFFFFFFF


def crc32(data: bytes | memoryview) -> int:
    """The per-chunk check of the stream: CRC-32 (zlib, a few GB/s on the host, far cheaper
    than SHA-256 in a TCG guest). It catches transmission damage; the end-to-end integrity
    is the manifest's SHA-256 per file, computed once by the source and checked once by the
    destination (``mig-verify``)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def validate_mid(mid: object) -> str:
    if not isinstance(mid, str) or not MID_RE.match(mid):
        raise StreamError(f"migration id {mid!r} must match {MID_RE.pattern}")
    return mid


def validate_relpath(path: object) -> str:
    """A path inside a migration's folder: a few plain components, never ``..`` or absolute."""
    if not isinstance(path, str) or not PATH_RE.match(path) or ".." in path.split("/"):
        raise StreamError(f"path {path!r} is not a plain relative path inside the migration folder")
    return path


def validate_manifest(manifest: object, max_total: int) -> dict[str, dict[str, object]]:
    """``[{path, size, crc32 | sha256}]`` → ``{path: entry}``; bounded in count and total size.

    ``crc32`` (of the whole file, unsigned) is what agents send now: the file's check at the
    destination costs 2 ms/MiB in a TCG guest instead of SHA-256's 23 ms/MiB, inside the freeze.
    ``sha256`` is still accepted from an older agent (and checked as such)."""
    if not isinstance(manifest, list) or len(manifest) > 4096:
        raise StreamError("manifest must be a list of at most 4096 files")
    out: dict[str, dict[str, object]] = {}
    total = 0
    for e in manifest:
        if not isinstance(e, dict):
            raise StreamError("manifest entries must be objects")
        path = validate_relpath(e.get("path"))
        size, digest, crc = e.get("size"), e.get("sha256"), e.get("crc32")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise StreamError(f"{path}: size must be a non-negative integer")
        entry: dict[str, object] = {"path": path, "size": size}
        if crc is not None:
            if isinstance(crc, bool) or not isinstance(crc, int) or not 0 <= crc <= 0xFFFFFFFF:
                raise StreamError(f"{path}: crc32 must be a 32-bit unsigned integer")
            entry["crc32"] = crc
        if digest is not None or crc is None:
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise StreamError(f"{path}: sha256 must be 64 hex digits (or give crc32)")
            entry["sha256"] = digest
        if path in out:
            raise StreamError(f"{path}: listed twice")
        total += size
        out[path] = entry
    if total > max_total:
        raise StreamError(f"manifest totals {total} bytes, more than the limit of {max_total}")
    return out


def validate_chunk(meta: object, payload: bytes, files: dict[str, dict[str, object]], max_chunk: int) -> dict:
    """Check one chunk's header against its payload and the manifest; return the header."""
    head = validate_chunk_head(meta, files, max_chunk)
    if head["crc"] is None:
        raise StreamError(f"{head['path']}@{head['off']}: a framed chunk needs its crc")
    if head["len"] != len(payload):
        raise StreamError(f"{head['path']}@{head['off']}: header says {head['len']} bytes, payload has {len(payload)}")
    check_crc(head, payload)
    return head


def check_crc(head: dict, data: bytes | memoryview) -> None:
    """The chunk's bytes (wherever they lie: a frame's payload or a shared region) match its CRC-32
    (no ``crc``: an shm chunk, whose bytes are checked once, by the file's CRC-32 at the end)."""
    if head["crc"] is not None and crc32(data) != head["crc"]:
        raise StreamError(f"{head['path']}@{head['off']}: checksum mismatch (corrupted chunk)")


def validate_chunk_head(meta: object, files: dict[str, dict[str, object]], max_chunk: int) -> dict:
    """A chunk's header alone (the ``shm`` channel carries no payload): path in the manifest,
    offset and length within the file and the chunk limit, a 32-bit CRC or none (``shm``
    chunks: no bytes cross a channel that could change them, so each file is checked once at the
    end against the manifest's CRC-32 instead of every chunk twice, at 2.1 ms/MiB per guest under TCG)."""
    if not isinstance(meta, dict):
        raise StreamError("chunk header must be an object")
    path = validate_relpath(meta.get("path"))
    entry = files.get(path)
    if entry is None:
        raise StreamError(f"chunk for {path!r}, which is not in the manifest")
    off, length, crc = meta.get("off"), meta.get("len"), meta.get("crc")
    for key, v in (("off", off), ("len", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise StreamError(f"chunk {key} must be a non-negative integer")
    assert isinstance(off, int) and isinstance(length, int)
    if length > max_chunk:
        raise StreamError(f"{path}@{off}: {length} bytes exceeds the chunk limit {max_chunk}")
    size = entry["size"]
    assert isinstance(size, int)
    if off + length > size:
        raise StreamError(f"{path}@{off}+{length}: beyond the file's {size} bytes")
    if crc is not None and (isinstance(crc, bool) or not isinstance(crc, int) or not 0 <= crc <= 0xFFFFFFFF):
        raise StreamError(f"{path}@{off}: crc must be a 32-bit unsigned integer")
    return {"path": path, "off": off, "len": length, "crc": crc}


# -- the ``shm`` channel: a per-VM shared region (ivshmem-plain BAR2 in the guest) -----------------
SHM_HEADER = 4096  # the region's first page: a 16-byte token (which device is this region); data after
SHM_TOKEN = 16


def shm_size(window: int, chunk: int) -> int:
    """Region size (a power of two, as ivshmem's BAR needs) for a relay window and chunk size:
    the header page, plus window + chunk of ring, which always has room for what the window
    admits (see :class:`Ring`), plus a byte for each empty file a manifest may list."""
    need = SHM_HEADER + window + chunk + 4096
    return 1 << max(20, (need - 1).bit_length())


def validate_span(at: object, length: int, data_size: int) -> int:
    """``at`` (an offset in a region's data area) and ``length`` lie inside its ``data_size`` bytes."""
    if isinstance(at, bool) or not isinstance(at, int) or at < 0 or at + length > data_size:
        raise StreamError(f"region span {at!r}+{length} outside the region's {data_size} data bytes")
    return at


class Ring:
    """Contiguous allocations in a region's data area, freed oldest first.

    The source guest reads each chunk into the next allocation of its region and frees the
    oldest ones once the relay says it took them; the relay allocates its copy in the
    destination's region and frees it when the destination wrote it. With ``size`` >= window
    + chunk and at most ``window`` bytes allocated, an allocation of up to ``chunk`` bytes
    always fits (the gap left at the end by a wrap is below ``chunk``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.q: deque[tuple[int, int]] = deque()

    def alloc(self, n: int) -> int | None:
        """Start of ``n`` contiguous bytes (an empty chunk takes one), or None: no room now."""
        n = max(1, n)
        if n > self.size:
            return None
        if not self.q:
            start = 0
        else:
            h, t = self.q[0][0], self.q[-1][1]
            if self.q[-1][0] >= h:  # not wrapped: room at the end, else at the start
                if t + n <= self.size:
                    start = t
                elif n <= h:
                    start = 0
                else:
                    return None
            elif t + n <= h:
                start = t
            else:
                return None
        self.q.append((start, start + n))
        return start

    def release(self, count: int = 1) -> None:
        """Free the ``count`` oldest allocations."""
        for _ in range(min(count, len(self.q))):
            self.q.popleft()

    def __len__(self) -> int:
        return len(self.q)
