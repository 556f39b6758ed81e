"""Orchestration of container migrations between VMs, and their crash recovery.

One coroutine per migration walks the journal's phases (:mod:`symbiont.migration.journal`):
``check`` (the source agent says the container can be dumped) → ``predump`` + ``transfer``
(iterative pre-copy while the container runs) → ``dump`` (frozen, final delta and its open
files) → ``transfer`` → ``restore`` (same cgroup limits and namespaces on the destination)
→ ``confirm`` (the destination's copy runs: from here it is the container) → ``cleanup``
(the frozen source copy goes) → ``done``. Any failure before ``confirm`` aborts: the
destination's files and restored copy are removed and the source is thawed.

Two transfer paths share everything else:

* ``relay`` (Portkey): the source agent streams the images through the daemon: over the
  ``shm`` channel (default; each VM's ivshmem region, one host copy, see docs/migration.md) or
  as framed binary events on its virtio-serial channel (4 MiB by default, up to the protocol's
  16 MiB); the daemon checks each chunk (manifest, bounds, window; a framed chunk's CRC-32:
  the host never hashes with SHA-256; each file's CRC-32 is computed once by the source and
  checked once by the destination, which is all an shm chunk gets), queues the
  payload it received (no copy) in a bounded window and writes it to the destination agent;
  acknowledgements flow back with the measured drain rate, from which the sender computes
  its delay (adaptive) — or it sends at a fixed rate (the baseline);
* ``network``: the guests stream the same files to each other over TCP on their private
  link (virtio NICs on taps bridged inside the lab's own network namespace).

Pre-copy is iterative: pre-dumps (CRIU memory tracking, each on top of the last) and their
transfers repeat while the container runs, until one is below ``converge`` bytes or stops
shrinking (:func:`converged`); the frozen final dump then holds only what was written since
the last pre-dump. A server's own address (``ip``) moves with it: fenced off on the source
before the freeze, up on the destination before CRIU restores its established connections.

On daemon start (and every period until settled) unfinished journal entries are resolved
with :func:`symbiont.migration.journal.recovery_action`.

The controller reaches the guests only through the agent gateway (``ctx.agents``: canonical
``migration.*`` ops, typed errors from :mod:`symbiont.errors`, binary chunks through
``ctx.agents.stream``) and the host only through ``ctx.host``; it is held by
:class:`symbiont.migration.part.MigrationPart`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from symbiont.errors import Conflict, DaemonError, Invalid, NotFound, Unavailable
from symbiont.host.port import HostError
from symbiont.migration import journal as jn
from symbiont.migration.hostcpu import CpuMeter
from symbiont.part import PartContext
from symbiont_agent import migration_rate as rate

log = logging.getLogger(__name__)

LONG = 600.0  # CRIU under TCG: a dump of tens of MiB takes tens of seconds
FAULTS = ("corrupt", "truncate")
CHUNK_EVENT = "mig-chunk"  # the source agent's binary stream event (one image chunk per frame)
MAX_TOTAL = 2 << 30
SHRINK = 0.8  # a pre-dump at least this big relative to the one before: the dirty set stopped shrinking


def converged(sizes: list[int], threshold: int, shrink: float = SHRINK) -> str | None:
    """Why pre-copy should stop after these pre-dump sizes (bytes), or None to go on.

    The first pre-dump is the whole memory; each later one holds what was written since the
    one before, i.e. what the final dump would move if it came now. Stop once that is below
    ``threshold`` (the freeze would be short), or once it no longer shrinks (the container
    writes as fast as pre-copy moves: more rounds only cost CPU)."""
    if len(sizes) >= 2 and sizes[-1] <= threshold:
        return "below-threshold"
    if len(sizes) >= 3 and sizes[-1] >= shrink * sizes[-2]:
        return "not-shrinking"
    return None


class MigrationFailed(Exception):
    """A step failed; the migration is aborted (the source keeps running)."""


CHANNELS = ("serial", "shm")
DEFAULT_CHANNEL = "shm"  # measured cheaper and faster (BENCHMARKS.md, fourth round); serial is the fallback
REGION_PREFIX = "symbiont-mig-"
REGION_RETRY_S = 30.0  # a region whose unplug failed is tried again after this long


@dataclass
class Region:
    """One VM's shared region of the ``shm`` channel, mapped on the host (never in two guests:
    each migration plugs one region into its source and another into its destination)."""

    name: str
    vm: str
    size: int
    dev: str  # the guest's PCI address of the ivshmem-plain device
    token: str  # written into the region's header: the guest checks it found this region
    mm: Any
    view: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mm)
        self.view[: rate.SHM_TOKEN] = bytes.fromhex(self.token)

    @property
    def data(self) -> memoryview:
        return self.view[rate.SHM_HEADER :]

    def desc(self) -> dict[str, Any]:
        return {"dev": self.dev, "size": self.size, "token": self.token}

    def scrub(self) -> None:
        """Give the data pages back to the host between migrations (tmpfs hole punch); the
        next migration's writes fault fresh zero pages in."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.mm.madvise(mmap.MADV_REMOVE, rate.SHM_HEADER, self.size - rate.SHM_HEADER)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()


