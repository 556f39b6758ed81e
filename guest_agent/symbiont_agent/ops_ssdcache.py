"""Guest side of the elastic SSD cache (SymFlex) and of DoubleDecker's VM-level split.

Standard library only (runs under the guest's /usr/bin/python3).

The cache: the host exports a virtual SSD (``/dev/vdX`` with serial ``symbiont-cache``) of a
fixed size, of which only some 1 MiB logical blocks are backed; the host tells us which. This
module keeps a *read cache of 1 MiB lines* of a slower disk (serial ``symbiont-slow``, an
HDD-like disk throttled by libvirt iotune) in the backed blocks of the virtual SSD:

* a hit reads the page from the SSD; a miss reads the whole line from the slow disk, serves
  the page and stores the line in a free backed block, evicting the least recently used line
  when none is free;
* the host decides how many blocks we have; *we* decide which to give back: on
  ``ssdcache-release N`` we hand back free blocks first, then the coldest lines (LRU);
* correctness across resizing: a block's data is used only while the block is backed and its
  line is marked valid under the lock; a read that fails with EIO (the host took the block
  without asking) or that raced with a release is treated as a miss; the host never re-grants
  a block it took silently until we acknowledged a config, so we never mistake fresh zeros
  for cached data;
* the index (block → line) is persisted in ``/var/lib/symbiont-agent/ssdcache.json`` before a
  block is reused and after it is filled, so a persistent cache is warm again after a reboot.

Both disks are used with O_DIRECT, so the guest's page cache does not hide the devices.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import threading
import time
from typing import Any

from symbiont_agent.agent import op

BLOCK = 1 << 20
PAGE = 4096
CACHE_SERIAL = "symbiont-cache"
SLOW_SERIAL = "symbiont-slow"
STATE_FILE = "/var/lib/symbiont-agent/ssdcache.json"
MAX_BLOCKS = 1 << 20  # bound on anything the host sends (a 1 TiB virtual SSD)
MAX_RUNS = 65536


def find_disk(serial: str, sys_block: str = "/sys/block") -> str | None:
    """``/dev/vdX`` of the virtio disk whose serial is ``serial``."""
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(sys_block, name, "serial")) as fh:
                if fh.read().strip() == serial:
                    return "/dev/" + name
        except OSError:
            continue
    return None


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}")
    return v


def parse_runs(runs: Any, limit: int) -> list[int]:
    """``[[start, count], ...]`` → block numbers, validated against ``limit``."""
    if not isinstance(runs, list) or len(runs) > MAX_RUNS:
        raise ValueError("block runs must be a list of at most 65536 [start, count] pairs")
    out: list[int] = []
    for r in runs:
        if not isinstance(r, list) or len(r) != 2:
            raise ValueError("each run is [start, count]")
        s = _int(r[0], 0, limit - 1, "run start")
        n = _int(r[1], 1, limit - s, "run count")
        out.extend(range(s, s + n))
        if len(out) > limit:
            raise ValueError("more blocks than the disk has")
    return out


def to_runs(values: Any) -> list[list[int]]:
    out: list[list[int]] = []
    for v in sorted(values):
        if out and out[-1][0] + out[-1][1] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def _open_direct(path: str) -> int:
    """O_DIRECT (the page cache must not hide the devices), or plain where the file system
    refuses it (tmpfs, in tests)."""
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, os.O_RDWR)


class Slot:
    __slots__ = ("state", "line", "last", "token")

    def __init__(self) -> None:
        self.state = "free"  # free | filling | valid
        self.line: int | None = None
        self.last = 0.0
        self.token = 0


class GuestCache:
    """A read cache of 1 MiB lines of the slow disk, in the backed blocks of the elastic SSD."""

    def __init__(self, state_file: str | None = None, cache_dev: str | None = None,
                 slow_dev: str | None = None) -> None:
        self.lock = threading.RLock()
        self.state_file = state_file or os.environ.get("SYMBIONT_SSDCACHE_STATE", STATE_FILE)
        self.cache_dev = cache_dev  # explicit paths (tests); otherwise found by serial
        self.slow_dev = slow_dev
        self.vm = ""
        self.device: str | None = None
        self.slow: str | None = None
        self.fd = -1
        self.slow_fd = -1
        self.size_blocks = 0
        self.epoch = -1
        self.slots: dict[int, Slot] = {}  # backed blocks
        self.index: dict[int, int] = {}  # line -> block
        self.persisted: dict[int, int] = {}  # block -> line, from the state file (until confirmed)
        self.hits = 0
        self.misses = 0
        self.eio = 0
        self.fills = 0
        self.evictions = 0
        self.released = 0
        self._tokens = 0
        self._opened_at = 0.0
        self._load()

    # -- persistence ----------------------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.state_file) as fh:
                data = json.load(fh)
            self.vm = str(data.get("vm", ""))[:64]
            entries = data.get("entries", {})
            self.persisted = {int(k): int(v) for k, v in entries.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.persisted = {}

    def _save(self) -> None:
        entries = {str(b): s.line for b, s in self.slots.items() if s.state == "valid" and s.line is not None}
        tmp = self.state_file + ".tmp"
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.state_file), exist_ok=True)
            with open(tmp, "w") as fh:
                json.dump({"vm": self.vm, "entries": entries}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_file)

    # -- devices --------------------------------------------------------------------------
    def _open(self) -> None:
        dev = self.cache_dev or find_disk(CACHE_SERIAL)
        if dev != self.device:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self.device = dev
        if dev and self.fd < 0:
            self.fd = _open_direct(dev)
        slow = self.slow_dev or find_disk(SLOW_SERIAL)
        if slow != self.slow:
            if self.slow_fd >= 0:
                os.close(self.slow_fd)
                self.slow_fd = -1
            self.slow = slow
        if slow and self.slow_fd < 0:
            self.slow_fd = _open_direct(slow)

    # The three I/O primitives (a host-side emulation of a guest may override them).
    def ssd_read(self, buf: Any, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)

    def ssd_write(self, buf: Any, offset: int) -> int:
        return os.pwritev(self.fd, [buf], offset)

    def slow_read(self, buf: Any, offset: int) -> int:
        return os.preadv(self.slow_fd, [buf], offset)

    # -- membership (host requests) -------------------------------------------------------
    def configure(self, args: dict[str, Any]) -> dict[str, Any]:
        size = _int(args.get("size_blocks"), 1, MAX_BLOCKS, "size_blocks")
        backed = set(parse_runs(args.get("backed", []), size))
        vm = args.get("vm", "")
        if not isinstance(vm, str) or len(vm) > 64:
            raise ValueError("vm must be a short string")
        with self.lock:
            if vm != self.vm:  # a different cache: nothing we remember applies
                self.slots.clear()
                self.index.clear()
                self.persisted = {}
                self.vm = vm
            self.size_blocks = size
            for b in list(self.slots):
                if b not in backed:
                    self._drop(b)
            for b in backed:
                if b not in self.slots:
                    s = Slot()
                    line = self.persisted.pop(b, None)
                    if line is not None and line not in self.index:
                        s.state, s.line = "valid", line
                        self.index[line] = b
                    self.slots[b] = s
            self.persisted = {}
            self.epoch = _int(args.get("epoch", 0), 0, 1 << 62, "epoch")
            with contextlib.suppress(OSError):
                self._open()
            self._save()
            return self.status()

    def grant(self, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            limit = self.size_blocks or MAX_BLOCKS
            for b in parse_runs(args.get("lbns", []), limit):
                self.slots.setdefault(b, Slot())
            self.epoch = _int(args.get("epoch", self.epoch), 0, 1 << 62, "epoch")
            return {"epoch": self.epoch, "backed_blocks": len(self.slots)}

    def revoke(self, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            limit = self.size_blocks or MAX_BLOCKS
            for b in parse_runs(args.get("lbns", []), limit):
                self._drop(b)
            self._save()
            self.epoch = _int(args.get("epoch", self.epoch), 0, 1 << 62, "epoch")
            return {"epoch": self.epoch, "backed_blocks": len(self.slots)}

    def coldest(self, n: int) -> list[int]:
        """Blocks in the order we would give them back: free ones, then LRU lines, then fills."""
        with self.lock:
            rank = {"free": 0, "valid": 1, "filling": 2}
            order = sorted(self.slots.items(), key=lambda kv: (rank[kv[1].state], kv[1].last, kv[0]))
            return [b for b, _ in order[:n]]

    def release(self, args: dict[str, Any]) -> dict[str, Any]:
        n = _int(args.get("count"), 0, MAX_BLOCKS, "count")
        with self.lock:
            chosen = self.coldest(n)
            for b in chosen:
                self._drop(b)
            self.released += len(chosen)
            self._save()
            self.epoch = _int(args.get("epoch", self.epoch), 0, 1 << 62, "epoch")
            return {"lbns": to_runs(chosen), "epoch": self.epoch, "backed_blocks": len(self.slots)}

    def _drop(self, b: int) -> None:
        s = self.slots.pop(b, None)
        if s is not None and s.line is not None and self.index.get(s.line) == b:
            del self.index[s.line]

    # -- data path ------------------------------------------------------------------------
    def _reopen(self) -> None:
        """Find the disks again (after a hot-plug), at most once a second."""
        now = time.monotonic()
        if (self.fd < 0 or self.slow_fd < 0) and now - self._opened_at > 1.0:
            self._opened_at = now
            with contextlib.suppress(OSError):
                self._open()

    def read(self, offset: int, length: int = PAGE) -> bytes:
        """Read ``length`` bytes (page-aligned, within one line) of the slow disk through the cache."""
        line, off = divmod(offset, BLOCK)
        if off % PAGE or length % PAGE or off + length > BLOCK:
            raise ValueError("reads must be page-aligned and within one 1 MiB line")
        self._reopen()
        with self.lock:
            b = self.index.get(line)
            s = self.slots.get(b) if b is not None else None
            token = s.token if s is not None and s.state == "valid" else None
            if token is not None:
                s.last = time.monotonic()  # type: ignore[union-attr]
        if token is not None and self.fd >= 0:
            buf = mmap.mmap(-1, length)
            try:
                self.ssd_read(buf, b * BLOCK + off)  # type: ignore[operator]
                with self.lock:
                    s2 = self.slots.get(b)  # type: ignore[arg-type]
                    still = s2 is not None and s2.state == "valid" and s2.token == token and s2.line == line
                if still:
                    self.hits += 1
                    return bytes(buf)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                self.eio += 1
                with self.lock:
                    self._drop(b)  # type: ignore[arg-type]
            finally:
                buf.close()
        return self._miss(line, off, length)

    def _miss(self, line: int, off: int, length: int) -> bytes:
        self.misses += 1
        if self.slow_fd < 0:
            raise OSError(errno.ENODEV, "no slow disk")
        data = mmap.mmap(-1, BLOCK)
        try:
            n = self.slow_read(data, line * BLOCK)
            if n < off + length:
                raise OSError(errno.EIO, f"short read of line {line}")
            page = bytes(data[off : off + length])
            self._fill(line, data)
            return page
        finally:
            data.close()

    def _fill(self, line: int, data: mmap.mmap) -> None:
        with self.lock:
            if line in self.index or not self.slots or self.fd < 0:
                return
            free = [b for b, s in self.slots.items() if s.state == "free"]
            if free:
                b = min(free)
            else:
                valid = [(s.last, b) for b, s in self.slots.items() if s.state == "valid"]
                if not valid:
                    return
                b = min(valid)[1]
                self._drop(b)
                self.slots[b] = Slot()
                self.evictions += 1
                self._save()  # the old line is forgotten on disk before its block is overwritten
            s = self.slots[b]
            self._tokens += 1
            s.state, s.line, s.token, s.last = "filling", line, self._tokens, time.monotonic()
            token = s.token
        try:
            self.ssd_write(data, b * BLOCK)
        except OSError as exc:
            with self.lock:
                if exc.errno == errno.EIO:
                    self.eio += 1
                    self._drop(b)
                elif self.slots.get(b) is s:
                    s.state, s.line = "free", None
            return
        with self.lock:
            cur = self.slots.get(b)
            if cur is not None and cur.token == token and cur.state == "filling":
                cur.state = "valid"
                self.index[line] = b
                self.fills += 1
                self._save()

    def status(self) -> dict[str, Any]:
        self._reopen()  # the disks may have been hot-plugged after the config
        with self.lock:
            total = self.hits + self.misses
            return {
                "vm": self.vm, "device": self.device or "", "slow_device": self.slow or "",
                "size_blocks": self.size_blocks, "backed_blocks": len(self.slots),
                "cached_blocks": sum(1 for s in self.slots.values() if s.state == "valid"),
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "eio": self.eio, "fills": self.fills, "evictions": self.evictions, "released": self.released,
                "epoch": max(self.epoch, 0),
            }


def line_pattern(line: int) -> bytes:
    """What line ``line`` of a test slow disk holds: its byte, repeated (see the VM test)."""
    return bytes([line % 251 + 1])


class Workload:
    """Random page reads over a working set of the slow disk, through the cache, in a thread."""

    def __init__(self, cache: GuestCache) -> None:
        self.cache = cache
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.ops = 0
        self.errors = 0
        self.mismatches = 0
        self.started = 0.0
        self.samples: list[tuple[float, int]] = []
        self.params: dict[str, Any] = {}

    def start(self, args: dict[str, Any]) -> dict[str, Any]:
        ws = _int(args.get("working_set_mib", 32), 1, 1 << 16, "working_set_mib")
        seconds = args.get("seconds", 3600)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= 86400:
            raise ValueError("seconds must be in (0, 86400]")
        io_kib = _int(args.get("io_kib", 4), 4, 1024, "io_kib")
        if io_kib % 4:
            raise ValueError("io_kib must be a multiple of 4")
        seed = _int(args.get("seed", 1), 0, 1 << 31, "seed")
        verify = bool(args.get("verify", False))
        self.stop()
        self.cache._open()
        if self.cache.slow_fd < 0:
            raise OSError(errno.ENODEV, f"no disk with serial {SLOW_SERIAL}")
        self.params = {"working_set_mib": ws, "seconds": seconds, "io_kib": io_kib, "seed": seed, "verify": verify}
        self.stop_event.clear()
        self.ops = 0
        self.errors = 0
        self.mismatches = 0
        self.samples = []
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(ws, float(seconds), io_kib * 1024, seed, verify),
                                       name="ssdcache-workload", daemon=True)
        self.thread.start()
        return {"started": True, **self.params}

    def _run(self, ws: int, seconds: float, io: int, seed: int, verify: bool) -> None:
        rng = random.Random(seed)
        end = time.monotonic() + seconds
        per_line = BLOCK // io
        while not self.stop_event.is_set() and time.monotonic() < end:
            line = rng.randrange(ws)
            try:
                data = self.cache.read(line * BLOCK + rng.randrange(per_line) * io, io)
                if verify and data != line_pattern(line)[:1] * io:
                    self.mismatches += 1
                self.ops += 1
            except OSError:
                self.errors += 1
                time.sleep(0.01)

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        return {"stopped": True, "ops": self.ops}

    def rate(self) -> float:
        """ops/s since the previous call (a sliding sample)."""
        now = time.monotonic()
        self.samples.append((now, self.ops))
        self.samples = self.samples[-2:]
        if len(self.samples) < 2:
            dt = now - self.started
            return self.ops / dt if dt > 0 else 0.0
        (t0, o0), (t1, o1) = self.samples
        return (o1 - o0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


CACHE = GuestCache()
WORKLOAD = Workload(CACHE)


@op("ssdcache-config")
def _config(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return CACHE.configure(args)


@op("ssdcache-grant")
def _grant(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return CACHE.grant(args)


@op("ssdcache-revoke")
def _revoke(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return CACHE.revoke(args)


@op("ssdcache-release")
def _release(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return CACHE.release(args)


@op("ssdcache-coldest")
def _coldest(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    n = _int(args.get("count", 16), 0, MAX_BLOCKS, "count")
    return {"lbns": CACHE.coldest(n)}


@op("ssdcache-status")
def _status(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    st = CACHE.status()
    st["workload"] = WORKLOAD.running
    st["ops_per_s"] = WORKLOAD.rate() if WORKLOAD.running else 0.0
    st["workload_ops"] = WORKLOAD.ops
    st["workload_errors"] = WORKLOAD.errors
    st["workload_mismatches"] = WORKLOAD.mismatches
    return st


@op("ssdcache-workload-start")
def _workload_start(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return WORKLOAD.start(args)


@op("ssdcache-workload-stop")
def _workload_stop(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return WORKLOAD.stop()


# -- DoubleDecker: the VM level ----------------------------------------------------------
TIERS = ("mem", "ssd")


def split_share(share: dict[str, Any], containers: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Split this VM's share of each tier (bytes) among its containers by their ``<T, W>``.

    ``containers``: ``{name: {"type": "mem"|"ssd", "weight": W}}``. Within each tier, each
    container of that type gets ``share[tier] · W / ΣW`` (integers, the remainder going to
    the largest fractions); a container of the other type gets nothing of this tier.
    """
    if not isinstance(share, dict) or not isinstance(containers, dict) or len(containers) > 4096:
        raise ValueError("share and containers must be objects (at most 4096 containers)")
    caps = {t: _int(share.get(t, 0), 0, 1 << 50, f"share.{t}") for t in TIERS}
    spec: dict[str, tuple[str, int]] = {}
    for name, c in containers.items():
        if not isinstance(name, str) or not 0 < len(name) <= 128 or not isinstance(c, dict):
            raise ValueError("container names are short strings, each with {type, weight}")
        t = str(c.get("type", "")).lower()
        if t not in TIERS:
            raise ValueError(f"container {name}: type must be mem or ssd")
        spec[name] = (t, _int(c.get("weight"), 0, 1_000_000, f"container {name} weight"))
    out = {name: {t: 0 for t in TIERS} for name in spec}
    for t in TIERS:
        members = {n: w for n, (tt, w) in spec.items() if tt == t and w > 0}
        wsum = sum(members.values())
        if not wsum:
            continue
        exact = {n: caps[t] * w / wsum for n, w in members.items()}
        for n, v in exact.items():
            out[n][t] = int(v)
        left = caps[t] - sum(out[n][t] for n in members)
        for n in sorted(members, key=lambda k: (-(exact[k] - int(exact[k])), k))[:left]:
            out[n][t] += 1
    return out


@op("doubledecker-split")
def _dd_split(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return {"split": split_share(args.get("share", {}), args.get("containers", {}))}
