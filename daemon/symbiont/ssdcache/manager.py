"""The SymFlex manager: the pool, the registered caches, their NBD servers and resizing.

The hypervisor side decides *how much* (each cache's current-size, by API or policy); the
guest decides *what*: on deflation the guest agent is asked to release N blocks and picks its
coldest; if it does not answer in time, the host picks the N least recently accessed blocks
(the NBD server sees every access) and tells the guest. A block leaving a VM is zeroed before
it becomes free (see :mod:`symbiont.ssdcache.blockmap`), so the next owner reads zeros.

Guest protocol (ops of ``symbiont_agent.ops_ssdcache``):

* ``ssdcache-config {vm, serial, size_blocks, backed, epoch}`` — the whole truth: which
  logical blocks are backed now. The guest drops cached data of any block not listed.
* ``ssdcache-release {count, epoch}`` → ``{lbns}`` — the guest stops using ``count`` blocks of
  its choice (coldest first) and names them.
* ``ssdcache-grant {lbns, epoch}`` / ``ssdcache-revoke {lbns, epoch}`` — blocks added, or taken
  by the host without the guest's choice.

A block taken from a silent guest is remembered as *revoked* until the guest acknowledges a
config or revoke message; until then it is never handed back to that VM, so a guest that
missed the revocation can never mistake fresh zeros for its old cached data.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import logging
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from symbiont.errors import AgentTimeout, Conflict, DaemonError, Invalid, NotFound, Unavailable
from symbiont.ssdcache import nbdfast
from symbiont.ssdcache import policy as pol
from symbiont.ssdcache.blockmap import BlockMap, BlockMapError, CacheRecord, PoolExhausted
from symbiont.ssdcache.layout import expand, ranges
from symbiont.ssdcache.nbdserver import Export, IoThread, NbdServer
from symbiont.ssdcache.pool import (
    Pool,
    PoolError,
    PoolForbidden,
    device_allowed,
    resolve_pool_file,
)
from symbiont.ssdcache.twolevel import (
    PAGE,
    SsdTier,
    TwoLevelCache,
    TwoLevelError,
    container_quotas,
    vm_shares,
)
from symbiont.ssdcache.vhostuser import VhostUserServer

log = logging.getLogger(__name__)

GUEST_SERIAL = "symbiont-cache"
DD_OWNER = "doubledecker.ssd-tier"  # the block-map owner of the two-level cache's SSD tier
MAX_CACHE_MIB = 1 << 20  # 1 TiB per virtual SSD

SETTINGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS ssd_settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""

DEFAULT_POLICY: dict[str, Any] = {
    "mode": "manual",  # manual | shares | throughput
    "capacity_mib": None,  # blocks the policy hands out (default: the whole pool)
    "target_ratio": {},  # throughput mode: vm -> ratio (default 1 each)
    "gain": 0.5,
    "max_step_mib": 16,
    "every_periods": 1,
}


# The cache's errors are the daemon's: the API answers each with its HTTP status.
CacheError = DaemonError


class Forbidden(DaemonError):
    """The config does not allow it (a path outside ``pool_dir``, a device not allowed)."""

    status = 403


def _pool_error(exc: PoolError) -> DaemonError:
    """A pool failure as the daemon's error with the pool's status (403, 409 or 422)."""
    err = {403: Forbidden, 409: Conflict}.get(exc.status, Invalid)(str(exc))
    return err


@dataclass
class GuestView:
    """What we know of a guest's side of its cache."""

    acked_epoch: int = -1
    last_status: dict[str, Any] | None = None
    last_error: str = ""
    last_seen_state: str = ""




class Agents(Protocol):
    """The agent gateway (``symbiont.gateway.AgentGateway``): names canonicalised, caps,
    schema, timeout and error codes handled once there."""

    def supports(self, vm: str, op: str) -> bool: ...

    async def call(self, vm: str, op: str, args: dict[str, Any] | None = None, *, payload: bytes = b"",
                   timeout: float | None = None) -> tuple[Any, bytes]: ...


class NoAgents:
    """No guest agents (benchmarks, tests of the host side alone)."""

    def supports(self, vm: str, op: str) -> bool:
        return False

    async def call(self, vm: str, op: str, args: dict[str, Any] | None = None, *, payload: bytes = b"",
                   timeout: float | None = None) -> tuple[Any, bytes]:
        raise Unavailable(f"{vm}: no guest agent")

DomainState = Callable[[str], str]  # vm -> "running" | "shutoff" | ... | "missing"


def default_runtime_dir(state_dir: str | Path) -> Path:
    """Sockets must be reachable by QEMU's unprivileged user, so not under a 0700 state dir."""
    tag = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return Path("/run/symbiont/ssdcache") / tag


