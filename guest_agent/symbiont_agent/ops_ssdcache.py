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
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
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
        self.state = "free"  # free | filling | valid | lent (to the DoubleDecker store's SSD tier)
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
        self.on_lent_drop: Any = None  # called with a lent block the host took back
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
                for b in list(self.slots):
                    self._drop(b)
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
            rank = {"free": 0, "valid": 1, "lent": 2, "filling": 3}
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
        if s is not None and s.state == "lent" and self.on_lent_drop is not None:
            self.on_lent_drop(b)

    def lend(self, n: int) -> list[int]:
        """Hand up to ``n`` backed blocks to another user of the disk (the DoubleDecker store):
        free ones first, then the coldest cached lines. A lent block is never filled here."""
        with self.lock:
            order = sorted((0 if s.state == "free" else 1, s.last, b) for b, s in self.slots.items()
                           if s.state in ("free", "valid"))
            out = []
            for _, _, b in order[:n]:
                s = self.slots[b]
                if s.line is not None and self.index.get(s.line) == b:
                    del self.index[s.line]
                s.state, s.line = "lent", None
                out.append(b)
            if out:
                self._save()
            return out

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
                "lent_blocks": sum(1 for s in self.slots.values() if s.state == "lent"),
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


DD_SOCKET = "/run/symbiont-agent/doubledecker.sock"
PAGES_PER_BLOCK = BLOCK // PAGE
DD_MAX_CLIENTS = 64
DD_MAX_CONTAINERS = 256
CT_SUBTREE = "symbiont-ct"  # the containers part's cgroup subtree (containers.SUBTREE)


def container_of_pid(pid: int, proc: str = "/proc") -> str | None:
    """The container a process runs in: its cgroup v2 path is ``/symbiont-ct/NAME[/...]``."""
    try:
        with open(f"{proc}/{pid}/cgroup") as fh:
            text = fh.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            parts = [p for p in line[3:].strip().split("/") if p]
            if len(parts) >= 2 and parts[0] == CT_SUBTREE:
                return parts[1]
    return None