class Relay:
    """The hypervisor side of one relayed transfer: validate, buffer (bounded), forward, acknowledge."""

    def __init__(
        self, ctl: MigrationController, m: dict[str, Any], files: dict[str, dict[str, Any]],
        window: int, chunk: int, bw0: float, fault: str | None, workers: int = 2,
        regions: tuple[Region, Region] | None = None,
    ) -> None:  # fmt: skip
        self.ctl, self.m, self.files = ctl, m, files
        self.window, self.chunk = window, chunk
        # shm: (source, destination) regions; one forwarder, so the destination's ring is
        # written and freed in order (see rate.Ring)
        self.shm = regions
        if regions is not None:
            workers = 1
            self.src_data, self.dst_data = regions[0].data, regions[1].data
            self.dring = rate.Ring(len(self.dst_data))
            self.dslots: deque[list[bool]] = deque()
        self.queue: asyncio.Queue[tuple[dict[str, Any], bytes, list[bool] | None]] = asyncio.Queue()
        self.inflight = 0  # received from the source, not yet written at the destination
        self.received = self.acked = self.chunks = self.foreign = 0
        self.error: str | None = None
        self.bw = rate.BandwidthEstimator(bw0)
        self.fault = fault
        self.total = sum(int(e["size"]) for e in files.values())
        self.last = max(files.values(), key=lambda e: e["size"]) if files else None
        self.workers = [asyncio.get_running_loop().create_task(self._forward()) for _ in range(workers)]
        self._credit_tasks: set[asyncio.Task[Any]] = set()
        self._credit_next: dict[str, Any] | None = None  # the newest credit, held while one is in flight
        self.credits = self.credits_coalesced = 0
        self.closed = False
        self.started = time.monotonic()

    def on_chunk(self, data: dict[str, Any], payload: bytes) -> None:
        """Called by the source's link for every ``mig-chunk`` event; never raises."""
        if self.error:
            return
        slot: list[bool] | None = None
        if data.get("mid") != self.m["id"]:
            # A sender of an earlier migration that a killed daemon left running (it stops at
            # its abort marker or when no credit comes): not this stream's, never its failure.
            self.foreign += 1
            return
        try:
            if self.shm is None:
                meta = rate.validate_chunk(data, payload, self.files, self.chunk)
            elif payload:
                raise rate.StreamError("a chunk of the shm channel carries no payload")
            else:
                meta = rate.validate_chunk_head(data, self.files, self.chunk)
            n = meta["len"]
            if self.inflight + n > self.window:
                raise rate.StreamError(f"the guest overran the relay window ({self.inflight} + {n} bytes)")
            if self.shm is not None:
                at = rate.validate_span(data.get("at"), n, len(self.src_data))
                dat = self.dring.alloc(n)
                if dat is None:  # cannot happen within the window: a bug, never an overwrite
                    raise rate.StreamError("no room in the destination's region")
                slot = [False]
                self.dslots.append(slot)
                # the one copy on the host; a CRC, if the header has one, is checked on the
                # copy, which the source guest can no longer change
                self.dst_data[dat : dat + n] = self.src_data[at : at + n]
                rate.check_crc(meta, self.dst_data[dat : dat + n])
                meta = {**meta, "at": dat}
        except rate.StreamError as exc:
            self._fail(f"{self.m['vm']}: {exc}")
            return
        self.received += n
        self.inflight += n
        self.chunks += 1
        if self.fault == "corrupt" and self.chunks == 2 and n:  # a bit flip past the sender's checksum
            if self.shm is not None:
                self.dst_data[meta["at"]] ^= 0xFF
            else:
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
            self.fault = None
        elif (
            self.fault == "truncate"
            and self.last is not None
            and meta["path"] == self.last["path"]
            and meta["off"] + meta["len"] == self.last["size"]
            and meta["len"] > 0
        ):
            self.fault = None  # the stream's last chunk never reaches the destination
            self._acked(n, 0.0, slot)
            return
        self.queue.put_nowait((meta, payload, slot))

    async def _forward(self) -> None:
        while True:
            meta, payload, slot = await self.queue.get()
            t0 = time.monotonic()
            try:
                if not self.error:
                    args = {"mid": self.m["id"], **meta}
                    if self.shm is not None:
                        args["shm"] = self.shm[1].desc()
                    await self.ctl.agent(self.m["dest"], "migration.recv", args, timeout=60,
                                         payload=payload)  # fmt: skip
            except DaemonError as exc:
                self._fail(str(exc))
            finally:
                self._acked(int(meta["len"]), time.monotonic() - t0, slot)
                self.queue.task_done()

    def _fail(self, why: str) -> None:
        """Refuse the rest of the stream and tell the sender to stop at once."""
        if self.error:
            return
        self.error = why
        self._credit({"mid": self.m["id"], "acked": self.acked, "bw": max(1.0, self.bw.value), "stop": True})

    def _credit(self, args: dict[str, Any]) -> None:
        """Acknowledge to the source. At most one credit is in flight: while one is, only the
        newest state is kept and sent when it is answered (each credit is a round trip through
        the source's serial channel and a TCG-emulated interrupt; a transfer of many small image
        files acknowledged one by one paid that per file). A stop goes at once."""
        if self.shm is not None:  # what the source may reuse of its region: all it sent so far was copied
            args["taken"] = self.chunks
        if self._credit_tasks and not args.get("stop"):
            if self._credit_next is not None:  # replaced unsent: folded into the newer one
                self.credits_coalesced += 1
            self._credit_next = args
            return
        if self.ctl.ctx.agents.supports(self.m["vm"], "migration.credit"):
            t = asyncio.get_running_loop().create_task(self.ctl.ctx.agents.call(self.m["vm"], "migration.credit", args))
            self._credit_tasks.add(t)
            self.credits += 1
            t.add_done_callback(self._credit_done)

    def _acked(self, n: int, secs: float, slot: list[bool] | None = None) -> None:
        if slot is not None:  # the destination wrote it: its room in the region is free (in order)
            slot[0] = True
            while self.dslots and self.dslots[0][0]:
                self.dslots.popleft()
                self.dring.release(1)
        self.inflight -= n
        self.acked += n
        bw = self.bw.observe(n, secs) if secs > 0 else self.bw.value
        self._credit({"mid": self.m["id"], "acked": self.acked, "bw": max(1.0, bw)})

    def _credit_done(self, t: asyncio.Task[Any]) -> None:
        self._credit_tasks.discard(t)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            t.result()
        nxt, self._credit_next = self._credit_next, None
        if nxt is not None and not self.closed and not t.cancelled():
            self._credit(nxt)

    async def close(self) -> None:
        self.closed = True
        for w in self.workers:
            w.cancel()
        for w in self.workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w
        for t in list(self._credit_tasks):
            t.cancel()