class CacheManager:
    def __init__(self, store: Any, runtime_dir: str | Path, *, agents: Agents | None = None,
                 domain_state: DomainState | None = None, release_timeout_s: float = 3.0,
                 inline_io: bool = False, pool_dir: str | Path | None = None,
                 allowed_devices: list[str] | None = None, max_caches: int = 64,
                 size_overcommit: float = 4.0, reserve_free_mib: int = 1024,
                 peer_check: Callable[[str], Callable[[int], bool]] | None = None) -> None:
        """``peer_check(vm)``: the test a process must pass to connect to ``vm``'s vhost-user
        socket (given its pid: is it ``vm``'s QEMU?); ``pool_dir``: where pool files may be (None: no file pools); ``allowed_devices``:
        block devices (globs) that may be a pool; ``max_caches`` and ``size_overcommit``
        (sum of the caches' sizes ≤ factor × pool) bound what the API can make the daemon hold;
        ``reserve_free_mib``: free space a new pool file must leave on its file system."""
        self.store = store
        self.pool_dir = Path(pool_dir) if pool_dir is not None else None
        self.allowed_devices = list(allowed_devices or [])
        self.max_caches = max_caches
        self.size_overcommit = size_overcommit
        self.reserve_free_mib = reserve_free_mib
        self.bmap = BlockMap(store)
        store.ensure_schema(SETTINGS_SCHEMA)
        self.runtime_dir = Path(runtime_dir)
        self.agents: Agents = agents or NoAgents()
        self.domain_state = domain_state
        self.release_timeout_s = release_timeout_s
        self.inline_io = inline_io
        self.peer_check = peer_check
        self.pool: Pool | None = None
        self.pool_error = ""
        self.io = IoThread()
        self.exports: dict[str, Export] = {}
        self.servers: dict[str, NbdServer] = {}
        self.vhosts: dict[str, VhostUserServer] = {}  # caches attached with transport vhost-user
        self.guests: dict[str, GuestView] = {}
        self.epochs: dict[str, int] = {}
        self.last_resize: dict[str, dict[str, Any]] = {}
        self.periods = 0
        self._tp_state: dict[str, Any] | None = None
        self._guest_tasks: dict[str, asyncio.Task[None]] = {}
        self.twolevel: TwoLevelCache | None = None
        self._dd_guest_splits: dict[str, tuple[Any, dict[str, dict[str, int]]]] = {}
        self._lock = asyncio.Lock()
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.io.start()
        self._started = True
        rec = self.bmap.pool()
        if rec is None:
            return
        try:
            self.pool = await asyncio.to_thread(self._open_pool, rec)
            await self._recover()
        except (PoolError, OSError) as exc:
            self.pool_error = str(exc)
            log.error("ssdcache: pool unavailable: %s", exc)
            if self.pool is not None:
                await asyncio.to_thread(self.pool.close, True)
                self.pool = None
            return
        if self.bmap.cache(DD_OWNER) is not None:
            # The two-level cache lives in memory: its SSD slots from before are meaningless.
            await self._release_commit(DD_OWNER, list(self.bmap.mapping(DD_OWNER)))
            self.bmap.remove_cache(DD_OWNER)
        for c in self.bmap.caches():
            await self._serve(c)

    async def stop(self) -> None:
        for t in self._guest_tasks.values():
            t.cancel()
        for t in self._guest_tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._guest_tasks.clear()
        for vm in list(self.servers):
            await self._unserve(vm)
        if self._started:
            self.io.stop()
            self._started = False
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close, True)
            self.pool = None
        with contextlib.suppress(OSError):
            self.runtime_dir.rmdir()  # only when empty

    def _open_pool(self, rec: dict[str, Any]) -> Pool:
        if rec["kind"] == "device" and not device_allowed(rec["path"], self.allowed_devices):
            raise PoolForbidden(f"pool device {rec['path']} is no longer in ssdcache.allowed_devices")
        pool = Pool.open_file(rec["path"]) if rec["kind"] == "file" else Pool.open_device(rec["path"])
        if pool.nblocks != rec["nblocks"]:
            pool.close(detach=True)
            raise PoolError(f"{rec['path']} now has {pool.nblocks} blocks; the block map has {rec['nblocks']}")
        return pool

    async def _recover(self) -> None:
        """Zero blocks a crash left dirty, before anything can be allocated."""
        dirty = self.bmap.dirty()
        if dirty:
            assert self.pool is not None
            log.info("ssdcache: zeroing %d blocks left dirty", len(dirty))
            await asyncio.to_thread(self._zero_and_free, dirty)

    def socket_path(self, vm: str, transport: str = "nbd") -> Path:
        return self.runtime_dir / (f"{vm}.nbd.sock" if transport == "nbd" else f"{vm}.vhost.sock")

    def _runtime_dir(self) -> None:
        """Create the socket folder (lazily: a daemon without caches leaves no trace in /run)."""
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        for p in (self.runtime_dir, *self.runtime_dir.parents):
            if str(p) in ("/", "/run"):
                break
            with contextlib.suppress(OSError):
                p.chmod(0o755)

    def export_name(self, vm: str) -> str:
        """The NBD export name QEMU must send for ``vm``: its name and a random secret kept in
        sqlite, so that another VM's QEMU (same user, same socket group) cannot open it."""
        c = self._cache(vm)
        secret = c.params.get("export_secret")
        if not isinstance(secret, str) or len(secret) < 32:
            secret = secrets.token_hex(16)
            self.bmap.update_cache(vm, params=dict(c.params, export_secret=secret))
        return f"{vm}-{secret}"

    async def _serve(self, c: CacheRecord) -> None:
        assert self.pool is not None
        self._runtime_dir()
        await asyncio.to_thread(nbdfast.load)  # the C data path is compiled once, off the event loop
        exp = Export(c.vm, c.size_blocks, self.pool, self.bmap.mapping(c.vm))
        srv = NbdServer(exp, self.socket_path(c.vm), socket_gid=_kvm_gid(), export_name=self.export_name(c.vm),
                        executor=None if self.inline_io else self.io.executor)
        await self.io.run(srv.start())
        self.exports[c.vm] = exp
        self.servers[c.vm] = srv
        self.guests.setdefault(c.vm, GuestView())
        self.epochs.setdefault(c.vm, 0)
        if c.params.get("transport") == "vhost-user":  # attached so before a restart: QEMU reconnects
            await self.serve_vhost(c.vm, str(c.params.get("vhost_serial") or GUEST_SERIAL))

    async def serve_vhost(self, vm: str, serial: str) -> Path:
        """Serve ``vm``'s export as a vhost-user-blk backend too (same map and lock as its NBD
        export); remembered in sqlite so that a restarted daemon serves it again. Only ``vm``'s
        own QEMU may connect (its pid, checked with SO_PEERCRED)."""
        exp = self.exports.get(vm)
        if exp is None:
            raise NotFound(f"no cache for {vm!r}")
        if exp.native is None:
            raise Unavailable(f"vhost-user needs the native data path: {nbdfast.why()}")
        await self._close_vhost(vm)
        srv = VhostUserServer(exp, self.socket_path(vm, "vhost-user"), serial, socket_gid=_kvm_gid(),
                              allow_peer=self.peer_check(vm) if self.peer_check else None)
        await asyncio.to_thread(srv.start)
        self.vhosts[vm] = srv
        c = self._cache(vm)
        if c.params.get("transport") != "vhost-user" or c.params.get("vhost_serial") != serial:
            self.bmap.update_cache(vm, params=dict(c.params, transport="vhost-user", vhost_serial=serial))
        return srv.socket_path

    async def _close_vhost(self, vm: str) -> None:
        srv = self.vhosts.pop(vm, None)
        if srv is not None:
            await asyncio.to_thread(srv.close)

    async def unserve_vhost(self, vm: str) -> None:
        """Stop serving ``vm`` over vhost-user and forget it (a restart will not serve it again)."""
        await self._close_vhost(vm)
        c = self.bmap.cache(vm)
        if c is not None and "transport" in c.params:
            self.bmap.update_cache(vm, params={k: v for k, v in c.params.items()
                                               if k not in ("transport", "vhost_serial")})

    async def _unserve(self, vm: str) -> None:
        await self._close_vhost(vm)  # the sqlite record stays: a restarted daemon serves it again
        srv = self.servers.pop(vm, None)
        self.exports.pop(vm, None)
        if srv is not None:
            await self.io.run(srv.close())

    # -- pool -----------------------------------------------------------------------------
    async def create_pool(self, file: str | None, device: str | None, size_mib: int | None) -> dict[str, Any]:
        """A pool file inside ``pool_dir`` (relative names are taken there), or a block device
        listed in ``allowed_devices`` that nobody uses. Its blocks are handed out only once
        proven zero: a fresh sparse file is; an adopted file or a device is zeroed first."""
        async with self._lock:
            if self.bmap.pool() is not None:
                raise Conflict("a pool already exists; delete it first")
            if (file is None) == (device is None):
                raise Invalid("give either file (with size_mib) or device")
            try:
                if file is not None:
                    if size_mib is None:
                        raise Invalid("a pool file needs size_mib")
                    if self.pool_dir is None:
                        raise PoolForbidden("no ssdcache.pool_dir configured: pool files are not allowed")
                    await asyncio.to_thread(self.pool_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
                    path = resolve_pool_file(file, self.pool_dir)
                    pool = await asyncio.to_thread(Pool.create_file, path, size_mib, self.reserve_free_mib)
                else:
                    assert device is not None
                    if not device_allowed(device, self.allowed_devices):
                        raise PoolForbidden(f"pool device {device}: not in ssdcache.allowed_devices")
                    pool = await asyncio.to_thread(Pool.open_device, device)
            except PoolError as exc:
                raise _pool_error(exc) from None
            try:
                # A fresh sparse file reads as zeros; an adopted file's or a device's old
                # content is zeroed (holes punched) before any block is handed out.
                self.bmap.create_pool(pool.path, pool.kind, pool.nblocks, dirty=pool.kind == "device" or pool.adopted)
            except BlockMapError as exc:
                pool.close(detach=True)
                raise Conflict(str(exc)) from None
            self.pool, self.pool_error = pool, ""
            try:
                await self._recover()
            except (PoolError, OSError) as exc:
                self.pool = None
                await asyncio.to_thread(pool.close, True)
                self.bmap.delete_pool()
                raise Conflict(f"pool {pool.path}: could not be zeroed: {exc}") from None
            self.store.log_decision("ssdcache", "pool-create", None, {"file": file, "device": device,
                                                                      "size_mib": size_mib}, pool.describe())
            return self.pool_view()

    async def delete_pool(self, remove_file: bool = False) -> dict[str, Any]:
        """Forget the pool. When its file or device is gone, its caches go with it (their data
        is gone too): there is always a way out."""
        async with self._lock:
            rec = self.bmap.pool()
            if rec is None:
                raise NotFound("no pool")
            gone = self.pool is None
            try:
                vms = self.bmap.delete_pool(with_caches=gone)
            except BlockMapError as exc:
                raise Conflict(str(exc)) from None
            for vm in vms:
                await self._unserve(vm)
                self.guests.pop(vm, None)
                self.epochs.pop(vm, None)
            self.twolevel = None if gone else self.twolevel
            if self.pool is not None:
                await asyncio.to_thread(self.pool.close, True)
                self.pool = None
            self.pool_error = ""
            if rec["kind"] == "file":
                await asyncio.to_thread(_detach_orphans, rec["path"])
            if remove_file and rec["kind"] == "file":
                with contextlib.suppress(FileNotFoundError):
                    Path(rec["path"]).unlink()
            self.store.log_decision("ssdcache", "pool-delete", None, {"remove_file": remove_file},
                                    {**rec, "caches_dropped": vms})
            return {"deleted": rec["path"], "caches_dropped": vms}

    def pool_view(self) -> dict[str, Any]:
        rec = self.bmap.pool()
        if rec is None:
            return {"exists": False}
        counts = self.bmap.counts()
        out: dict[str, Any] = {"exists": True, **rec, "blocks": counts, "error": self.pool_error}
        if self.pool is not None:
            out.update(device=self.pool.device, zeroed_blocks=self.pool.zeroed_blocks,
                       direct_io=self.pool.dfd >= 0)
        return out

    def _need_pool(self) -> Pool:
        if self.pool is None:
            raise Unavailable(self.pool_error or "no pool: create one first (POST /v1/ssdcache/pool)")
        return self.pool

    # -- registration ---------------------------------------------------------------------
    async def register(self, vm: str, size_mib: int, current_mib: int, persist: bool, weight: int = 100,
                       min_mib: int = 0, max_mib: int | None = None) -> dict[str, Any]:
        """SymFlex registration ``<vm-id, size, current-size, persist>``."""
        async with self._lock:
            pool = self._need_pool()
            if not 1 <= size_mib <= MAX_CACHE_MIB:
                raise Invalid(f"size_mib must be between 1 and {MAX_CACHE_MIB}")
            if not 0 <= current_mib <= size_mib:
                raise Invalid("current_mib must be between 0 and size_mib")
            if max_mib is not None and not min_mib <= max_mib <= size_mib:
                raise Invalid("max_mib must be between min_mib and size_mib")
            if not 0 <= min_mib <= size_mib:
                raise Invalid("min_mib must be between 0 and size_mib")
            self._check_bounds(size_mib, new_cache=True)
            free = self.bmap.counts()["free"]
            if current_mib > free:
                raise Conflict(f"pool exhausted: {current_mib} blocks requested, {free} free")
            try:
                self.bmap.add_cache(vm, size_mib, persist, weight, min_mib, max_mib,
                                    {"target_blocks": current_mib, "export_secret": secrets.token_hex(16)})
            except BlockMapError as exc:
                raise Conflict(str(exc)) from None
            try:
                if current_mib:
                    self.bmap.allocate(vm, list(range(current_mib)))
            except BlockMapError as exc:
                self.bmap.remove_cache(vm)
                raise Conflict(str(exc)) from None
            c = self.bmap.cache(vm)
            assert c is not None
            await self._serve(c)
            self.store.log_decision("ssdcache", "register", vm,
                                    {"size_mib": size_mib, "current_mib": current_mib, "persist": persist,
                                     "weight": weight}, {"socket": str(self.socket_path(vm)),
                                                         "free_after": self.bmap.counts()["free"]})
            log.info("ssdcache: %s registered: size %d MiB, current %d MiB, persist %s (pool %s)",
                     vm, size_mib, current_mib, persist, pool.device)
        await self.sync_guest(vm)
        return self.view(vm)

    def _check_bounds(self, size_mib: int, new_cache: bool, ignore: str | None = None) -> None:
        """What the API may make the daemon hold: at most ``max_caches`` caches, and the sum of
        their sizes within ``size_overcommit`` × the pool."""
        pool = self._need_pool()
        caches = [c for c in self.bmap.caches() if c.vm != ignore]
        if new_cache and sum(1 for c in caches if c.vm != DD_OWNER) >= self.max_caches:
            raise Conflict(f"too many caches: ssdcache.max_caches is {self.max_caches}")
        limit = int(self.size_overcommit * pool.nblocks)
        total = sum(c.size_blocks for c in caches) + size_mib
        if total > limit:
            raise Conflict(f"cache sizes would total {total} MiB, over {limit} MiB "
                           f"(pool {pool.nblocks} MiB x ssdcache.size_overcommit {self.size_overcommit:g})")

    async def unregister(self, vm: str) -> dict[str, Any]:
        """Always possible, even when the pool is gone: its blocks are then left dirty (zeroed
        if the pool ever comes back) instead of zeroed now."""
        async with self._lock:
            self._cache(vm)
            await self._unserve(vm)
            mapping = self.bmap.mapping(vm)
            released = await self._release_commit(vm, list(mapping))
            self.bmap.remove_cache(vm)
            self.guests.pop(vm, None)
            self.epochs.pop(vm, None)
            self.store.log_decision("ssdcache", "unregister", vm, {}, {"freed_blocks": released})
        return {"unregistered": vm, "freed_blocks": released}

    def _cache(self, vm: str) -> CacheRecord:
        c = self.bmap.cache(vm)
        if c is None:
            raise NotFound(f"no SSD cache registered for {vm!r}")
        return c

    async def update(self, vm: str, weight: int | None = None, persist: bool | None = None,
                     min_mib: int | None = None, max_mib: int | None = None) -> dict[str, Any]:
        async with self._lock:
            c = self._cache(vm)
            fields: dict[str, Any] = {}
            if weight is not None:
                fields["weight"] = weight
            if persist is not None:
                fields["persist"] = persist
            lo = c.min_blocks if min_mib is None else min_mib
            hi = c.max_blocks if max_mib is None else max_mib
            if not 0 <= lo <= c.size_blocks or (hi is not None and not lo <= hi <= c.size_blocks):
                raise Invalid("need 0 <= min_mib <= max_mib <= size_mib")
            if min_mib is not None:
                fields["min_blocks"] = min_mib
            if max_mib is not None:
                fields["max_blocks"] = max_mib
            if fields:
                self.bmap.update_cache(vm, **fields)
                self.store.log_decision("ssdcache", "update", vm, fields, {})
        return self.view(vm)

    # -- resizing -------------------------------------------------------------------------
    async def resize(self, vm: str, current_mib: int, reason: str = "api") -> dict[str, Any]:
        """Inflate or deflate ``vm``'s cache to ``current_mib`` backed blocks."""
        async with self._lock:
            return await self._resize(vm, current_mib, reason)

    async def _resize(self, vm: str, target: int, reason: str) -> dict[str, Any]:
        self._need_pool()
        c = self._cache(vm)
        exp = self.exports.get(vm)
        if exp is None:
            raise Unavailable(f"{vm}: not being served")
        if not 0 <= target <= c.size_blocks:
            raise Invalid(f"current_mib {target} outside 0..{c.size_blocks} (the cache's size)")
        before = len(exp.backed())
        t0 = time.perf_counter()
        if target > before:
            out = await self._inflate(c, exp, target - before)
        elif target < before:
            out = await self._deflate(c, exp, before - target)
        else:
            out = {"lbns": [], "chosen_by": None, "timings_ms": {}}
        now = self.bmap.cache(vm)
        self.bmap.update_cache(vm, params=dict(now.params if now else c.params, target_blocks=target))
        out.update(vm=vm, before_mib=before, current_mib=len(exp.backed()), reason=reason,
                   total_ms=round((time.perf_counter() - t0) * 1000, 3))
        self.last_resize[vm] = out
        self.store.log_decision("ssdcache", "inflate" if target > before else "deflate" if target < before
                                else "resize-noop", vm, {"target_mib": target, "before_mib": before,
                                                         "reason": reason},
                                {k: v for k, v in out.items() if k != "lbns"} | {"lbns": ranges(out["lbns"])})
        log.info("ssdcache: %s %d -> %d MiB (%s; chosen by %s; %.1f ms)", vm, before, out["current_mib"],
                 reason, out["chosen_by"], out["total_ms"])
        return out

    async def _inflate(self, c: CacheRecord, exp: Export, n: int) -> dict[str, Any]:
        revoked = set(c.revoked)
        cands = [lbn for lbn in range(c.size_blocks) if exp.map[lbn] < 0 and lbn not in revoked][:n]
        if len(cands) < n:
            raise Conflict(f"{c.vm}: only {len(cands)} logical blocks can be backed now; "
                           f"{len(revoked)} revoked blocks await the guest's acknowledgement")
        t0 = time.perf_counter()
        try:
            pairs = await asyncio.to_thread(self.bmap.allocate, c.vm, cands)
        except PoolExhausted as exc:
            raise Conflict(str(exc)) from None
        except BlockMapError as exc:
            raise Conflict(str(exc)) from None
        exp.map_blocks(pairs)
        commit_ms = (time.perf_counter() - t0) * 1000
        self.epochs[c.vm] = self.epochs.get(c.vm, 0) + 1
        t1 = time.perf_counter()
        told = await self._tell(c.vm, "ssdcache.grant", {"lbns": ranges(cands)})
        return {"lbns": cands, "chosen_by": "host", "guest_told": told,
                "timings_ms": {"commit": round(commit_ms, 3), "guest": round((time.perf_counter() - t1) * 1000, 3)}}

    async def _deflate(self, c: CacheRecord, exp: Export, n: int) -> dict[str, Any]:
        backed = set(exp.backed())
        chosen: list[int] = []
        guest_note = ""
        silent = False
        t0 = time.perf_counter()
        if self.agents.supports(c.vm, "ssdcache.release"):
            try:
                res, _ = await self.agents.call(c.vm, "ssdcache.release",
                                                {"count": n, "epoch": self.epochs.get(c.vm, 0)},
                                                timeout=self.release_timeout_s)
                chosen = _valid_release(res, backed, n)
                guest_note = f"guest released {len(chosen)}"
            except Exception as exc:  # the guest is untrusted: any failure means the host chooses
                guest_note = f"guest did not release: {type(exc).__name__}: {exc}"[:300]
                silent = isinstance(exc, AgentTimeout)
        else:
            guest_note = "no cooperative agent"
        guest_ms = (time.perf_counter() - t0) * 1000
        by_guest = len(chosen)
        host_pick: list[int] = []
        if len(chosen) < n:
            host_pick = exp.coldest(n - len(chosen), exclude=set(chosen))
            chosen += host_pick
        t1 = time.perf_counter()
        freed = await self._release_commit(c.vm, chosen)
        commit_ms = (time.perf_counter() - t1) * 1000
        self.epochs[c.vm] = self.epochs.get(c.vm, 0) + 1
        told = None
        if host_pick and self._aware(c):
            # The guest did not choose these: remember them until it acknowledges.
            self.bmap.update_cache(c.vm, revoked=sorted(set(c.revoked) | set(host_pick)))
            # A guest that just timed out is not asked again now: the periodic sync tells it.
            told = False if silent else await self._tell(c.vm, "ssdcache.revoke", {"lbns": ranges(host_pick)})
            if told:
                now = self.bmap.cache(c.vm)
                if now is not None:
                    self.bmap.update_cache(c.vm, revoked=sorted(set(now.revoked) - set(host_pick)))
        chosen_by = "guest" if not host_pick else "host" if not by_guest else "guest+host"
        return {"lbns": sorted(chosen), "chosen_by": chosen_by, "guest": guest_note, "guest_told": told,
                "freed_blocks": freed,
                "timings_ms": {"guest": round(guest_ms, 3), "commit": round(commit_ms, 3)}}

    async def _release_commit(self, vm: str, lbns: list[int]) -> int:
        """Mark the blocks dirty in sqlite (nothing in memory changes if that fails), unmap them
        (waiting for in-flight I/O), zero them, mark them free. A crash in between leaves them
        dirty, and dirty blocks are zeroed at start before anything is served."""
        if not lbns:
            return 0
        try:
            got = await asyncio.to_thread(self.bmap.release, vm, lbns)
        except BlockMapError as exc:
            raise Conflict(str(exc)) from None
        except sqlite3.Error as exc:
            raise Unavailable(f"{vm}: the block map could not be changed: {exc}") from None
        exp = self.exports.get(vm)
        if exp is not None:
            exp.unmap_blocks(list(got))
        pbns = list(got.values())
        if self.pool is None:  # the pool is gone: the blocks stay dirty until it comes back
            return len(pbns)
        await asyncio.to_thread(self._zero_and_free, pbns)
        return len(pbns)

    def _zero_and_free(self, pbns: list[int]) -> None:
        pool = self.pool
        if pool is None:
            return
        pool.zero(pbns)
        self.bmap.mark_free(pbns)

    # -- the guest ------------------------------------------------------------------------
    def _config_args(self, vm: str) -> dict[str, Any]:
        c = self._cache(vm)
        exp = self.exports[vm]
        # The guest finds the disk by its serial (GUEST_SERIAL) and knows BLOCK_SIZE: the op
        # carries only what changes (ops_schema.CacheConfigReq).
        return {"vm": vm, "size_blocks": c.size_blocks, "backed": ranges(exp.backed()),
                "epoch": self.epochs.get(vm, 0)}

    def _aware(self, c: CacheRecord) -> bool:
        """Has this VM ever had an agent that keeps a cache on the elastic disk?

        Only such a guest can mistake fresh zeros for its old cached data, so only its
        silently taken blocks are held back until it acknowledges (a guest without the agent
        sees an elastic disk whose unbacked blocks simply fail)."""
        if c.params.get("guest_aware"):
            return True
        if self.agents.supports(c.vm, "ssdcache.config"):
            self.bmap.update_cache(c.vm, params=dict(c.params, guest_aware=True))
            c.params["guest_aware"] = True
            return True
        return False

    async def _tell(self, vm: str, op: str, args: dict[str, Any]) -> bool:
        """Best effort: tell the guest about a change; True when it acknowledged."""
        g = self.guests.setdefault(vm, GuestView())
        if not self.agents.supports(vm, op):
            return False
        try:
            res, _ = await self.agents.call(vm, op, {**args, "epoch": self.epochs.get(vm, 0)},
                                            timeout=self.release_timeout_s)
            if isinstance(res, dict) and isinstance(res.get("epoch"), int):
                g.acked_epoch = res["epoch"]
            return True
        except Exception as exc:
            g.last_error = f"{op}: {type(exc).__name__}: {exc}"[:300]
            return False

    async def sync_guest(self, vm: str) -> bool:
        """Send the full config (the guest drops whatever is not backed); on its answer, the
        blocks revoked before this config are acknowledged and may be handed out again."""
        async with self._lock:
            if vm not in self.exports:
                return False
            c = self._cache(vm)
            ok = await self._tell(vm, "ssdcache.config", self._config_args(vm))
            if ok and c.revoked:
                now = self.bmap.cache(vm)
                if now is not None:
                    self.bmap.update_cache(vm, revoked=sorted(set(now.revoked) - set(c.revoked)))
            return ok

    async def guest_status(self, vm: str) -> dict[str, Any] | None:
        if not self.agents.supports(vm, "ssdcache.status"):
            return None
        try:
            res, _ = await self.agents.call(vm, "ssdcache.status", {}, timeout=self.release_timeout_s)
        except Exception as exc:
            self.guests.setdefault(vm, GuestView()).last_error = f"status: {exc}"[:300]
            return None
        if not isinstance(res, dict):
            return None
        st = _sanitize_status(res)
        self.guests.setdefault(vm, GuestView()).last_status = st
        return st

    async def guest_workload(self, vm: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
        """Start or stop the guest agent's cache workload (experiments, tests)."""
        self._cache(vm)
        op = {"start": "ssdcache.workload-start", "stop": "ssdcache.workload-stop"}.get(action)
        if op is None:
            raise Invalid("action must be start or stop")
        if not self.agents.supports(vm, op):
            raise Unavailable(f"{vm}: no guest agent with {op}")
        try:
            res, _ = await self.agents.call(vm, op, params, timeout=max(self.release_timeout_s, 15.0))
        except Invalid:
            raise  # bad workload parameters: the caller's 400, not the guest's fault
        except Exception as exc:
            raise Unavailable(f"{vm}: {op} failed: {exc}") from None
        return res if isinstance(res, dict) else {"result": str(res)[:200]}

    # -- periodic -------------------------------------------------------------------------
    async def on_period(self) -> None:
        """One control period: :meth:`observe_period`, then the policy step when it is due."""
        obs = await self.observe_period()
        if policy_due(obs):
            await self.policy_step()

    async def observe_period(self) -> dict[str, Any]:
        """Stats, guest sync, VM stop detection; returns what the policy step depends on.

        Guest conversations run as background tasks (one per VM at a time), so a silent
        guest costs the control loop nothing."""
        self.periods += 1
        for exp in self.exports.values():
            exp.stats.sample()
        for vm in list(self.exports):
            t = self._guest_tasks.get(vm)
            if t is None or t.done():
                self._guest_tasks[vm] = asyncio.get_running_loop().create_task(self._guest_tick(vm))
        await self._check_vm_states()
        return {"period": self.periods, "policy": self.policy(), "caches": len(self.exports)}

    async def policy_step(self) -> None:
        """One step of the automatic policy (shares or throughput); a failure is logged."""
        try:
            await self.apply_policy(reason="policy")
        except CacheError as exc:
            log.warning("ssdcache: policy step failed: %s", exc)

    async def _guest_tick(self, vm: str) -> None:
        try:
            g = self.guests.setdefault(vm, GuestView())
            if g.acked_epoch != self.epochs.get(vm, 0):
                await self.sync_guest(vm)
            await self.guest_status(vm)
        except Exception as exc:  # never let a guest conversation break the loop
            log.debug("ssdcache: %s: guest tick failed: %s", vm, exc)

    async def _check_vm_states(self) -> None:
        """A non-persistent cache is freed when its VM stops (and backed again when it runs)."""
        if self.domain_state is None:
            return
        for c in self.bmap.caches():
            if c.persist or c.vm not in self.exports:
                continue
            try:
                state = await asyncio.to_thread(self.domain_state, c.vm)
            except Exception:
                continue
            g = self.guests.setdefault(c.vm, GuestView())
            prev, g.last_seen_state = g.last_seen_state, state
            backed = len(self.exports[c.vm].backed())
            target = int(c.params.get("target_blocks", backed))
            if prev == "running" and state != "running" and backed:
                async with self._lock:
                    lbns = self.exports[c.vm].backed()
                    await self._release_commit(c.vm, lbns)
                    # The guest could not be told: its old data must not come back as zeros.
                    if self._aware(c):
                        self.bmap.update_cache(c.vm, revoked=sorted(set(c.revoked) | set(lbns)))
                    self.epochs[c.vm] = self.epochs.get(c.vm, 0) + 1
                    self.store.log_decision("ssdcache", "free-on-stop", c.vm, {"state": state},
                                            {"freed_blocks": backed, "keep_target": target})
                    log.info("ssdcache: %s stopped (%s): freed its %d non-persistent blocks", c.vm, state, backed)
            elif state == "running" and prev not in ("", "running") and backed < target:
                async with self._lock:
                    with contextlib.suppress(CacheError):
                        await self._resize(c.vm, target, reason="vm restarted")

    # -- policy ---------------------------------------------------------------------------
    def policy(self) -> dict[str, Any]:
        import json

        rows = self.store.query("SELECT value FROM ssd_settings WHERE key = 'policy'")
        cfg = dict(DEFAULT_POLICY)
        if rows:
            cfg.update(json.loads(rows[0]["value"]))
        return cfg

    def set_policy(self, **changes: Any) -> dict[str, Any]:
        import json

        cfg = self.policy()
        cfg.update({k: v for k, v in changes.items() if v is not None})
        if cfg["mode"] not in ("manual", "shares", "throughput"):
            raise Invalid("mode must be manual, shares or throughput")
        with self.store.transaction() as db:
            db.execute("INSERT INTO ssd_settings (key, value) VALUES ('policy', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (json.dumps(cfg),))
        self.store.log_decision("ssdcache", "policy", None, changes, cfg)
        return cfg

    def throughputs(self) -> dict[str, float]:
        """Per VM: the guest's workload ops/s when its agent reports one, else NBD ops/s."""
        out = {}
        for vm, exp in self.exports.items():
            st = self.guests.get(vm, GuestView()).last_status or {}
            ops = st.get("ops_per_s")
            out[vm] = float(ops) if isinstance(ops, (int, float)) else exp.stats.rate()["ops_per_s"]
        return out

    def plan(self, mode: str | None = None) -> tuple[dict[str, int], dict[str, Any]]:
        cfg = self.policy()
        mode = mode or cfg["mode"]
        caches = [c for c in self.bmap.caches() if c.vm in self.exports]
        pool = self._need_pool()
        capacity = pool.nblocks if cfg["capacity_mib"] is None else min(pool.nblocks, int(cfg["capacity_mib"]))
        demands = [pol.Demand(c.vm, c.weight, c.min_blocks, c.max_blocks if c.max_blocks is not None
                              else c.size_blocks) for c in caches]
        current = {c.vm: len(self.exports[c.vm].backed()) for c in caches}
        try:
            if mode == "shares":
                return pol.share_allocation(capacity, demands), {"mode": mode, "capacity": capacity,
                                                                 "weights": {c.vm: c.weight for c in caches}}
            if mode == "throughput":
                ratio = {c.vm: float(cfg["target_ratio"].get(c.vm, 1.0)) for c in caches}
                tp = self.throughputs()
                new, why = pol.throughput_proportional(capacity, current, {vm: tp.get(vm, 0.0) for vm in current},
                                                       ratio, demands, gain=float(cfg["gain"]),
                                                       max_step=int(cfg["max_step_mib"]), state=self._tp_state)
                return new, {"mode": mode, "throughput": tp, **why}
        except pol.PolicyError as exc:
            raise Invalid(str(exc)) from None
        raise Invalid(f"no plan for mode {mode!r}")

    async def apply_policy(self, mode: str | None = None, reason: str = "policy") -> dict[str, Any]:
        async with self._lock:
            target, why = self.plan(mode)
            if "state" in why:
                self._tp_state = why["state"]
            current = {vm: len(self.exports[vm].backed()) for vm in target}
            shrink, grow = pol.moves(current, target)
            done = []
            for vm, n in shrink + grow:  # deflate first: inflation needs the freed blocks
                try:
                    r = await self._resize(vm, n, reason=f"{reason}: {why.get('mode')}")
                    done.append({"vm": vm, "from": r["before_mib"], "to": r["current_mib"]})
                except CacheError as exc:
                    done.append({"vm": vm, "error": str(exc)})
            self.store.log_decision("ssdcache", "policy-apply", None, {"current": current, **why},
                                    {"target": target, "moves": done})
            return {"target": target, "moves": done, "why": why}

    # -- DoubleDecker (two-level Mem/SSD partitions) --------------------------------------
    async def twolevel_setup(self, mem_mib: int, ssd_mib: int) -> dict[str, Any]:
        """Create (or re-size) the hypervisor cache: a memory tier and an SSD tier on the pool."""
        async with self._lock:
            if ssd_mib:
                # Checked against the pool before anything is built or released.
                pool = self._need_pool()
                have = self.bmap.counts()["free"] + (self.bmap.owned_count(DD_OWNER)
                                                     if self.bmap.cache(DD_OWNER) else 0)
                if ssd_mib > have:
                    raise Conflict(f"SSD tier: pool exhausted: {ssd_mib} blocks requested, {have} available "
                                   f"(pool {pool.nblocks})")
                self._check_bounds(ssd_mib, new_cache=False, ignore=DD_OWNER)
            old = self.twolevel
            if self.bmap.cache(DD_OWNER) is not None:
                await self._release_commit(DD_OWNER, list(self.bmap.mapping(DD_OWNER)))
                self.bmap.remove_cache(DD_OWNER)
            ssd = None
            if ssd_mib:
                try:
                    self.bmap.add_cache(DD_OWNER, ssd_mib, True, params={"internal": "doubledecker ssd tier"})
                    pairs = self.bmap.allocate(DD_OWNER, list(range(ssd_mib)))
                except BlockMapError as exc:
                    if self.bmap.cache(DD_OWNER) is not None and not self.bmap.mapping(DD_OWNER):
                        self.bmap.remove_cache(DD_OWNER)
                    raise Conflict(f"SSD tier: {exc}") from None
                ssd = SsdTier(self.pool, [pairs[i] for i in range(ssd_mib)])
            tl = TwoLevelCache(mem_pages=(mem_mib << 20) // PAGE, ssd=ssd, split=self._dd_split)
            if old is not None:  # keep the configuration across a re-size
                for vm, tw in old.vms.items():
                    tl.configure_vm(vm, tw, old.containers.get(vm, {}))
            self.twolevel = tl
            self.store.log_decision("ssdcache", "twolevel-setup", None, {"mem_mib": mem_mib, "ssd_mib": ssd_mib},
                                    {"capacity_pages": tl.capacity})
            return tl.view()

    def _tl(self) -> TwoLevelCache:
        if self.twolevel is None:
            raise Unavailable("no two-level cache: PUT /v1/ssdcache/twolevel first")
        return self.twolevel

    def _dd_split(self, vm: str, share: dict[str, int], containers: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """The VM level: the guest's own split when it gave one for exactly these inputs."""
        got = self._dd_guest_splits.get(vm)
        if got is not None and got[0] == (tuple(sorted(share.items())), repr(sorted(containers.items()))):
            return got[1]
        return container_quotas(share, containers)

    async def twolevel_configure(self, vm: str, tw: Any, container: str | None = None) -> dict[str, Any]:
        """Set ``<T, W>`` of a VM (hypervisor level) or of one of its containers (VM level)."""
        tl = self._tl()
        try:
            if container is None:
                out = tl.configure_vm(vm, tw)
            else:
                out = tl.configure_container(vm, container, tw)
        except TwoLevelError as exc:
            raise Invalid(str(exc)) from None
        self.store.log_decision("ssdcache", "twolevel-configure", vm, {"container": container, "tw": tw}, out)
        await self._ask_guest_splits()
        return tl.view()

    async def twolevel_remove(self, vm: str, container: str | None = None) -> dict[str, Any]:
        tl = self._tl()
        out = tl.remove(vm, container)
        self.store.log_decision("ssdcache", "twolevel-remove", vm, {"container": container}, out)
        await self._ask_guest_splits()
        return tl.view()

    async def _ask_guest_splits(self) -> None:
        """Ask each VM's agent to split its share among its containers (the guest decides);
        re-partition when an answer differs from the host's fallback."""
        tl = self._tl()
        shares = vm_shares(tl.capacity, tl.vms)
        changed = False
        for vm in sorted(set(tl.containers) | set(self._dd_guest_splits)):
            conts = tl.containers.get(vm, {})
            if not self.agents.supports(vm, "ssdcache.twolevel-split"):
                continue
            if not conts:
                # No containers left (or the VM left the two-level cache): the guest's store
                # must stop holding pages for them.
                if self._dd_guest_splits.pop(vm, None) is not None:
                    with contextlib.suppress(Exception):
                        await self.agents.call(vm, "ssdcache.twolevel-split",
                                               {"share": shares.get(vm, {"mem": 0, "ssd": 0}), "containers": {}},
                                               timeout=self.release_timeout_s)
                continue
            args = {"share": shares[vm], "containers": {c: {"type": t, "weight": w} for c, tw in conts.items()
                                                         for t, w in tw.items()}}
            if any(len(tw) != 1 for tw in conts.values()):
                continue  # the guest's op takes one <T, W> per container
            try:
                res, _ = await self.agents.call(vm, "ssdcache.twolevel-split", args, timeout=self.release_timeout_s)
                split = _valid_split(res, shares[vm], conts)
            except Exception as exc:
                log.info("ssdcache: %s: no split from the guest (%s); using the host's", vm, exc)
                continue
            key = (tuple(sorted(shares[vm].items())), repr(sorted(conts.items())))
            if self._dd_guest_splits.get(vm) != (key, split):
                self._dd_guest_splits[vm] = (key, split)
                changed = True
        if changed:
            tl.refresh("the guests' VM-level split")

    async def twolevel_guest(self, vm: str) -> dict[str, Any]:
        """The VM level as the guest runs it: its in-guest store's per-container quotas and
        occupancy (the containers' puts and gets), validated and bounded."""
        if not self.agents.supports(vm, "ssdcache.twolevel-status"):
            raise Unavailable(f"{vm}: no guest agent with ssdcache.twolevel-status")
        try:
            res, _ = await self.agents.call(vm, "ssdcache.twolevel-status", {},
                                            timeout=max(self.release_timeout_s, 10.0))
        except Exception as exc:
            raise Unavailable(f"{vm}: ssdcache.twolevel-status failed: {exc}") from None
        return _sanitize_dd_status(res)

    # -- views ----------------------------------------------------------------------------
    def view(self, vm: str) -> dict[str, Any]:
        c = self._cache(vm)
        exp = self.exports.get(vm)
        g = self.guests.get(vm, GuestView())
        backed = exp.backed() if exp is not None else sorted(self.bmap.mapping(vm))
        return {
            "vm": vm,
            "size_mib": c.size_blocks,
            "current_mib": len(backed),
            "target_mib": c.params.get("target_blocks"),
            "persist": c.persist,
            "weight": c.weight,
            "min_mib": c.min_blocks,
            "max_mib": c.max_blocks,
            "backed": ranges(backed),
            "revoked": ranges(c.revoked),
            "socket": str(self.socket_path(vm)),
            "export": self.export_name(vm),
            "nbd_uri": f"nbd+unix:///{self.export_name(vm)}?socket={self.socket_path(vm)}",
            "serving": exp is not None,
            "io": exp.stats.as_dict() if exp is not None else None,
            "epoch": self.epochs.get(vm, 0),
            "guest": {"acked_epoch": g.acked_epoch, "status": g.last_status, "last_error": g.last_error,
                      "vm_state": g.last_seen_state},
            "last_resize": self.last_resize.get(vm),
        }

    def views(self) -> list[dict[str, Any]]:
        return [self.view(c.vm) for c in self.bmap.caches() if c.vm != DD_OWNER]

    def disk_xml(self, vm: str, target_dev: str = "vdb", serial: str = GUEST_SERIAL) -> str:
        """libvirt ``<disk>`` for hot-plugging ``vm``'s elastic SSD (QEMU's NBD client).

        libvirt 9.0 has no ``<reconnect>`` for NBD disks: when the daemon restarts, QEMU's
        client reconnects on the guest's next request, and requests issued while the daemon
        is down fail with EIO (the guest cache treats that as a miss). (A vhost-user disk is not
        attached with libvirt XML: see :mod:`symbiont.host.vhostdisk`.)"""
        from xml.sax.saxutils import escape, quoteattr

        name = self.export_name(vm)
        return (
            "<disk type='network' device='disk'>"
            "<driver name='qemu' type='raw' error_policy='report' rerror_policy='report'/>"
            f"<source protocol='nbd' name={quoteattr(name)}>"
            f"<host transport='unix' socket={quoteattr(str(self.socket_path(vm)))}/>"
            "</source>"
            f"<target dev={quoteattr(target_dev)} bus='virtio'/>"
            f"<serial>{escape(serial)}</serial>"
            "</disk>"
        )


def _kvm_gid() -> int | None:
    """The group QEMU runs in (its sockets are ``root:kvm 0660``); None where there is none."""
    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None


def _detach_orphans(path: str) -> None:
    """Detach loop devices still bound to ``path`` after it was deleted (``(deleted)`` in sysfs)."""
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if bf.read_text().strip() == f"{path} (deleted)":
                dev = f"/dev/{bf.parent.parent.name}"
                subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
                log.info("ssdcache: detached %s, left on the deleted %s", dev, path)


def _valid_release(res: Any, backed: set[int], n: int) -> list[int]:
    """The guest's answer, checked: distinct, currently backed blocks, at most ``n``."""
    if not isinstance(res, dict) or not isinstance(res.get("lbns"), list):
        raise ValueError("answer has no lbns list")
    raw = res["lbns"]
    if len(raw) > 4 * n + 16:
        raise ValueError(f"answer lists {len(raw)} blocks for {n} requested")
    out: list[int] = []
    seen: set[int] = set()
    for item in raw:
        if isinstance(item, list) and len(item) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in item):
            vals = expand([item]) if 0 < item[1] <= n else []
        elif isinstance(item, int) and not isinstance(item, bool):
            vals = [item]
        else:
            raise ValueError(f"bad block {item!r}")
        for v in vals:
            if v in backed and v not in seen and len(out) < n:
                seen.add(v)
                out.append(v)
    return out


def _valid_split(res: Any, share: dict[str, int], conts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The guest's split, checked: exactly its containers, non-negative, within its share."""
    split = res.get("split") if isinstance(res, dict) else None
    if not isinstance(split, dict) or set(split) != set(conts):
        raise ValueError("split must name exactly the VM's containers")
    out: dict[str, dict[str, int]] = {}
    for c, q in split.items():
        if not isinstance(q, dict):
            raise ValueError("each container's split is {mem, ssd}")
        out[c] = {}
        for t in ("mem", "ssd"):
            v = q.get(t, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError("quotas are non-negative integers")
            out[c][t] = v
    for t in ("mem", "ssd"):
        if sum(q[t] for q in out.values()) > share.get(t, 0):
            raise ValueError(f"the split exceeds the VM's {t} share")
    return out


_STATUS_KEYS = {"ops_per_s": float, "hit_rate": float, "hits": int, "misses": int, "cached_blocks": int,
                "backed_blocks": int, "eio": int, "epoch": int, "workload": bool, "device": str,
                "slow_device": str, "fills": int, "evictions": int, "released": int, "workload_ops": int,
                "workload_errors": int, "workload_mismatches": int}


def policy_due(obs: dict[str, Any]) -> bool:
    """Pure: is the automatic policy due this period (mode not manual, every N periods)?"""
    pol_cfg = obs["policy"]
    return pol_cfg["mode"] != "manual" and obs["period"] % max(1, int(pol_cfg["every_periods"])) == 0


def _sanitize_status(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, tp in _STATUS_KEYS.items():
        v = res.get(k)
        if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e12:
            out[k] = float(v)
        elif tp is int and isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 62:
            out[k] = v
        elif tp is bool and isinstance(v, bool):
            out[k] = v
        elif tp is str and isinstance(v, str):
            out[k] = v[:200]
    return out


_DD_COUNTERS = ("puts", "gets", "hits", "demoted", "evicted", "dropped")


def _nonneg(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 else 0


def _sanitize_dd_status(res: Any) -> dict[str, Any]:
    """The guest's DoubleDecker status, reduced to known keys and integers (at most 256 containers)."""
    if not isinstance(res, dict):
        raise Unavailable("ssdcache.twolevel-status: not an object")
    conts = res.get("containers") if isinstance(res.get("containers"), dict) else {}
    out_c: dict[str, Any] = {}
    for name, c in list(conts.items())[:256]:
        if not isinstance(name, str) or not 0 < len(name) <= 128 or not isinstance(c, dict):
            continue
        q = c.get("quota") if isinstance(c.get("quota"), dict) else {}
        u = c.get("used") if isinstance(c.get("used"), dict) else {}
        out_c[name] = {"quota": {t: _nonneg(q.get(t)) for t in ("mem", "ssd")},
                       "used": {t: _nonneg(u.get(t)) for t in ("mem", "ssd")},
                       **{k: _nonneg(c.get(k)) for k in _DD_COUNTERS}}
    share = res.get("share") if isinstance(res.get("share"), dict) else {}
    return {"share": {t: _nonneg(share.get(t)) for t in ("mem", "ssd")}, "containers": out_c,
            "ssd_capacity": _nonneg(res.get("ssd_capacity")), "ssd_errors": _nonneg(res.get("ssd_errors")),
            "clients": _nonneg(res.get("clients")), "refused": _nonneg(res.get("refused"))}