class DDStore:
    """DoubleDecker's VM level inside the guest: the VM's share of a memory tier (guest RAM)
    and of an SSD tier (4 KiB slots in blocks of the elastic SSD lent by the cache), split
    among the guest's containers by their own ``<T, W>``.

    Containers are the producers: on a page-cache eviction a container *puts* the clean page
    here, on a page-cache miss it *gets* it back (exclusive, as cleancache). Partitioning is
    strict: a container over its quota of a tier loses its least recently put page (demoted
    from memory to the SSD tier when it has an SSD quota). Occupancy is accounted per container.
    """

    def __init__(self, cache: GuestCache) -> None:
        self.cache = cache
        self.lock = threading.RLock()
        self.share: dict[str, int] = {"mem": 0, "ssd": 0}
        self.quota: dict[str, dict[str, int]] = {}
        self.mem: dict[str, OrderedDict[int, bytes]] = {}
        self.ssd: dict[str, OrderedDict[int, int]] = {}  # key -> slot (slot · PAGE = disk offset)
        self.owner: dict[int, tuple[str, int]] = {}  # slot -> (container, key)
        self.free_slots: list[int] = []
        self.lent: set[int] = set()
        self.counters: dict[str, dict[str, int]] = {}
        self.ssd_errors = 0
        cache.on_lent_drop = self._block_gone

    # -- configuration --------------------------------------------------------------------
    def apply(self, share: dict[str, int], split: dict[str, dict[str, int]]) -> dict[str, Any]:
        """Take the VM's share and the containers' quotas (pages); trims at once."""
        if len(split) > DD_MAX_CONTAINERS:
            raise ValueError(f"at most {DD_MAX_CONTAINERS} containers")
        with self.lock:
            self.share = {t: int(share.get(t, 0)) for t in TIERS}
            for c in list(self.quota):
                if c not in split:
                    self.quota[c] = {"mem": 0, "ssd": 0}
            for c, q in split.items():
                self.quota[c] = {t: int(q.get(t, 0)) for t in TIERS}
                self.mem.setdefault(c, OrderedDict())
                self.ssd.setdefault(c, OrderedDict())
                self.counters.setdefault(c, {"puts": 0, "gets": 0, "hits": 0, "demoted": 0, "evicted": 0,
                                             "dropped": 0})
            self._ensure_slots(sum(q["ssd"] for q in self.quota.values()))
            for c in list(self.quota):
                self._trim(c)
                if c not in split and not self.mem[c] and not self.ssd[c]:
                    del self.quota[c]
            return self.status()

    def _ensure_slots(self, pages: int) -> None:
        have = len(self.lent) * PAGES_PER_BLOCK
        if pages <= have:
            return
        need = -(-(pages - have) // PAGES_PER_BLOCK)
        for b in self.cache.lend(need):
            self.lent.add(b)
            self.free_slots.extend(range(b * PAGES_PER_BLOCK, (b + 1) * PAGES_PER_BLOCK))
        self.free_slots.sort(reverse=True)

    def _block_gone(self, b: int) -> None:
        """The host took a lent block back: its pages are gone (a later get is a miss)."""
        with self.lock:
            self.lent.discard(b)
            lo, hi = b * PAGES_PER_BLOCK, (b + 1) * PAGES_PER_BLOCK
            self.free_slots = [s for s in self.free_slots if not lo <= s < hi]
            for slot in range(lo, hi):
                who = self.owner.pop(slot, None)
                if who is not None:
                    self.ssd[who[0]].pop(who[1], None)

    def _trim(self, c: str) -> None:
        q = self.quota[c]
        while len(self.mem[c]) > q["mem"]:
            k, data = self.mem[c].popitem(last=False)
            if q["ssd"] > 0:
                self.counters[c]["demoted"] += 1
                self._ssd_put(c, k, data)
            else:
                self.counters[c]["evicted"] += 1
        while len(self.ssd[c]) > q["ssd"]:
            _, slot = self.ssd[c].popitem(last=False)
            self._free(slot)
            self.counters[c]["evicted"] += 1

    def _free(self, slot: int) -> None:
        self.owner.pop(slot, None)
        if slot // PAGES_PER_BLOCK in self.lent:
            self.free_slots.append(slot)

    # -- the data path (containers) -------------------------------------------------------
    def _ssd_put(self, c: str, key: int, data: bytes) -> None:
        q = self.quota[c]["ssd"]
        if q <= 0:
            return
        while len(self.ssd[c]) >= q:
            _, old = self.ssd[c].popitem(last=False)
            self._free(old)
            self.counters[c]["evicted"] += 1
        if not self.free_slots or self.cache.fd < 0:
            self.counters[c]["dropped"] += 1  # the SSD tier is short of lent blocks
            return
        slot = self.free_slots.pop()
        buf = mmap.mmap(-1, PAGE)
        try:
            buf[:] = data
            self.cache.ssd_write(buf, slot * PAGE)
        except OSError:
            self.ssd_errors += 1
            self.free_slots.append(slot)
            return
        finally:
            buf.close()
        self.ssd[c][key] = slot
        self.owner[slot] = (c, key)

    def put(self, c: str, key: int, data: bytes) -> bool:
        if len(data) != PAGE:
            raise ValueError("a put is one 4 KiB page")
        with self.lock:
            q = self.quota.get(c)
            if q is None:
                return False
            self.counters[c]["puts"] += 1
            self.mem[c].pop(key, None)
            old = self.ssd[c].pop(key, None)
            if old is not None:
                self._free(old)
            if q["mem"] > 0:
                self.mem[c][key] = data
                self._trim(c)
            elif q["ssd"] > 0:
                self._ssd_put(c, key, data)
            else:
                self.counters[c]["dropped"] += 1
                return False
            return True

    def get(self, c: str, key: int) -> bytes | None:
        """Exclusive: a hit leaves the store (the page is back in the container's page cache)."""
        with self.lock:
            if c not in self.quota:
                return None
            self.counters[c]["gets"] += 1
            data = self.mem[c].pop(key, None)
            if data is None:
                slot = self.ssd[c].pop(key, None)
                if slot is None:
                    return None
                buf = mmap.mmap(-1, PAGE)
                try:
                    self.cache.ssd_read(buf, slot * PAGE)
                    data = bytes(buf)
                except OSError:
                    self.ssd_errors += 1
                    return None
                finally:
                    buf.close()
                    self._free(slot)
            self.counters[c]["hits"] += 1
            return data

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "share": dict(self.share),
                "ssd_capacity": len(self.lent) * PAGES_PER_BLOCK,
                "ssd_errors": self.ssd_errors,
                "containers": {c: {"quota": dict(q), "used": {"mem": len(self.mem[c]), "ssd": len(self.ssd[c])},
                                   **self.counters[c]} for c, q in self.quota.items()},
            }