class MigrationController:
    """All migrations of one daemon (held by the migration part)."""

    def __init__(self, ctx: PartContext) -> None:
        self.ctx = ctx
        self.journal = jn.Journal(ctx.store)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.recovering: set[str] = set()
        self.retry_at: dict[str, float] = {}  # region -> when to try its unplug again
        self.vm_regions: dict[str, Region] = {}  # VM -> its region of the shm channel (mapped here)
        self._task_vms: dict[str, tuple[str, str]] = {}  # running migration -> its two VMs

    # -- agents --------------------------------------------------------------------------------
    def require(self, vm: str) -> None:
        """``vm`` is registered (404 otherwise) and its agent serves migrations (503/409 otherwise)."""
        self.ctx.vm(vm)
        if not self.ctx.agent(vm).ready:
            raise Unavailable(f"{vm}: the guest agent is not connected")

    async def agent(self, vm: str, op: str, args: dict[str, Any], timeout: float = 30.0,
                    payload: bytes = b"") -> dict[str, Any]:  # fmt: skip
        """One ``migration.*`` op through the gateway (caps, schema, typed errors done there)."""
        result, _ = await self.ctx.agents.call(vm, op, args, payload=payload, timeout=timeout)
        if not isinstance(result, dict):
            raise Unavailable(f"{vm}: agent answered {op} with a {type(result).__name__}")
        return result

    # -- API ---------------------------------------------------------------------------------------
    async def start(self, vm: str, ct: str, dest: str, path: str = "relay", mode: str = "adaptive",
                    predumps: int = 1, rate_bps: float = 8e6, window: int = 16 << 20, chunk: int = 4 << 20,
                    fault: str | None = None, converge: int = 1 << 20,
                    ip: str | None = None, channel: str | None = None, lazy: bool = False) -> dict[str, Any]:  # fmt: skip
        """Validate, journal, and run the migration in the background; returns the journal entry.
        ``lazy``: restore with CRIU's lazy pages (the tasks run before their memory is back,
        which the destination's ``criu lazy-pages`` faults in and pushes from the received
        images), meant to keep the freeze from growing with the container's size; under TCG it
        measured slower than the eager restore (BENCHMARKS.md, fifth round), hence off by default."""
        self.ctx.vm(vm)
        self.ctx.vm(dest)
        if vm == dest:
            raise Invalid("to: the destination must be another VM")
        if path not in ("relay", "network"):
            raise Invalid(f"path: {path!r} (relay or network)")
        if channel is not None and path != "relay":
            raise Invalid("channel: only the relay path has channels (serial, shm)")
        if path == "relay":
            channel = channel or DEFAULT_CHANNEL
            if channel not in CHANNELS:
                raise Invalid(f"channel: {channel!r} ({' or '.join(CHANNELS)})")
        if mode not in rate.MODES:
            raise Invalid(f"rate: {mode!r} ({', '.join(rate.MODES)})")
        if fault is not None and fault not in FAULTS:
            raise Invalid(f"fault: {fault!r} ({', '.join(FAULTS)})")
        self.require(vm)
        self.require(dest)
        mid = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        params = {
            "predumps": predumps,
            "rate_bps": rate_bps,
            "window": window,
            "chunk": chunk,
            "fault": fault,
            "converge": converge,
            "ip": ip,
            "channel": channel,
            "lazy": bool(lazy),
        }
        try:
            self.journal.create(mid, vm, ct, dest, path, mode, params)
        except jn.JournalError as exc:
            raise Conflict(str(exc)) from None
        self.ctx.decisions.log(
            "start",
            vm,
            {"ct": ct, "dest": dest, "path": path, "rate": mode, **params},
            {"id": mid},
        )
        self._task_vms[mid] = (vm, dest)
        self.tasks[mid] = asyncio.get_running_loop().create_task(self._run(mid), name=f"migrate-{mid}")
        m = self.journal.get(mid)
        assert m is not None
        return m

    def show(self, mid: str) -> dict[str, Any]:
        m = self.journal.get(mid)
        if m is None:
            raise NotFound(f"no migration {mid!r}")
        m["running"] = mid in self.tasks
        return m

    # -- the migration ------------------------------------------------------------------------------
    async def _run(self, mid: str) -> None:
        m = self.journal.get(mid)
        assert m is not None
        meter = await asyncio.to_thread(CpuMeter.for_migration, self.ctx.host, m["vm"], m["dest"])
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        m["_meter"] = meter
        try:
            await self._steps(m, timings, meter)
        except asyncio.CancelledError:
            await self._abort(m, "daemon stopping", timings)
            raise
        except (DaemonError, MigrationFailed, jn.JournalError, OSError) as exc:
            log.warning("migration %s failed: %s", mid, exc)
            await self._abort(m, str(exc), timings)
        except Exception as exc:  # never leave a frozen source behind
            log.exception("migration %s crashed", mid)
            await self._abort(m, f"{type(exc).__name__}: {exc}", timings)
        finally:
            with contextlib.suppress(Exception):
                self._after_migration(m)
            self.tasks.pop(mid, None)
            self._task_vms.pop(mid, None)
            timings["total_s"] = round(time.monotonic() - t0, 4)
            with contextlib.suppress(Exception):
                cur = self.journal.get(mid)
                if cur is not None:
                    self.journal.move(mid, cur["phase"], timings=timings, result={"host_cpu": meter.read()})

    async def _steps(self, m: dict[str, Any], timings: dict[str, float], meter: CpuMeter) -> None:
        mid, vm, dest, ct, p = m["id"], m["vm"], m["dest"], m["ct"], m["params"]
        self.journal.move(mid, "check")
        chk = await self.agent(vm, "migration.check", {"name": ct})
        self.journal.move(
            mid, "check", result={"check": {k: chk[k] for k in ("init_pid", "files", "memory_current")}}
        )
        if m["path"] == "relay" and p.get("channel") == "shm":
            t, c0 = time.monotonic(), meter.read()
            await self._regions(m)  # before any transfer: never inside the freeze
            timings["regions_s"] = round(time.monotonic() - t, 4)
            c1 = meter.read()  # what getting them cost the host (both QEMUs + the daemon)
            cpu = sum(max(0.0, (c1.get(k) or 0.0) - (c0.get(k) or 0.0))
                      for k in ("source_qemu_cpu_s", "dest_qemu_cpu_s", "daemon_cpu_s"))  # fmt: skip
            self.journal.move(mid, "check", result={"shm_cpu_s": round(cpu, 4)})
        # The destination warms CRIU up while the source pre-copies (a cold first restore
        # costs seconds inside the freeze under TCG); best effort, an older agent has no op.
        prep: asyncio.Task[Any] | None = None
        if self.ctx.agents.supports(dest, "migration.prepare"):
            prep = asyncio.get_running_loop().create_task(
                self.agent(dest, "migration.prepare", {"mid": mid}, timeout=120)
            )
        moved = 0
        last = 0
        sizes: list[int] = []
        stop = "max-predumps"
        for n in range(1, int(p["predumps"]) + 1):
            self.journal.move(mid, "predump")
            t = time.monotonic()
            r = await self.agent(vm, "migration.predump", {"mid": mid, "name": ct, "n": n}, timeout=LONG)
            timings[f"predump{n}_s"] = round(time.monotonic() - t, 4)
            sizes.append(int(r["bytes"]))
            self.journal.move(mid, "transfer", timings=timings,
                              progress={f"predump{n}_bytes": r["bytes"], "predump_bytes": sizes})  # fmt: skip
            t = time.monotonic()
            moved += await self._transfer(m, [f"img/{n}"])
            timings[f"transfer{n}_s"] = round(time.monotonic() - t, 4)
            last = n
            why = converged(sizes, int(p.get("converge") or 0))
            if why:
                stop = why
                break
        if not sizes:
            stop = "stop-and-copy"
        if prep is not None:
            t = time.monotonic()
            try:
                timings["prepare_s"] = float((await prep).get("seconds") or 0.0)
            except DaemonError as exc:
                log.info("migration %s: prepare on %s failed (restore cold): %s", mid, dest, exc)
            timings["prepare_wait_s"] = round(time.monotonic() - t, 4)
        self.journal.move(mid, "dump", timings=timings, progress={"predumps": last, "precopy_stop": stop})
        steps: dict[str, float] = {}  # the final phase, step by step (what the freeze is made of)
        if p.get("ip"):  # the container's address leaves with it: the source fences it off now
            t = time.monotonic()
            await self.agent(vm, "migration.addr", {"ip": p["ip"], "up": False, "fenced": True})
            steps["fence_s"] = time.monotonic() - t
        frozen = time.monotonic()
        r = await self.agent(vm, "migration.dump", {"mid": mid, "name": ct, "parent": last}, timeout=LONG)
        timings["dump_s"] = round(time.monotonic() - frozen, 4)
        steps["dump_s"] = timings["dump_s"]
        steps["dump_criu_s"] = float(r.get("criu_seconds") or 0.0)
        steps["dump_agent_s"] = float(r.get("seconds") or 0.0)
        self.journal.move(
            mid,
            "transfer",
            timings=timings,
            progress={"dump_bytes": r["bytes"], "files": r["files"], "frozen_at": r.get("frozen_at")},
        )
        t = time.monotonic()
        final = await self._transfer(m, ["img/final", "files.tar"], steps, manifest=r.get("manifest"))
        moved += final
        timings["transfer_final_s"] = round(time.monotonic() - t, 4)
        self.journal.move(mid, "restore", timings=timings, progress={"bytes_total": moved, "final_bytes": final})
        t = time.monotonic()
        if p.get("ip"):  # up (and announced) before CRIU rebinds the connections to it; fenced till then
            await self.agent(dest, "migration.addr", {"ip": p["ip"], "up": True, "fenced": True})
            steps["addr_up_s"] = time.monotonic() - t
        t1 = time.monotonic()
        rargs: dict[str, Any] = {"mid": mid, "record": chk["record"]}
        if p.get("lazy"):
            rargs["lazy"] = True
        res = await self.agent(dest, "migration.restore", rargs, timeout=LONG)
        steps["restore_s"] = time.monotonic() - t1
        steps["restore_criu_s"] = float(res.get("criu_seconds") or 0.0)
        steps["restore_agent_s"] = float(res.get("seconds") or 0.0)
        if p.get("ip"):
            t1 = time.monotonic()
            await self.agent(dest, "migration.addr", {"ip": p["ip"], "up": True, "fenced": False})
            steps["addr_open_s"] = time.monotonic() - t1
        timings["restore_s"] = round(time.monotonic() - t, 4)
        t1 = time.monotonic()
        st = await self.agent(dest, "migration.status", {"mid": mid, "name": ct})
        steps["status_s"] = time.monotonic() - t1
        cont = st.get("container") or {}
        if not (st.get("restored") and cont.get("populated") and not cont.get("frozen")):
            raise MigrationFailed(f"{dest}: the restored container is not running ({st})")
        timings["downtime_s"] = round(time.monotonic() - frozen, 4)
        self.journal.move(mid, "restore", result={"freeze_steps": {k: round(v, 4) for k, v in steps.items()}})
        self.journal.move(mid, "confirm", timings=timings, result={"restore": res, "bytes": moved})
        self.ctx.decisions.log(
            "confirm", dest, {"id": mid, "ct": ct}, {"pid": res.get("pid")}
        )
        self.journal.move(mid, "cleanup")
        fin = await self._finish(m)
        if fin.get("lazy_wait_s") is not None:  # the lazy restore's background fill, after the freeze
            timings["lazy_fill_wait_s"] = fin["lazy_wait_s"]
        self.journal.move(mid, "done", timings=timings, result={"host_cpu": meter.read(),
                                                               "transfer_cpu": m.get("_xfer_cpu")})  # fmt: skip

    async def _transfer(self, m: dict[str, Any], paths: list[str], steps: dict[str, float] | None = None,
                        manifest: Any = None) -> int:  # fmt: skip
        """Move the files under ``paths`` to the destination; verify them there; return bytes.

        ``steps`` (the final phase) receives the time of each step: manifest, send, verify;
        ``manifest`` is the source's list of the files when it came with the dump."""
        mid, vm, dest = m["id"], m["vm"], m["dest"]
        steps = {} if steps is None else steps
        t = time.monotonic()
        if manifest is None:
            manifest = (await self.agent(vm, "migration.manifest", {"mid": mid, "paths": paths}, timeout=LONG)).get("files")
        steps["manifest_s"] = time.monotonic() - t
        try:
            files = rate.validate_manifest(manifest, MAX_TOTAL)
        except rate.StreamError as exc:
            raise MigrationFailed(f"{vm}: bad manifest: {exc}") from None
        order = sorted(files)
        t = time.monotonic()
        meter: CpuMeter | None = m.get("_meter")
        cpu0 = meter.read() if meter else {}
        if m["path"] == "network":
            await self._network(m, files, order)
        else:
            await self._relay(m, files, order)
        steps["send_s"] = time.monotonic() - t
        if meter:  # host CPU of the data movement alone (Portkey's comparison), without CRIU's
            self._count_transfer_cpu(m, cpu0, meter.read(), sum(int(e["size"]) for e in files.values()),
                                     steps["send_s"])  # fmt: skip
        t = time.monotonic()
        await self.agent(dest, "migration.verify", {"mid": mid, "files": list(files.values())}, timeout=LONG)
        steps["verify_s"] = time.monotonic() - t
        total = sum(int(e["size"]) for e in files.values())
        self.journal.progress(mid, moved=(m.get("_moved", 0) + total))
        m["_moved"] = m.get("_moved", 0) + total
        return total

    @staticmethod
    def _count_transfer_cpu(m: dict[str, Any], before: dict[str, Any], after: dict[str, Any], nbytes: int,
                            secs: float) -> None:  # fmt: skip
        """Add one transfer's host CPU (both QEMUs + the daemon) to the migration's total."""
        acc = m.setdefault("_xfer_cpu", {"bytes": 0, "seconds": 0.0})
        acc["bytes"] += nbytes
        acc["seconds"] = round(acc["seconds"] + secs, 4)
        total = 0.0
        for k in ("source_qemu", "dest_qemu", "daemon"):
            a, b = after.get(f"{k}_cpu_s"), before.get(f"{k}_cpu_s")
            d = 0.0 if a is None or b is None else max(0.0, a - b)
            acc[f"{k}_cpu_s"] = round(acc.get(f"{k}_cpu_s", 0.0) + d, 4)
            total += d
        acc["cpu_s"] = round(acc.get("cpu_s", 0.0) + total, 4)
        acc["cpu_s_per_mib"] = round(acc["cpu_s"] / max(acc["bytes"] / (1 << 20), 1e-9), 4)

    async def _relay(
        self, m: dict[str, Any], files: dict[str, dict[str, Any]], order: list[str]
    ) -> dict[str, Any]:
        p = m["params"]
        regions = m.get("_shm")
        relay = Relay(self, m, files, int(p["window"]), int(p["chunk"]), float(p["rate_bps"]), p.get("fault"),
                      regions=regions)  # fmt: skip
        try:
            unsubscribe = self.ctx.agents.stream(m["vm"], CHUNK_EVENT, relay.on_chunk)
        except BaseException:
            await relay.close()
            raise
        try:
            try:
                sent = await self.agent(m["vm"], "migration.send", {
                    "mid": m["id"], "paths": order, "mode": m["rate"], "chunk": int(p["chunk"]),
                    "window": int(p["window"]), "rate": float(p["rate_bps"]), "bw": float(p["rate_bps"]),
                    **({"shm": regions[0].desc()} if regions else {}),
                }, timeout=LONG)  # fmt: skip
            except DaemonError as exc:
                if relay.error:  # the sender stopped because the relay refused the stream
                    raise MigrationFailed(f"relay: {relay.error}") from None
                raise MigrationFailed(f"sender: {exc}") from None
            finally:
                unsubscribe()
            async with asyncio.timeout(120):  # not wait_for: it can swallow a cancellation (3.11)
                await relay.queue.join()
            if relay.error:
                raise MigrationFailed(f"relay: {relay.error}")
            stats = {"channel": "shm" if regions else "serial", "relay_bytes": relay.received,
                     "relay_chunks": relay.chunks, "foreign_chunks": relay.foreign, "credits": relay.credits,
                     "credits_coalesced": relay.credits_coalesced, "sender": sent,
                     "relay_s": round(time.monotonic() - relay.started, 4)}  # fmt: skip
            prev = (self.journal.get(m["id"]) or {}).get("result", {}).get("relay", [])
            self.journal.move(m["id"], "transfer", result={"relay": [*prev, stats]})
            return stats
        finally:
            await relay.close()

    async def _network(self, m: dict[str, Any], files: dict[str, dict[str, Any]], order: list[str]) -> None:
        vm, dest = m["vm"], m["dest"]
        peer = m.get("_peer")
        if peer is None:  # once per migration (ip(8) twice in each guest): not again inside the freeze
            await self.agent(vm, "migration.net-setup", {})
            peer = m["_peer"] = await self.agent(dest, "migration.net-setup", {})
        recv = asyncio.get_running_loop().create_task(
            self.agent(
                dest, "migration.net-recv", {"mid": m["id"], "files": [files[k] for k in order]}, timeout=LONG
            )
        )
        try:
            await asyncio.sleep(0.1)  # the receiver listens; the sender retries its connect anyway
            sent = await self.agent(vm, "migration.net-send", {"mid": m["id"], "paths": order, "host": peer["ip"]},
                                    timeout=LONG)  # fmt: skip
            async with asyncio.timeout(LONG):  # not wait_for: it can swallow a cancellation (3.11)
                got = await asyncio.shield(recv)
        finally:
            if not recv.done():
                recv.cancel()
        prev = (self.journal.get(m["id"]) or {}).get("result", {}).get("network", [])
        self.journal.move(m["id"], "transfer", result={"network": [*prev, {"sender": sent, "receiver": got}]})

    # -- the shm channel's regions -------------------------------------------------------------------
    # One region per VM, plugged in at the VM's first shm migration and kept for the VM's life
    # (plugging in and out cost both guests an ACPI hot-plug under TCG, 0.1-0.3 s each way, at
    # every migration): unplugged when the VM is unregistered or gone, when a migration needs a
    # bigger one, when the daemon stops, and by the sweep for rows no running daemon holds.
    async def _regions(self, m: dict[str, Any]) -> tuple[Region, Region] | None:
        """The source's and the destination's regions (each VM's own, never shared), plugged in
        if they are not yet; None (the serial frames are used) when either cannot be had: an
        agent without ``migration.shm``, libvirt refusing the device, the guest not seeing it."""
        if "_shm" in m:
            return m["_shm"]  # type: ignore[no-any-return]
        mid, p = m["id"], m["params"]
        size = rate.shm_size(int(p["window"]), int(p["chunk"]))
        got: list[Region] = []
        plugged: list[str] = []
        try:
            for vm in (m["vm"], m["dest"]):
                if not self.ctx.agents.supports(vm, "migration.shm"):
                    raise MigrationFailed(f"{vm}: its agent has no migration.shm (an older agent)")
                r = self.vm_regions.get(vm)
                if r is not None and r.size < size:  # a bigger window than before: a bigger region
                    await self._unplug(vm)
                    r = None
                if r is None:
                    r = await self._plug(vm, mid, size)
                    plugged.append(vm)
                got.append(r)
                await self.agent(vm, "migration.shm", {"mid": mid, "shm": r.desc(), "wait": 20.0}, timeout=60)
        except (HostError, DaemonError, MigrationFailed, jn.JournalError, OSError) as exc:
            log.warning("migration %s: no shm channel, serial frames instead: %s", mid, exc)
            for vm in (m["vm"], m["dest"]):  # whatever state they are in: out, the next one starts clean
                await self._unplug(vm)
            m["_shm"] = None
            self.ctx.decisions.log("shm-fallback", m["vm"], {"id": mid}, {"why": str(exc)})
            self.journal.move(mid, self.journal.get(mid)["phase"],  # type: ignore[index]
                              result={"channel": "serial", "shm_fallback": str(exc)})  # fmt: skip
            return None
        m["_shm"] = (got[0], got[1])
        self.journal.move(mid, self.journal.get(mid)["phase"],  # type: ignore[index]
                          result={"channel": "shm", "shm": {"bytes": size, "plugged": plugged,
                                                            "regions": [r.name for r in got]}})  # fmt: skip
        return m["_shm"]  # type: ignore[no-any-return]

    async def _plug(self, vm: str, mid: str, size: int) -> Region:
        name = f"{REGION_PREFIX}{secrets.token_hex(8)}"
        self.journal.add_region(name, mid, vm, size)  # first: a daemon killed from here on finds it
        dev = await asyncio.to_thread(self.ctx.host.attach_shmem, vm, name, size)
        try:
            mm = await asyncio.to_thread(self.ctx.host.open_shmem, name, size)
        finally:
            # mapped by QEMU (and by us): the name is no longer needed, nothing is left under
            # /dev/shm whatever happens to this daemon
            await asyncio.to_thread(self.ctx.host.remove_shmem, name)
        r = self.vm_regions[vm] = Region(name, vm, size, dev, secrets.token_hex(rate.SHM_TOKEN), mm)
        return r

    def _after_migration(self, m: dict[str, Any]) -> None:
        """The regions stay plugged; their pages go back to the host (the guests' agents let go
        of their mappings at mig-finish/cleanup/abort)."""
        for r in m.pop("_shm", None) or ():
            r.scrub()

    async def _unplug(self, vm: str, name: str | None = None) -> bool:
        """Take a region out of ``vm`` (its own, or the one called ``name`` from the journal):
        the guest lets go, the device is unplugged, the row dropped; a failed unplug keeps the
        row, and the sweep tries again later. True when it is gone."""
        r = self.vm_regions.get(vm)
        if r is not None and name in (None, r.name):
            del self.vm_regions[vm]
            r.close()
            name = r.name
        if name is None:
            return True
        if self.ctx.agents.supports(vm, "migration.shm"):
            with contextlib.suppress(DaemonError):
                await self.agent(vm, "migration.shm", {"mid": "unplug", "release": True}, timeout=15)
        try:
            await asyncio.to_thread(self.ctx.host.detach_shmem, vm, name)
        except HostError as exc:
            log.warning("unplugging the region %s from %s failed: %s", name, vm, exc)
            self.retry_at[name] = time.monotonic() + REGION_RETRY_S
            return False
        finally:
            await asyncio.to_thread(self.ctx.host.remove_shmem, name)  # gone already unless a crash came first
        self.journal.drop_region(name)
        self.retry_at.pop(name, None)
        return True

    def orphan_regions(self) -> list[dict[str, Any]]:
        """Regions to take out now: in the journal but not held by this daemon (one killed
        before), or held for a VM no longer registered."""
        now = time.monotonic()
        held = {r.name for r in self.vm_regions.values()}
        out = []
        for row in self.journal.regions():
            if self.retry_at.get(row["name"], 0.0) > now:
                continue
            if row["name"] not in held:
                out.append(row)
                continue
            try:
                self.ctx.vm(row["vm"])
            except NotFound:
                out.append(row)
        return out

    async def sweep_regions(self) -> int:
        """Unplug the orphans (never one a running migration uses); returns how many."""
        busy = {vm for t in self.tasks for vm in self._task_vms.get(t, ())}
        rows = [r for r in self.orphan_regions() if r["vm"] not in busy]
        for row in rows:
            await self._unplug(row["vm"], row["name"])
        return len(rows)

    async def unplug_all(self) -> None:
        """Daemon stop: no region stays behind."""
        for row in self.journal.regions():
            with contextlib.suppress(HostError, OSError):
                await self._unplug(row["vm"], row["name"])

    # -- failure, finish, recovery ----------------------------------------------------------------
    async def _abort(self, m: dict[str, Any], why: str, timings: dict[str, float] | None = None) -> bool:
        """Destination cleared, source thawed; journal ``aborted`` once both are done.

        Never after ``confirm``: the destination's copy is the container then, and what is
        left to do (remove the source's copy) is the recovery's ``finish``."""
        ok = True
        cur = self.journal.get(m["id"])
        if cur is not None and jn.authoritative(cur["phase"]) == "destination":
            log.warning("migration %s: %s after confirm; the recovery finishes it", m["id"], why)
            return False
        # Only once a restore was asked for can a copy run on the destination: then it must be
        # removed before the source may run on; before that the destination holds only files.
        dest_required = cur is not None and cur["phase"] == "restore"
        ip = (m.get("params") or {}).get("ip")
        steps: list[tuple[str, str, dict[str, Any]]] = [(m["dest"], "migration.abort", {"mid": m["id"], "name": m["ct"]})]
        if ip:  # the address goes back to the source before it thaws (best effort: see below)
            steps += [(m["dest"], "migration.addr", {"ip": ip, "up": False, "fenced": True}),
                      (m["vm"], "migration.addr", {"ip": ip, "up": True, "fenced": False})]  # fmt: skip
        steps += [(m["vm"], "migration.resume", {"name": m["ct"], "mid": m["id"]}), (m["vm"], "migration.cleanup", {"mid": m["id"]})]
        for vm, op, args in steps:
            try:
                await self.agent(vm, op, args, timeout=60)
            except NotFound:
                pass  # the container or migration is not there: nothing to undo
            except DaemonError as exc:
                log.warning("migration %s: %s on %s failed: %s", m["id"], op, vm, exc)
                if op == "migration.addr":
                    continue  # the address is the client's problem, never a reason to keep the source frozen
                if vm == m["vm"] or dest_required:
                    ok = False
                if vm == m["dest"] and dest_required:
                    break  # a restored copy may run there: the source must stay frozen
        if ok:
            cur = self.journal.get(m["id"])
            if cur is not None and cur["phase"] in jn.ACTIVE:
                self.journal.move(m["id"], "aborted", error=why, timings=timings or {})
            self.ctx.decisions.log("abort", m["vm"], {"id": m["id"], "why": why}, {})
        return ok

    async def _finish(self, m: dict[str, Any]) -> dict[str, Any]:
        """The source's frozen copy goes; then the destination's images (after a lazy restore
        the destination keeps them until every page is back). The destination's answer."""
        await self.agent(m["vm"], "migration.finish", {"mid": m["id"], "name": m["ct"]}, timeout=60)
        with contextlib.suppress(DaemonError):
            return await self.agent(m["dest"], "migration.cleanup", {"mid": m["id"]}, timeout=60)
        return {}

    async def _view(self, vm: str, m: dict[str, Any]) -> jn.GuestView:
        try:
            st = await self.agent(vm, "migration.status", {"mid": m["id"], "name": m["ct"]}, timeout=15)
        except DaemonError:
            return jn.GuestView(reachable=False)
        c = st.get("container") or {}
        return jn.GuestView(True, bool(c.get("populated")), bool(st.get("restored")))

    async def recover(self) -> list[dict[str, Any]]:
        """Resolve unfinished journal entries (not those this daemon is running now); release
        the regions of migrations no longer running."""
        out = []
        with contextlib.suppress(HostError, OSError):
            await self.sweep_regions()
        for m in self.journal.unfinished():
            if m["id"] in self.tasks or m["id"] in self.recovering:
                continue
            self.recovering.add(m["id"])
            try:
                src, dst = await self._view(m["vm"], m), await self._view(m["dest"], m)
                action = jn.recovery_action(m["phase"], src, dst)
                if action == "keep-destination" and m["phase"] != "restore":
                    action = "abort"
                if action == "abort":
                    done = await self._abort(m, f"recovered after a crash in phase {m['phase']}")
                elif action == "keep-destination":
                    self.journal.move(m["id"], "confirm")
                    self.journal.move(m["id"], "cleanup")
                    action = "finish"
                    done = True
                if action == "finish":
                    try:
                        await self._finish(m)
                        if self.journal.get(m["id"])["phase"] == "confirm":  # type: ignore[index]
                            self.journal.move(m["id"], "cleanup")
                        self.journal.move(m["id"], "done")
                        done = True
                    except DaemonError as exc:
                        log.warning("migration %s: finishing failed: %s", m["id"], exc)
                        done = False
                if action == "wait":
                    done = False
                if action != "wait":
                    self.ctx.decisions.log(
                    "recover", m["vm"],
                    {"id": m["id"], "phase": m["phase"], "source": src.__dict__, "dest": dst.__dict__},
                    {"action": action, "settled": done},
                )  # fmt: skip
                out.append({"id": m["id"], "phase": m["phase"], "action": action, "settled": done})
            finally:
                self.recovering.discard(m["id"])
        return out

    async def stop(self) -> None:
        for t in list(self.tasks.values()):
            t.cancel()
        for t in list(self.tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.unplug_all()

