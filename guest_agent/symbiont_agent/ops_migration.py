"""Agent operations for container migration (Portkey): CRIU images, relay stream, network stream.

Everything an operation needs is on disk (``/var/lib/symbiont-mig/<id>/``) or in the cgroup
tree, never only in this process's memory: a restarted agent (systemd restarts it) answers
``mig-status``/``mig-resume``/``mig-abort`` for a migration it did not start, which is what
the daemon's journal recovery relies on.

Source side: ``mig-check``, ``mig-predump``/``mig-dump`` (threaded: CRIU takes seconds
under TCG), ``mig-manifest``, ``mig-send`` (threaded: streams ``mig-chunk`` events with the
image bytes over virtio-serial, paced by :mod:`symbiont_agent.migration_rate`), ``mig-credit``
(the relay's acknowledgements), ``mig-net-send`` (TCP to the peer guest), ``mig-resume`` (thaw:
the way back), ``mig-finish`` (the source copy goes away after the destination confirmed).

Destination side: ``mig-recv`` (one chunk, checksum verified), ``mig-net-recv`` (threaded TCP
receiver), ``mig-verify`` (sizes and SHA-256 of every file against the source's manifest),
``mig-prepare`` (threaded, before the freeze: CRIU and pycriu warmed up),
``mig-restore`` (threaded: the container's files, its cgroup with the same limits, CRIU
restore into it, registration with the container manager), ``mig-abort``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import socket
import tarfile
import threading
import time
from typing import Any

from symbiont_agent import agent
from symbiont_agent import migration_criu as criu
from symbiont_agent import migration_rate as rate
from symbiont_agent import protocol as proto
from symbiont_agent.agent import op
from symbiont_agent.containers import Conflict, Container, ContainerError, InvalidSpec
from symbiont_agent.containers_cgroup import CgroupError
from symbiont_agent.ops_containers import MANAGER

log = logging.getLogger("symbiont-agent.migration")

BASE = "/var/lib/symbiont-mig"
MAX_TOTAL = 2 << 30  # what one migration may write into this guest
MAX_FILES_BYTES = 256 << 20  # the container's own files carried along
NET_PORT = 47800
FILES_TAR = "files.tar"
_CREDITS: dict[str, dict[str, float]] = {}
_LOCK = threading.Lock()
_CREDITED = threading.Condition(_LOCK)  # notified at each credit: an adaptive sender wakes up at once


STALL_S = 30.0  # a sender with no acknowledgement for this long gives up (the relay is gone)

# -- the ``shm`` channel: this guest's side of its migration region -------------------------------
PCI_DEVICES = "/sys/bus/pci/devices"
IVSHMEM = ("0x1af4", "0x1110")  # ivshmem-plain (vendor, device)
DEV_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_REGIONS: dict[str, tuple[str, mmap.mmap]] = {}  # mid -> (token, BAR2 mapping)


def _shm_map(mid: str, desc: Any, wait: float = 0.0) -> mmap.mmap:
    """The migration's region: the ivshmem-plain device ``dev`` the host hot-plugged, its BAR2
    mapped (once per migration). The host wrote ``token`` into the region's header: a device
    without it is not this migration's region and is refused."""
    if not isinstance(desc, dict):
        raise InvalidSpec("shm: expected {dev, size, token}")
    dev, size, token = desc.get("dev"), desc.get("size"), desc.get("token")
    if not isinstance(dev, str) or not DEV_RE.match(dev):
        raise InvalidSpec(f"shm.dev: expected a PCI address such as 0000:00:06.0, got {dev!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not (1 << 20) <= size <= (1 << 30) or size & (size - 1):
        raise InvalidSpec(f"shm.size: expected a power of two between 1 MiB and 1 GiB, got {size!r}")
    if not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]{32}", token):
        raise InvalidSpec("shm.token: expected 32 hex digits")
    with _LOCK:
        cached = _REGIONS.get(mid)
    if cached is not None and cached[0] == token:
        return cached[1]
    d = os.path.join(PCI_DEVICES, dev)
    deadline = time.monotonic() + wait
    while not os.path.exists(os.path.join(d, "resource2")):  # ACPI hot-plug: the guest sees it soon
        if time.monotonic() >= deadline:
            raise Conflict(f"no PCI device {dev} with a BAR2 in this guest (the region is not plugged in)")
        time.sleep(0.2)
    ids = []
    for f in ("vendor", "device"):
        with open(os.path.join(d, f)) as fh:
            ids.append(fh.read().strip())
    if tuple(ids) != IVSHMEM:
        raise Conflict(f"PCI device {dev} is {ids[0]}:{ids[1]}, not ivshmem-plain")
    with open(os.path.join(d, "enable")) as fh:
        enabled = fh.read().strip() != "0"
    if not enabled:
        with open(os.path.join(d, "enable"), "w") as fh:
            fh.write("1")
    fd = os.open(os.path.join(d, "resource2"), os.O_RDWR)
    try:
        have = os.fstat(fd).st_size
        if have != size:
            raise Conflict(f"PCI device {dev}: BAR2 has {have} bytes, the region {size}")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    if mm[: rate.SHM_TOKEN] != bytes.fromhex(token):
        mm.close()
        raise Conflict(f"PCI device {dev} is not this migration's region (token differs)")
    with _LOCK:
        old = _REGIONS.pop(mid, None)
        _REGIONS[mid] = (token, mm)
    if old is not None:
        _close_map(old[1])
    return mm


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a send or write still holds a view: the mapping goes with it
        pass