class DDServer:
    """The containers' door to the store: a unix socket; a client is known by its cgroup.

    Frames: ``P`` + key (8 bytes) + page (4 KiB) → 1 byte; ``G`` + key → 1 byte (hit) [+ page].
    Anything else, or a process outside a container, closes that connection only."""

    def __init__(self, store: DDStore, path: str = DD_SOCKET) -> None:
        self.store = store
        self.path = path
        self.sock: socket.socket | None = None
        self.clients = 0
        self.refused = 0
        self._count = threading.Lock()

    def start(self) -> None:
        if self.sock is not None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(16)
        self.sock = s
        threading.Thread(target=self._accept, name="dd-accept", daemon=True).start()

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            ct = container_of_pid(pid)
            if ct is None or self.clients >= DD_MAX_CLIENTS:
                self.refused += 1
                conn.close()
                continue
            with self._count:
                self.clients += 1
            threading.Thread(target=self._client, args=(conn, ct), name=f"dd-{ct}", daemon=True).start()

    def _client(self, conn: socket.socket, ct: str) -> None:
        try:
            conn.settimeout(60)
            while True:
                head = _recv_exact(conn, 9)
                if head is None:
                    return
                kind, key = head[:1], int.from_bytes(head[1:], "big")
                if kind == b"P":
                    data = _recv_exact(conn, PAGE)
                    if data is None:
                        return
                    conn.sendall(b"\x01" if self.store.put(ct, key, data) else b"\x00")
                elif kind == b"G":
                    got = self.store.get(ct, key)
                    conn.sendall(b"\x00" if got is None else b"\x01" + got)
                else:
                    return
        except OSError:
            return
        finally:
            with self._count:
                self.clients -= 1
            conn.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


DDSTORE = DDStore(CACHE)
DDSERVER = DDServer(DDSTORE)


@op("doubledecker-split")
def _dd_split(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The VM-level decision: split the VM's share by the containers' ``<T, W>``, and apply it
    to the in-guest store the containers use."""
    share = args.get("share", {})
    split = split_share(share, args.get("containers", {}))
    st = DDSTORE.apply(share, split)
    DDSERVER.start()
    return {"split": split, "ssd_capacity": st["ssd_capacity"]}


@op("doubledecker-status")
def _dd_status(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    return {**DDSTORE.status(), "socket": DDSERVER.path if DDSERVER.sock else "", "clients": DDSERVER.clients,
            "refused": DDSERVER.refused}


def page_of(key: int) -> bytes:
    """What page ``key`` of a producer's (simulated) file holds: the producer verifies gets."""
    return key.to_bytes(8, "big") * (PAGE // 8)


def producer(argv: list[str]) -> int:
    """A container's workload: random reads over ``--pages`` pages of a file through a small
    page cache of ``--local`` pages; evictions are put into the VM's store, misses are got
    from it (and checked) before going to the "disk"."""
    import argparse

    ap = argparse.ArgumentParser(prog="ops_ssdcache dd-producer")
    ap.add_argument("--pages", type=int, default=8192)
    ap.add_argument("--local", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.0, help="page-cache misses per second (0: as fast as it can)")
    ap.add_argument("--socket", default=DD_SOCKET)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    deadline = time.monotonic() + a.seconds
    while True:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(a.socket)
            break
        except OSError:
            if time.monotonic() > deadline:
                return 1
            time.sleep(1)
    local: OrderedDict[int, bool] = OrderedDict()
    n = hits = misses = mismatches = 0
    last = time.monotonic()
    while time.monotonic() < deadline:
        key = rng.randrange(a.pages)
        if key in local:
            local.move_to_end(key)
            continue
        conn.sendall(b"G" + key.to_bytes(8, "big"))
        if _recv_exact(conn, 1) == b"\x01":
            hits += 1
            if _recv_exact(conn, PAGE) != page_of(key):
                mismatches += 1
        else:
            misses += 1
        local[key] = True
        if len(local) > a.local:
            old, _ = local.popitem(last=False)
            conn.sendall(b"P" + old.to_bytes(8, "big") + page_of(old))
            _recv_exact(conn, 1)
        n += 1
        if a.rate > 0:
            time.sleep(1.0 / a.rate)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"ops {n} hits {hits} misses {misses} mismatches {mismatches}", flush=True)
    print(f"ops {n} hits {hits} misses {misses} mismatches {mismatches}", flush=True)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "dd-producer":
    sys.exit(producer(sys.argv[2:]))