def _shm_drop(mid: Any) -> bool:
    with _LOCK:
        old = _REGIONS.pop(str(mid), None)
    if old is not None:
        _close_map(old[1])
    return old is not None


@op("mig-shm", threaded=True)
def _shm(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Map (and check) the migration's region once the host plugged it in, or let go of every
    mapping (``release``) before the host unplugs it."""
    mid = rate.validate_mid(args.get("mid"))
    if args.get("release"):
        with _LOCK:
            mids = list(_REGIONS)
        return {"released": sum(_shm_drop(m) for m in mids) > 0}
    mm = _shm_map(mid, args.get("shm"), _num(args, "wait", 20.0, 0.0, 120.0))
    return {"mapped": len(mm)}


def _dir(mid: Any) -> str:
    return os.path.join(BASE, rate.validate_mid(mid))


def _aborted_marker(mid: Any) -> str:
    return os.path.join(BASE, "aborted", rate.validate_mid(mid))


def _set_aborted(mid: Any) -> None:
    """Remember that the daemon gave this migration up: a dump, send or restore still running
    in a worker thread (the daemon crashed and recovered meanwhile) undoes itself."""
    path = _aborted_marker(mid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(str(time.time()))


def _is_aborted(mid: Any) -> bool:
    return os.path.exists(_aborted_marker(mid))


def _int(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidSpec(f"{key}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _num(args: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise InvalidSpec(f"{key}: expected a number in {lo}..{hi}, got {v!r}")
    return float(v)


# -- the container's processes -----------------------------------------------------------------
def _nspid(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return [pid]


def _init_pid(c: Container) -> int:
    """The container's init: the process of its cgroup that is PID 1 of its own namespace."""
    g = MANAGER.group(c)
    for pid in g.procs():
        try:
            ns = _nspid(pid)
        except (OSError, ValueError):
            continue
        if len(ns) > 1 and ns[-1] == 1:
            return pid
    raise Conflict(f"container {c.name!r} has no init process (is it running?)")


def _session_ok(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[3]) == pid  # field 6 (session) after pid, comm, state, ppid, pgrp


def _open_files(pids: list[int]) -> list[str]:
    """Regular files the container has open (their contents travel with it)."""
    out: set[str] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if not target.startswith("/") or target.endswith(" (deleted)"):
                continue
            if target.startswith(("/proc/", "/sys/", "/dev/", "/run/symbiont-agent", BASE)):
                continue
            if os.path.isfile(target):
                out.add(target)
    return sorted(out)


@op("mig-check")
def _check(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Can this container be migrated? Returns what the destination needs to recreate it."""
    c = MANAGER.get(args.get("name"))
    MANAGER.reap()
    if c.state != "running":
        raise Conflict(f"container {c.name!r} is {c.state}, not running")
    init = _init_pid(c)
    if not _session_ok(init):
        raise Conflict(
            f"container {c.name!r}: its init (pid {init}) is not a session leader, CRIU cannot dump it; "
            "start its command through 'setsid' (symbiont.migration.workload.migratable_command)"
        )
    criu._pycriu()
    g = MANAGER.group(c)
    return {
        "name": c.name,
        "init_pid": init,
        "procs": g.procs(),
        "record": c.record(),
        "memory_current": g.memory_current(),
        "files": _open_files(g.procs()),
    }


# -- dumps ---------------------------------------------------------------------------------------
@op("mig-predump", threaded=True)
def _predump(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Iteration ``n`` of the pre-copy: dump memory while the container runs (dirty tracking)."""
    c = MANAGER.get(args.get("name"))
    n = _int(args, "n", 1, 1, 16)
    d = _dir(args.get("mid"))
    img = os.path.join(d, "img", str(n))
    shutil.rmtree(img, ignore_errors=True)
    split = criu.split_huge_pages(MANAGER.group(c).procs())  # 4 KiB dirty tracking, see there
    secs = criu.pre_dump(_init_pid(c), img, f"../{n - 1}" if n > 1 else None)
    return {"dir": f"img/{n}", "bytes": _du(img), "seconds": round(secs, 4), "thp_split": split}


@op("mig-dump", threaded=True)
def _dump(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Freeze the container, dump it on top of the last pre-dump, pack its open files.

    The container stays frozen in this guest (the way back is ``mig-resume``)."""
    c = MANAGER.get(args.get("name"))
    parent = _int(args, "parent", 0, 0, 16)
    d = _dir(args.get("mid"))
    g = MANAGER.group(c)
    init = _init_pid(c)
    t0 = time.monotonic()
    frozen_at = time.time()
    g.write("cgroup.freeze", "1")
    img = os.path.join(d, "img", "final")
    shutil.rmtree(img, ignore_errors=True)
    try:
        secs = criu.dump(init, img, f"../{parent}" if parent else None, g.path)
        files = _open_files(g.procs())
        _pack(files, os.path.join(d, FILES_TAR))
        if _is_aborted(args.get("mid")):
            raise Conflict("migration aborted by the host during the dump")
    except BaseException:
        g.write("cgroup.freeze", "0")  # failed: the container runs on here
        raise
    # The final files' manifest comes with the dump: one round trip less inside the freeze.
    man = _manifest({"mid": args.get("mid"), "paths": ["img/final", FILES_TAR]}, b"")
    return {
        "dir": "img/final",
        "manifest": man["files"],
        "bytes": _du(img),
        "criu_seconds": round(secs, 4),
        "seconds": round(time.monotonic() - t0, 4),
        "files": files,
        "files_bytes": os.path.getsize(os.path.join(d, FILES_TAR)),
        "frozen_at": frozen_at,
    }


def _pack(files: list[str], dest: str) -> None:
    total = sum(os.path.getsize(f) for f in files)
    if total > MAX_FILES_BYTES:
        raise InvalidSpec(f"the container's open files total {total} bytes, more than {MAX_FILES_BYTES}")
    with tarfile.open(dest, "w") as tar:
        for f in files:
            tar.add(f, arcname=f.lstrip("/"), recursive=False)


def _du(path: str) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(root, n))
    return total


@op("mig-manifest")
def _manifest(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Every file under the given sub-folders (and files): path, size, CRC-32 of the whole file
    (checked once by ``mig-verify``; SHA-256 cost ~0.1 s of guest time per 4 MiB in the freeze)."""
    d = _dir(args.get("mid"))
    want = args.get("paths")
    if not isinstance(want, list) or not want or len(want) > 32:
        raise InvalidSpec("paths: expected a non-empty list of folders or files")
    out = []
    for p in want:
        full = os.path.join(d, rate.validate_relpath(p))
        if os.path.isfile(full):
            items = [full]
        else:
            items = [os.path.join(r, n) for r, _, ns in os.walk(full) for n in sorted(ns)]
        for f in items:
            if os.path.islink(f):  # CRIU's "parent" links are made again on the other side
                continue
            out.append({"path": os.path.relpath(f, d), "size": os.path.getsize(f), "crc32": rate.file_crc32(f)})
    return {"files": out, "bytes": sum(e["size"] for e in out)}


# -- relay stream (source) -------------------------------------------------------------------------
@op("mig-credit")
def _credit(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The relay acknowledges bytes written at the destination and reports its drain rate."""
    mid = rate.validate_mid(args.get("mid"))
    acked = _int(args, "acked", 0, 0, 1 << 40)
    bw = _num(args, "bw", 1.0, 1.0, 1e12)
    with _LOCK:
        st = _CREDITS.get(mid)
        if st is None:
            return {"known": False}
        st["acked"] = max(st["acked"], acked)
        st["taken"] = max(st.get("taken", 0.0), _int(args, "taken", 0, 0, 1 << 40))
        st["bw"] = bw
        if args.get("stop"):  # the relay refused the stream (a damaged chunk): stop sending
            st["stop"] = 1.0
        st["at"] = time.monotonic()
        _CREDITED.notify_all()
    return {"known": True}


@op("mig-send", threaded=True)
def _send(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Stream the listed files as ``mig-chunk`` events, paced adaptively or at a fixed rate."""
    mid = rate.validate_mid(args.get("mid"))
    d = _dir(mid)
    paths = args.get("paths")
    if not isinstance(paths, list) or not paths or len(paths) > 4096:
        raise InvalidSpec("paths: expected a non-empty list of files")
    paths = [rate.validate_relpath(p) for p in paths]
    mode = args.get("mode", "adaptive")
    if mode not in rate.MODES:
        raise InvalidSpec(f"mode: {mode!r} (known: {', '.join(rate.MODES)})")
    chunk = _int(args, "chunk", 4 << 20, rate.MIN_CHUNK, min(rate.MAX_CHUNK, proto.MAX_BINARY - 4096))
    window = _int(args, "window", 16 << 20, chunk, 1 << 30)
    fixed = _num(args, "rate", 8e6, 1e3, 1e12)
    # The shm channel: each chunk is read straight into this guest's region and the event
    # names where it lies (no payload); the region's ring frees what the relay took.
    mv: memoryview | None = None
    ring: rate.Ring | None = None
    if args.get("shm") is not None:
        mm = _shm_map(mid, args.get("shm"))
        if len(mm) - rate.SHM_HEADER < window + chunk:
            raise InvalidSpec(f"shm: a {len(mm)}-byte region is too small for window {window} + chunk {chunk}")
        mv = memoryview(mm)[rate.SHM_HEADER :]
        ring = rate.Ring(len(mv))
    with _LOCK:
        _CREDITS[mid] = {"acked": 0.0, "taken": 0.0, "bw": _num(args, "bw", 8e6, 1.0, 1e12)}
    st = _CREDITS[mid]
    st["at"] = time.monotonic()
    sent = chunks = retries = freed = 0
    slept = 0.0
    t0 = time.monotonic()
    next_at = t0
    try:
        for p in paths:
            with open(os.path.join(d, p), "rb", buffering=0) as fh:
                off = 0
                size = os.fstat(fh.fileno()).st_size
                while True:
                    data: bytes | memoryview = b""
                    if ring is not None:  # read below, once the window has room
                        need = min(chunk, max(0, size - off))
                    else:
                        data = fh.read(chunk)
                        need = len(data)
                    if not need and off > 0:
                        break
                    if st.get("stop"):
                        raise OSError("the relay stopped the stream")
                    while True:  # wait for room in the relay's window
                        free = rate.free_space(window, sent, int(st["acked"]))
                        if mode == "adaptive":
                            delay = rate.adaptive_delay(need, free, st["bw"])
                        else:
                            delay = max(0.0, next_at - time.monotonic())
                        if delay > 0 and mode == "adaptive":
                            # Portkey's delay is an estimate from the drain rate; the relay's
                            # credits say when room was really made: whichever comes first (a low
                            # first estimate, 8 MB/s by default, slept 0.5 s per full window)
                            t = time.monotonic()
                            with _CREDITED:
                                _CREDITED.wait_for(lambda n=need, s=sent: n <= rate.free_space(window, s, int(st["acked"]))
                                                   or bool(st.get("stop")), timeout=delay)  # fmt: skip
                            slept += time.monotonic() - t
                        elif delay > 0:
                            time.sleep(delay)
                            slept += delay
                        if need <= rate.free_space(window, sent, int(st["acked"])):
                            break
                        retries += 1  # found the buffer full: a wasted interaction
                        if time.monotonic() - st["at"] > STALL_S or _is_aborted(mid) or st.get("stop"):
                            raise OSError(f"no acknowledgement from the relay for {STALL_S:.0f} s")
                        if mode == "fixed":
                            next_at = time.monotonic() + rate.fixed_delay(need, fixed)
                    if _is_aborted(mid):  # the host gave this migration up (a daemon restarted meanwhile)
                        raise OSError("the migration was aborted by the host")
                    extra: dict[str, Any] = {}
                    if ring is not None and mv is not None:
                        while True:  # free what the relay took; no room yet: it is about to take older ones
                            taken = int(st.get("taken", 0))
                            ring.release(taken - freed)
                            freed = max(freed, taken)
                            at = ring.alloc(need)
                            if at is not None:
                                break
                            if time.monotonic() - st["at"] > STALL_S or _is_aborted(mid) or st.get("stop"):
                                raise OSError(f"no room in the region and no acknowledgement for {STALL_S:.0f} s")
                            time.sleep(0.005)
                        n = fh.readinto(mv[at : at + need]) or 0
                        if n != need:
                            raise OSError(f"{p} changed while it was sent ({n} of {need} bytes at {off})")
                        data = mv[at : at + n]
                        extra["at"] = at
                    meta = {"mid": mid, "path": p, "off": off, "len": len(data), **extra}
                    if ring is None:  # a frame's bytes cross the channel; an shm chunk's are checked at the end
                        meta["crc"] = rate.crc32(data)
                    if not agent.emit(proto.event("mig-chunk", meta), b"" if ring is not None else data):
                        raise OSError("the host stopped reading the channel")
                    sent += len(data)
                    chunks += 1
                    off += len(data)
                    next_at = time.monotonic() + rate.fixed_delay(max(len(data), 1), fixed)
                    if not need:
                        break  # an empty file: one empty chunk
    finally:
        with _LOCK:
            _CREDITS.pop(mid, None)
        if mv is not None:
            data = b""
            mv.release()
    secs = time.monotonic() - t0
    return {
        "channel": "serial" if ring is None else "shm",
        "bytes": sent,
        "chunks": chunks,
        "retries": retries,
        "slept_s": round(slept, 4),
        "seconds": round(secs, 4),
        "mode": mode,
    }


# -- destination: chunks, verification ----------------------------------------------------------
@op("mig-recv")
def _recv(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Write one relayed chunk after checking its CRC-32 (a corrupted chunk is refused; the
    whole file's CRC-32 is checked once at the end by ``mig-verify``). A chunk the relay copied
    into this guest's region may come without one: the relay has it from the source's region,
    and ``mig-verify`` checks every file against the manifest."""
    mid = rate.validate_mid(args.get("mid"))
    d = _dir(mid)
    path = rate.validate_relpath(args.get("path"))
    off = _int(args, "off", 0, 0, MAX_TOTAL)
    if args.get("shm") is not None:  # the relay copied the chunk into this guest's region at ``at``
        mm = _shm_map(mid, args.get("shm"))
        length = _int(args, "len", 0, 0, len(mm) - rate.SHM_HEADER)
        try:
            at = rate.validate_span(args.get("at"), length, len(mm) - rate.SHM_HEADER)
        except rate.StreamError as exc:
            raise InvalidSpec(str(exc)) from None
        with memoryview(mm) as view:
            return _write_chunk(d, path, off, view[rate.SHM_HEADER + at : rate.SHM_HEADER + at + length],
                                args.get("crc"), optional=True)  # fmt: skip
    return _write_chunk(d, path, off, payload, args.get("crc"))


def _write_chunk(d: str, path: str, off: int, data: bytes | memoryview, crc: Any, optional: bool = False) -> dict[str, Any]:
    if len(data) + off > MAX_TOTAL:
        raise InvalidSpec("chunk beyond the migration's size limit")
    if crc is None and optional:
        pass  # an shm chunk: checked with its whole file by mig-verify
    elif isinstance(crc, bool) or not isinstance(crc, int) or rate.crc32(data) != crc:
        raise InvalidSpec(f"{path}@{off}: checksum mismatch, chunk refused (corrupted stream)")
    full = os.path.join(d, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    fd = os.open(full, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    return {"written": len(data)}


@op("mig-verify")
def _verify(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Every file of the manifest present with its size and checksum (CRC-32, or SHA-256 from
    an older source agent): catches a truncated or corrupted stream."""
    d = _dir(args.get("mid"))
    try:
        files = rate.validate_manifest(args.get("files"), MAX_TOTAL)
    except rate.StreamError as exc:
        raise InvalidSpec(str(exc)) from None
    bad = []
    for path, e in files.items():
        full = os.path.join(d, path)
        try:
            size = os.path.getsize(full)
        except OSError:
            bad.append(f"{path}: missing")
            continue
        if size != e["size"]:
            bad.append(f"{path}: {size} bytes, expected {e['size']} (truncated stream)")
            continue
        if "crc32" in e:
            ok = rate.file_crc32(full) == e["crc32"]
        else:  # a manifest from an older agent
            h = hashlib.sha256()
            with open(full, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
            ok = h.hexdigest() == e["sha256"]
        if not ok:
            bad.append(f"{path}: checksum mismatch (corrupted stream)")
    if bad:
        raise InvalidSpec("image stream rejected: " + "; ".join(bad[:8]))
    return {"verified": len(files), "bytes": sum(int(e["size"]) for e in files.values())}  # type: ignore[call-overload]


# -- restore, abort, finish ----------------------------------------------------------------------
def _link_parents(d: str) -> None:
    """CRIU's pre-dump chain: ``img/N/parent -> ../N-1``, ``img/final/parent -> ../last``."""
    img = os.path.join(d, "img")
    nums = sorted(int(n) for n in os.listdir(img) if n.isdigit()) if os.path.isdir(img) else []
    chain = [str(n) for n in nums] + (["final"] if os.path.isdir(os.path.join(img, "final")) else [])
    for prev, cur in zip(chain, chain[1:], strict=False):
        link = os.path.join(img, cur, "parent")
        if not os.path.lexists(link):
            os.symlink(f"../{prev}", link)


def _unpack(tar_path: str) -> list[str]:
    out = []
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        for m in members:
            if not m.isfile() or m.name.startswith("/") or ".." in m.name.split("/"):
                raise InvalidSpec(f"files.tar: refusing member {m.name!r}")
        for m in members:
            dest = "/" + m.name
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            tmp = dest + ".symbiont-mig"
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(src, fh)
            os.chmod(tmp, m.mode & 0o7777)
            os.utime(tmp, (m.mtime, m.mtime))
            os.replace(tmp, dest)
            out.append(dest)
    return out


@op("mig-restore", threaded=True)
def _restore(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Recreate the container here: its files, its cgroup with the same limits, CRIU restore."""
    mid = rate.validate_mid(args.get("mid"))
    d = _dir(mid)
    rec = args.get("record")
    if not isinstance(rec, dict):
        raise InvalidSpec("record: expected the source's container record")
    MANAGER.load()
    MANAGER.reap()
    name = rec.get("name")
    if name in MANAGER.containers:
        raise Conflict(f"a container {name!r} already exists in this guest")
    from symbiont_agent.containers import validate_limits, validate_name

    validate_name(name)
    lim_in = dict(rec.get("limits") or {})
    if isinstance(lim_in.get("cpu_max"), list):  # stored as [quota, period]
        lim_in["cpu_max"] = " ".join(str(x) for x in lim_in["cpu_max"])
    limits = validate_limits(lim_in, MANAGER.online_cpus())
    _link_parents(d)
    t0 = time.monotonic()
    files = _unpack(os.path.join(d, FILES_TAR)) if os.path.exists(os.path.join(d, FILES_TAR)) else []
    MANAGER.ensure_subtree()
    c = Container(
        name=name,
        command=list(rec.get("command") or []),
        limits=limits,
        hostname=str(rec.get("hostname") or name),
        netns=bool(rec.get("netns")),
    )
    g = MANAGER.group(c)
    if g.exists:
        g.kill()
        g.remove()
    g.create()
    try:
        MANAGER._apply_limits(c, limits)
        pid, secs = criu.restore(os.path.join(d, "img", "final"), lazy=args.get("lazy") is True)
    except (CgroupError, ValueError, ContainerError, criu.CriuError):
        g.kill()
        g.remove()
        raise
    c.pid, c.state, c.started_at, c.starts = pid, "running", time.time(), 1
    MANAGER.containers[name] = c
    MANAGER.save()
    if _is_aborted(mid):  # the host gave up while CRIU restored: this copy must not run
        MANAGER.destroy(name)
        raise Conflict("migration aborted by the host during the restore")
    _mark(d, "restored", {"name": name, "pid": pid})
    return {
        "lazy": args.get("lazy") is True,
        "pid": pid,
        "criu_seconds": round(secs, 4),
        "seconds": round(time.monotonic() - t0, 4),
        "files": files,
        "procs": g.procs(),
    }


@op("mig-prepare", threaded=True)
def _prepare(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Destination, while the source still runs: warm up what the restore inside the freeze
    needs, so it does not pay a cold start there (measured under TCG: the first restore of a
    guest took 2.6 s, 1.8 s of it CRIU paging in its binary and libraries and loading the
    kernel's netfilter modules for its network lock, 0.8 s importing pycriu; 0.47 s warm)."""
    import subprocess

    d = _dir(args.get("mid"))
    os.makedirs(d, exist_ok=True)
    t0 = time.monotonic()
    criu._pycriu()
    t_import = time.monotonic() - t0
    MANAGER.ensure_subtree()
    # CRIU checks the kernel features it uses (namespaces, TCP repair, ...), pages itself in.
    chk = subprocess.run([criu.CRIU_BIN, "check"], capture_output=True, text=True, timeout=60)
    # the network lock of a restore with TCP connections runs iptables-restore: load its modules
    subprocess.run(["iptables", "-w", "-n", "-L", "INPUT"], capture_output=True, timeout=60)
    return {
        "import_s": round(t_import, 4),
        "seconds": round(time.monotonic() - t0, 4),
        "criu_check": chk.returncode,
    }


def _mark(d: str, what: str, data: dict[str, Any]) -> None:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, what + ".json"), "w") as fh:
        json.dump({**data, "at": time.time()}, fh)


@op("mig-status")
def _status(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """What this guest knows of a migration and its container (for the daemon's recovery)."""
    d = _dir(args.get("mid"))
    name = args.get("name")
    MANAGER.load()
    MANAGER.reap()
    out: dict[str, Any] = {
        "dir": os.path.isdir(d),
        "restored": os.path.exists(os.path.join(d, "restored.json")),
    }
    c = MANAGER.containers.get(name) if isinstance(name, str) else None
    if c is None:
        out["container"] = None
    else:
        g = MANAGER.group(c)
        frozen = g.exists and "frozen 1" in g.read("cgroup.events")
        out["container"] = {
            "state": c.state,
            "populated": g.exists and g.populated(),
            "frozen": frozen,
            "procs": g.procs() if g.exists else [],
        }
    return out


@op("mig-resume")
def _resume(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The way back on the source: thaw the container (idempotent)."""
    if args.get("mid") is not None:
        _set_aborted(args.get("mid"))
    c = MANAGER.get(args.get("name"))
    g = MANAGER.group(c)
    if g.exists:
        g.write("cgroup.freeze", "0")
    return {"name": c.name, "thawed": g.exists, "procs": g.procs() if g.exists else []}


@op("mig-abort")
def _abort(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Destination side of a failed migration: remove what it restored and received (idempotent)."""
    d = _dir(args.get("mid"))
    _shm_drop(args.get("mid"))
    _set_aborted(args.get("mid"))
    name = args.get("name")
    removed = None
    criu.stop_lazy(os.path.join(d, "img", "final"))  # the restored copy goes anyway
    MANAGER.load()
    if (
        os.path.exists(os.path.join(d, "restored.json"))
        and isinstance(name, str)
        and name in MANAGER.containers
    ):
        removed = MANAGER.destroy(name)["destroyed"]
    shutil.rmtree(d, ignore_errors=True)
    return {"removed_container": removed}


@op("mig-finish")
def _finish(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Source side after the destination confirmed: the frozen copy goes away (idempotent)."""
    d = _dir(args.get("mid"))
    _shm_drop(args.get("mid"))
    name = args.get("name")
    MANAGER.load()
    destroyed = None
    if isinstance(name, str) and name in MANAGER.containers:
        c = MANAGER.containers[name]
        g = MANAGER.group(c)
        if g.exists:
            g.kill()  # frozen tasks die on SIGKILL too (cgroup.kill)
        destroyed = MANAGER.destroy(name)["destroyed"]
    shutil.rmtree(d, ignore_errors=True)
    return {"destroyed": destroyed}


@op("mig-cleanup", threaded=True)
def _cleanup(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Destination after the confirm: its received images go (after a lazy restore, once every
    page is back: the restored tasks fault on them until then)."""
    d = _dir(args.get("mid"))
    _shm_drop(args.get("mid"))
    existed = os.path.isdir(d)
    waited = criu.wait_lazy(os.path.join(d, "img", "final"), timeout=50.0)
    shutil.rmtree(d, ignore_errors=True)
    return {"removed": existed, "lazy_wait_s": None if waited is None else round(waited, 4)}


# -- guest network path --------------------------------------------------------------------------
def _link_iface() -> tuple[str, str]:
    """The lab's point-to-point NIC (MAC 52:54:00:5b:…) and this guest's address on it."""
    for name in sorted(os.listdir("/sys/class/net")):
        try:
            with open(f"/sys/class/net/{name}/address") as fh:
                mac = fh.read().strip()
        except OSError:
            continue
        if mac.startswith("52:54:00:5b:"):
            b = mac.split(":")
            return name, f"10.211.{int(b[4], 16)}.{int(b[5], 16)}"
    raise Conflict("this guest has no migration network link (lab VMs need a peer link: LabSession(peer_link=...))")


@op("mig-net-setup")
def _net_setup(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    import subprocess

    iface, ip = _link_iface()
    subprocess.run(["ip", "link", "set", iface, "up"], check=True, capture_output=True)
    have = subprocess.run(["ip", "-o", "addr", "show", "dev", iface], capture_output=True, text=True).stdout
    if f" {ip}/" not in have:
        subprocess.run(["ip", "addr", "add", f"{ip}/16", "dev", iface], check=True, capture_output=True)
    return {"iface": iface, "ip": ip}


ADDR_PREFIX = "10.211."  # a container's own address lives on the lab's guest link


def _garp(iface: str, ip: str, count: int = 3) -> int:
    """Gratuitous ARP (request and reply) for ``ip`` from this NIC: peers that had the address
    at the source's MAC switch to ours at once (Linux updates an existing entry on one)."""
    import struct

    with open(f"/sys/class/net/{iface}/address") as fh:
        mac = bytes.fromhex(fh.read().strip().replace(":", ""))
    ipb = socket.inet_aton(ip)
    frames = [
        b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, opcode)
        + mac + ipb + (b"\x00" * 6 if opcode == 1 else b"\xff" * 6) + ipb
        for opcode in (1, 2)
    ]  # fmt: skip
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        for i in range(count):
            for f in frames:
                sent += s.send(f.ljust(60, b"\x00")) > 0
            if i + 1 < count:
                time.sleep(0.05)
    return sent


@op("mig-addr")
def _addr(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Add (``up``) or remove the container's own address on the guest link, ``fenced`` off
    (iptables) or open.

    A server's established connections are bound to this address: it leaves the source (and
    the source fences it off with iptables) just before the container is frozen and dumped;
    it is up but fenced on the destination (announced with a gratuitous ARP) while CRIU
    restores the sockets, and opened once they exist; on an abort it goes back to the source."""
    import ipaddress
    import subprocess

    ip = args.get("ip")
    up = args.get("up")
    fenced = args.get("fenced", not up)
    try:
        ok = isinstance(ip, str) and ip.startswith(ADDR_PREFIX) and ipaddress.ip_address(ip).version == 4
    except ValueError:
        ok = False
    if not ok or not isinstance(up, bool) or not isinstance(fenced, bool) or (not up and not fenced):
        raise InvalidSpec(f"ip: expected a {ADDR_PREFIX}x.y address, up and fenced true/false (down is always "
                          f"fenced), got {ip!r}, {up!r}, {fenced!r}")  # fmt: skip
    iface, own = _net_setup({}, b"")["iface"], _link_iface()[1]  # the link up, with its own /16
    if ip == own:
        raise InvalidSpec(f"ip: {ip} is this guest's own link address, not a container's")
    have = f" {ip}/" in subprocess.run(["ip", "-o", "addr", "show", "dev", iface],
                                       capture_output=True, text=True).stdout  # fmt: skip
    rules = (["INPUT", "-d", ip, "-j", "DROP"], ["OUTPUT", "-s", ip, "-j", "DROP"])
    if fenced:
        # Fence first. On the source: nothing reaches the container's sockets any more (early
        # demux would deliver to an established socket even without the address) and nothing
        # they send leaves, not the FIN or RST of the source copy when it is killed after the
        # move. On the destination until the restore is done: the client's retransmissions
        # must not meet a local address without its socket (the kernel would reset them).
        for r in rules:
            if subprocess.run(["iptables", "-w", "-C", *r], capture_output=True).returncode != 0:
                subprocess.run(["iptables", "-w", "-I", *r], check=True, capture_output=True)
    if up and not have:
        subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", iface], check=True, capture_output=True)
    elif not up and have:
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", iface], check=True, capture_output=True)
    if not fenced:
        for r in rules:  # open: the connections are served here now
            while subprocess.run(["iptables", "-w", "-D", *r], capture_output=True).returncode == 0:
                pass
    garps = _garp(iface, ip) if up else 0
    return {"iface": iface, "ip": ip, "up": up, "fenced": fenced, "changed": up != have, "garp": garps}


@op("mig-net-recv", threaded=True)
def _net_recv(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Accept one TCP stream from the source guest: per file a JSON line, then its bytes."""
    d = _dir(args.get("mid"))
    try:
        files = rate.validate_manifest(args.get("files"), MAX_TOTAL)
    except rate.StreamError as exc:
        raise InvalidSpec(str(exc)) from None
    port = _int(args, "port", NET_PORT, 1024, 65535)
    timeout = _num(args, "timeout", 120.0, 1.0, 3600.0)
    _iface, ip = _link_iface()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen(1)
    srv.settimeout(timeout)
    t0 = time.monotonic()
    total = 0
    try:
        conn, _ = srv.accept()
    finally:
        srv.close()
    with conn:
        conn.settimeout(timeout)
        rfile = conn.makefile("rb")
        for _ in range(len(files)):
            line = rfile.readline(4096)
            meta = json.loads(line or b"null")
            if not isinstance(meta, dict) or meta.get("path") not in files:
                raise InvalidSpec(f"network stream: unexpected header {line[:200]!r}")
            size = files[meta["path"]]["size"]
            full = os.path.join(d, meta["path"])
            os.makedirs(os.path.dirname(full), exist_ok=True)
            left = int(size)  # type: ignore[call-overload]
            with open(full, "wb") as fh:
                while left:
                    block = rfile.read(min(left, 1 << 20))
                    if not block:
                        raise InvalidSpec(f"network stream truncated in {meta['path']}")
                    fh.write(block)
                    left -= len(block)
                    total += len(block)
        conn.sendall(b"ok\n")
    return {"bytes": total, "seconds": round(time.monotonic() - t0, 4), "ip": ip}


@op("mig-net-send", threaded=True)
def _net_send(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
    d = _dir(args.get("mid"))
    paths = [rate.validate_relpath(p) for p in (args.get("paths") or [])]
    host = args.get("host")
    if not isinstance(host, str) or not host.startswith("10.211."):
        raise InvalidSpec("host: expected the peer's 10.211.x.y link address")
    port = _int(args, "port", NET_PORT, 1024, 65535)
    deadline = time.monotonic() + _num(args, "connect_timeout", 30.0, 1.0, 600.0)
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    t0 = time.monotonic()
    total = 0
    with conn:
        conn.settimeout(120)
        for p in paths:
            full = os.path.join(d, p)
            conn.sendall(json.dumps({"path": p, "size": os.path.getsize(full)}).encode() + b"\n")
            with open(full, "rb") as fh:
                total += conn.sendfile(fh)
        ack = conn.makefile("rb").readline(16)
    if ack.strip() != b"ok":
        raise OSError(f"the destination did not confirm the stream ({ack!r})")
    return {"bytes": total, "seconds": round(time.monotonic() - t0, 4)}
