"""A discrete-event GPU simulator: the backend used when no GPU is present.

It is a model, not a stub: what a scheduler sees (completion times under contention, the cost
of a transfer, how fast a share change takes effect) follows from the mechanisms below, so the
policies in :mod:`.endpoint`, :mod:`.faas` and :mod:`.dispatch` can be studied and tested on a
machine without a GPU, reproducibly.

MODEL
-----
* **SMs and blocks.** A device has ``sm_count`` SMs. A kernel is ``blocks`` thread blocks; one
  block occupies one SM for ``block_time = max(flops_per_block / sm_flops,
  dram_bytes_per_block / (mem_bw / sm_count))`` (a per-SM roofline), times a seeded jitter
  factor ``1 + U(-jitter, +jitter)`` per wave. Co-resident blocks on one SM share its issue
  slots, so "one block at a time per SM at full SM throughput" gives the same aggregate
  progress; the model therefore keeps one block per SM. SMs granted to a kernel at one instant
  form a *group* that runs *waves* of blocks in lock step; the last wave may be partial (the
  tail effect that makes slice sizes in whole waves efficient).
* **No preemption inside a block.** SMs change hands only at wave ends. This is what makes a
  share change take effect "within one block time", and what kernel slicing works around.
* **Streams.** Each context is one in-order stream; a kernel becomes dispatchable the
  calibration's ``launch_s`` after it was submitted (or when its predecessor ends, if later),
  and ``wait`` returns ``poll_s`` after the awaited completion (the host polls). A block runs
  at the calibration's ``flops_efficiency`` of the spec-sheet SM throughput.
* **Share changes** apply at the next wave end (``share_change="wave"``) or, as on the CuPy
  backend, only to kernels submitted after the change (``"kernel"``: queued work drains at
  the old share).
* **Contention between contexts** on a device, by the device's ``sched`` mode:

  - ``spatial`` (MPS-like, work conserving): context *i* is guaranteed ``cap_i = max(1,
    floor(share_i * sm_count))`` SMs; SMs nobody is using are lent to busy contexts and are
    given back at the borrower's next wave end as soon as a context below its guarantee has
    work. A critical client therefore keeps its share, up to one block time of delay.
  - ``spatial-strict`` (MIG-like partition): never more than ``cap_i`` SMs, idle SMs stay idle.
  - ``timeslice-best-effort`` / ``timeslice-equal`` / ``timeslice-fixed`` (NVIDIA vGPU time
    slicing): one context owns all SMs for a quantum; switches happen at the first wave end
    after the quantum expires (block-granularity preemption) and cost ``switch_s`` of idle
    GPU. Best-effort skips contexts without work; equal-share rotates over every context,
    idle or not (idle slices are wasted GPU time); fixed-share gives context *i* a quantum of
    ``quantum_s * n * share_i / sum(shares)``. Shares only matter in fixed-share mode.
* **Transfers.** One copy engine per direction per device, FIFO: a memcpy costs
  ``pcie_latency_s + nbytes / pcie_bw``; H2D and D2H overlap with each other and with
  kernels. Device-to-device: on one device ``5 us + 2 * nbytes / mem_bw``; between devices of
  one server peer-to-peer over PCIe (the slower link, both engines held); between servers
  staged through host memory and the network (pipelined: the bottleneck bandwidth of
  PCIe-network-PCIe plus all three latencies).
* **Memory.** Buffers and kernel footprints are accounted against ``mem_bytes``; exceeding it
  raises :class:`GpuOutOfMemory`. Buffer contents are kept (as bytes) only when a client
  wrote real data, so multi-GiB "virtual" buffers cost nothing.
* **Determinism.** Events are ordered by (time, sequence number); jitter comes from
  ``random.Random(seed)``. Same seed and same calls give bit-identical timings.

CALIBRATION
-----------
Constants of the presets in :data:`GPU_TYPES`, from NVIDIA's public spec sheets:

=========  ====  ==========  ==========  =======  ========  ==========================
type       SMs   FP32/SM     boost GHz   memory   mem BW    host link (raw / assumed)
=========  ====  ==========  ==========  =======  ========  ==========================
A100       108   64          1.410       40 GiB   1555 GB/s PCIe 4.0 x16 31.5 / 25 GB/s
V100        80   64          1.530       16 GiB    900 GB/s PCIe 3.0 x16 15.75 / 12 GB/s
T4          40   64          1.590       16 GiB    320 GB/s PCIe 3.0 x16 15.75 / 12 GB/s
H100       132   128         1.980       80 GiB   3350 GB/s PCIe 5.0 x16 63 / 50 GB/s
=========  ====  ==========  ==========  =======  ========  ==========================

Peak FP32 = SMs x FP32/SM x 2 x clock: 19.5, 15.7, 8.1 and 66.9 TFLOPS, matching the sheets.
Sources: "NVIDIA A100 Tensor Core GPU Architecture" whitepaper (2020, A100-SXM4-40GB); "NVIDIA
Tesla V100 GPU Architecture" whitepaper (2017, V100-SXM2-16GB); "NVIDIA Turing GPU
Architecture" whitepaper (2018) and the T4 datasheet; "NVIDIA H100 Tensor Core GPU
Architecture" whitepaper (2022, H100-SXM5-80GB). Raw PCIe bandwidth per direction from the
PCIe 3.0/4.0/5.0 signalling rates (8/16/32 GT/s per lane, 128b/130b coding); the *effective*
figure (about 80 % of raw, typical of pinned ``cudaMemcpy`` measurements) is an assumption.

Host and per-operation costs (launch, polling, achieved FLOP fraction, share-change rule,
device-local copies) come from a :class:`~.calibration.Calibration`; the default is the fit
to the H100 run recorded in BENCHMARKS.md, with each constant's source in
:mod:`.calibration`; ``calibration="spec-assumed"`` restores the original assumptions.
Still assumed, not measured: memcpy latency 10 us, time-slice quantum 2 ms, context switch
25 us, inter-server network 3 GB/s (25 GbE) with 50 us latency, jitter 2 % per wave.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from symbiont.gpu.backend import (
    DeviceInfo,
    GpuBackend,
    GpuBusy,
    GpuError,
    GpuOutOfMemory,
    GpuType,
    KernelSpec,
    OpTiming,
    UnknownHandle,
    check_share,
)
from symbiont.gpu.calibration import Calibration, get_calibration

GiB = 2**30

_PCIE_LAT = 10e-6
_LAUNCH = 5e-6

GPU_TYPES: dict[str, GpuType] = {
    "A100": GpuType(
        name="A100",
        sm_count=108,
        clock_ghz=1.410,
        fp32_lanes_per_sm=64,
        mem_bytes=40 * GiB,
        mem_bw=1555e9,
        pcie_bw=25e9,
        pcie_latency_s=_PCIE_LAT,
        launch_overhead_s=_LAUNCH,
        source="NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), A100-SXM4-40GB; PCIe 4.0 x16",
    ),
    "V100": GpuType(
        name="V100",
        sm_count=80,
        clock_ghz=1.530,
        fp32_lanes_per_sm=64,
        mem_bytes=16 * GiB,
        mem_bw=900e9,
        pcie_bw=12e9,
        pcie_latency_s=_PCIE_LAT,
        launch_overhead_s=_LAUNCH,
        source="NVIDIA Tesla V100 GPU Architecture whitepaper (2017), V100-SXM2-16GB; PCIe 3.0 x16",
    ),
    "T4": GpuType(
        name="T4",
        sm_count=40,
        clock_ghz=1.590,
        fp32_lanes_per_sm=64,
        mem_bytes=16 * GiB,
        mem_bw=320e9,
        pcie_bw=12e9,
        pcie_latency_s=_PCIE_LAT,
        launch_overhead_s=_LAUNCH,
        source="NVIDIA Turing GPU Architecture whitepaper (2018) and T4 datasheet; PCIe 3.0 x16",
    ),
    "H100": GpuType(
        name="H100",
        sm_count=132,
        clock_ghz=1.980,
        fp32_lanes_per_sm=128,
        mem_bytes=80 * GiB,
        mem_bw=3350e9,
        pcie_bw=50e9,
        pcie_latency_s=_PCIE_LAT,
        launch_overhead_s=_LAUNCH,
        source="NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), H100-SXM5-80GB; PCIe 5.0 x16",
    ),
}

SCHED_MODES = ("spatial", "spatial-strict", "timeslice-best-effort", "timeslice-equal", "timeslice-fixed")

NET_BW = 3.0e9  # inter-server link, bytes/s (assumed 25 GbE)
NET_LATENCY = 50e-6


def gpu_type(name: str | GpuType) -> GpuType:
    """Look a preset up by name (case-insensitive)."""
    if isinstance(name, GpuType):
        return name
    for key, t in GPU_TYPES.items():
        if key.lower() == str(name).strip().lower():
            return t
    raise GpuError(f"unknown GPU type {name!r}; known: {', '.join(GPU_TYPES)}")


@dataclass(frozen=True)
class DeviceConfig:
    """A simulated device: its type, the server it sits in and how it shares SMs."""

    gpu_type: str | GpuType = "A100"
    server: str = "server0"
    sched: str = "spatial"
    quantum_s: float = 2e-3
    switch_s: float = 25e-6

    def __post_init__(self) -> None:
        if self.sched not in SCHED_MODES:
            raise GpuError(f"unknown sched mode {self.sched!r}; known: {', '.join(SCHED_MODES)}")
        if self.quantum_s <= 0 or self.switch_s < 0:
            raise GpuError("quantum_s must be > 0 and switch_s >= 0")


# event kinds
_READY, _WAVE_END, _XFER_END, _DISPATCH, _EXPIRE, _SWITCH_DONE = range(6)
_KERNEL, _H2D, _D2H, _D2D = "kernel", "h2d", "d2h", "d2d"


class _Buf:
    __slots__ = ("id", "ctx", "dev", "nbytes", "data")

    def __init__(self, bid: int, ctx: _Ctx, nbytes: int) -> None:
        self.id = bid
        self.ctx = ctx
        self.dev = ctx.dev
        self.nbytes = nbytes
        self.data: bytearray | None = None


class _Op:
    __slots__ = (
        "id", "kind", "ctx", "submit", "start", "end", "done", "kernel", "block_time", "unstarted",
        "finished", "running", "ready", "share_cap", "share_fixed", "nbytes", "payload", "src", "dst", "result",
    )  # fmt: skip

    def __init__(self, oid: int, kind: str, ctx: _Ctx, submit: float) -> None:
        self.id = oid
        self.kind = kind
        self.ctx = ctx
        self.submit = submit
        self.start = math.nan
        self.end = math.nan
        self.done = False
        self.kernel: KernelSpec | None = None
        self.block_time = 0.0
        self.unstarted = 0
        self.finished = 0
        self.running = 0
        self.ready = False
        self.share_cap = 1.0
        self.share_fixed: float | None = None  # the share at submit, kept under "kernel" share changes
        self.nbytes = 0
        self.payload: bytes | None = None
        self.src: _Buf | None = None
        self.dst: _Buf | None = None
        self.result: bytes | None = None


class _Group:
    __slots__ = ("op", "n", "blocks", "dur")

    def __init__(self, op: _Op, n: int) -> None:
        self.op = op
        self.n = n
        self.blocks = 0
        self.dur = 0.0


class _Ctx:
    __slots__ = (
        "id", "dev", "share", "label", "queue", "current", "held", "bufs", "changed_at",
        "effective_at", "flops_done", "busy_sm_s", "alive", "kernels_done",
    )  # fmt: skip

    def __init__(self, cid: int, dev: _Dev, share: float, label: str) -> None:
        self.id = cid
        self.dev = dev
        self.share = share
        self.label = label
        self.queue: deque[_Op] = deque()
        self.current: _Op | None = None
        self.held = 0
        self.bufs: set[int] = set()
        self.changed_at: float | None = None
        self.effective_at: float | None = None
        self.flops_done = 0.0
        self.busy_sm_s = 0.0
        self.alive = True
        self.kernels_done = 0


class _Dev:
    __slots__ = (
        "idx", "info", "t", "sched", "quantum", "switch", "free_sms", "mem_used", "ctxs", "h2d_free",
        "d2h_free", "owner", "last_owner", "slice_end", "slice_token", "switching", "dispatch_pending",
        "busy_sm_s", "switches",
    )  # fmt: skip

    def __init__(self, idx: int, cfg: DeviceConfig) -> None:
        t = gpu_type(cfg.gpu_type)
        self.idx = idx
        self.t = t
        self.info = DeviceInfo(
            index=idx, name=f"sim-{t.name}-{idx}", gpu_type=t, server=cfg.server, backend="simulated", sched=cfg.sched
        )
        self.sched = cfg.sched
        self.quantum = cfg.quantum_s
        self.switch = cfg.switch_s
        self.free_sms = t.sm_count
        self.mem_used = 0
        self.ctxs: dict[int, _Ctx] = {}
        self.h2d_free = 0.0
        self.d2h_free = 0.0
        self.owner: _Ctx | None = None
        self.last_owner: _Ctx | None = None
        self.slice_end = 0.0
        self.slice_token = 0
        self.switching = False
        self.dispatch_pending = False
        self.busy_sm_s = 0.0
        self.switches = 0


class SimulatedBackend(GpuBackend):
    """The simulator (see the module docstring for the model and its calibration)."""

    name = "simulated"
    virtual_time = True

    def __init__(
        self,
        devices: Sequence[DeviceConfig | str | GpuType] = ("A100",),
        seed: int = 0,
        jitter: float = 0.02,
        record_timeline: bool = False,
        calibration: str | Calibration | None = None,
    ) -> None:
        if not (0.0 <= jitter < 0.5):
            raise GpuError("jitter must be in [0, 0.5)")
        #: host/device costs beyond the roofline (:mod:`.calibration`; default: the H100 fit)
        self.calibration = get_calibration(calibration)
        self._rng = random.Random(seed)
        self.seed = seed
        self.jitter = jitter
        self._now = 0.0
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._next_id = 1
        self._devs: list[_Dev] = []
        self._ctxs: dict[int, _Ctx] = {}
        self._bufs: dict[int, _Buf] = {}
        self._ops: dict[int, _Op] = {}
        self._completed: list[_Op] = []
        self.events = 0
        self.record_timeline = record_timeline
        #: (time, device, ctx, SMs held, guaranteed cap) each time a context's SM count changes
        self.timeline: list[tuple[float, int, int, int, int]] = []
        for d in devices:
            self.add_device(d)

    # -- devices ---------------------------------------------------------------------------
    def add_device(self, cfg: DeviceConfig | str | GpuType) -> int:
        """Add a device (a preset name, a :class:`GpuType` or a :class:`DeviceConfig`)."""
        if not isinstance(cfg, DeviceConfig):
            cfg = DeviceConfig(gpu_type=cfg)
        dev = _Dev(len(self._devs), cfg)
        self._devs.append(dev)
        return dev.idx

    def devices(self) -> list[DeviceInfo]:
        return [d.info for d in self._devs]

    def _dev(self, device: int) -> _Dev:
        if not isinstance(device, int) or not (0 <= device < len(self._devs)):
            raise UnknownHandle(f"unknown device {device!r}")
        return self._devs[device]

    def _new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    # -- contexts --------------------------------------------------------------------------
    def create_context(self, device: int, share: float = 1.0, label: str = "") -> int:
        d = self._dev(device)
        c = _Ctx(self._new_id(), d, check_share(share), label)
        d.ctxs[c.id] = c
        self._ctxs[c.id] = c
        return c.id

    def _ctx(self, ctx: int) -> _Ctx:
        c = self._ctxs.get(ctx)
        if c is None or not c.alive:
            raise UnknownHandle(f"unknown context {ctx!r}")
        return c

    def destroy_context(self, ctx: int) -> None:
        c = self._ctx(ctx)
        if c.current is not None or c.queue:
            raise GpuBusy(f"context {ctx} still has work in flight; synchronize first")
        for b in list(c.bufs):
            self.free(b)
        c.alive = False
        del c.dev.ctxs[c.id]
        if c.dev.owner is c:
            c.dev.owner = None
        self._request_dispatch(c.dev)

    def context_device(self, ctx: int) -> int:
        return self._ctx(ctx).dev.idx

    def share(self, ctx: int) -> float:
        return self._ctx(ctx).share

    def set_share(self, ctx: int, share: float) -> None:
        c = self._ctx(ctx)
        if self.calibration.share_change == "kernel":
            # as on the CuPy backend: kernels already submitted keep the SM range they had
            for op in ([c.current] if c.current is not None else []) + list(c.queue):
                if op.kind == _KERNEL and op.share_fixed is None:
                    op.share_fixed = c.share
        c.share = check_share(share)
        c.changed_at = self._now
        c.effective_at = None
        self._check_effective(c)
        self._request_dispatch(c.dev)

    def share_effective_at(self, ctx: int) -> float | None:
        return self._ctx(ctx).effective_at

    def held_sms(self, ctx: int) -> int:
        """SMs the context occupies right now."""
        return self._ctx(ctx).held

    def guaranteed_sms(self, ctx: int) -> int:
        c = self._ctx(ctx)
        return self._cap(c, c.share)

    # -- memory ----------------------------------------------------------------------------
    def alloc(self, ctx: int, nbytes: int) -> int:
        c = self._ctx(ctx)
        n = int(nbytes)
        if n <= 0:
            raise GpuError(f"allocation size must be > 0, got {nbytes!r}")
        d = c.dev
        if d.mem_used + n > d.t.mem_bytes:
            raise GpuOutOfMemory(
                f"device {d.idx} ({d.t.name}) has {d.t.mem_bytes - d.mem_used} bytes free, asked {n}"
            )
        d.mem_used += n
        b = _Buf(self._new_id(), c, n)
        self._bufs[b.id] = b
        c.bufs.add(b.id)
        return b.id

    def _buf(self, buf: int) -> _Buf:
        b = self._bufs.get(buf)
        if b is None:
            raise UnknownHandle(f"unknown buffer {buf!r}")
        return b

    def free(self, buf: int) -> None:
        b = self._buf(buf)
        del self._bufs[buf]
        b.ctx.bufs.discard(buf)
        b.dev.mem_used -= b.nbytes

    def buffer_size(self, buf: int) -> int:
        return self._buf(buf).nbytes

    def mem_free(self, device: int) -> int:
        d = self._dev(device)
        return d.t.mem_bytes - d.mem_used

    # -- submission ------------------------------------------------------------------------
    def _submit(self, op: _Op) -> int:
        self._ops[op.id] = op
        c = op.ctx
        c.queue.append(op)
        if c.current is None:
            self._advance_stream(c)
        return op.id

    def memcpy_h2d(self, buf: int, data: bytes | np.ndarray | None = None, nbytes: int | None = None) -> int:
        b = self._buf(buf)
        payload: bytes | None = None
        if data is not None:
            payload = np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
            n = len(payload)
        else:
            n = b.nbytes if nbytes is None else int(nbytes)
        if not (0 < n <= b.nbytes):
            raise GpuError(f"copy of {n} bytes does not fit buffer {buf} of {b.nbytes} bytes")
        op = _Op(self._new_id(), _H2D, b.ctx, self._now)
        op.nbytes, op.payload, op.dst = n, payload, b
        return self._submit(op)

    def memcpy_d2h(self, buf: int, nbytes: int | None = None) -> int:
        b = self._buf(buf)
        n = b.nbytes if nbytes is None else int(nbytes)
        if not (0 < n <= b.nbytes):
            raise GpuError(f"copy of {n} bytes does not fit buffer {buf} of {b.nbytes} bytes")
        op = _Op(self._new_id(), _D2H, b.ctx, self._now)
        op.nbytes, op.src = n, b
        return self._submit(op)

    def memcpy_d2d(self, src: int, dst: int, nbytes: int | None = None) -> int:
        s, t = self._buf(src), self._buf(dst)
        n = min(s.nbytes, t.nbytes) if nbytes is None else int(nbytes)
        if not (0 < n <= min(s.nbytes, t.nbytes)):
            raise GpuError(f"copy of {n} bytes does not fit buffers {src}->{dst}")
        op = _Op(self._new_id(), _D2D, t.ctx, self._now)
        op.nbytes, op.src, op.dst = n, s, t
        return self._submit(op)

    def launch(self, ctx: int, kernel: KernelSpec, share: float | None = None) -> int:
        c = self._ctx(ctx)
        d = c.dev
        if kernel.mem_bytes and d.mem_used + kernel.mem_bytes > d.t.mem_bytes:
            raise GpuOutOfMemory(
                f"kernel {kernel.name!r} needs {kernel.mem_bytes} bytes; device {d.idx} has "
                f"{d.t.mem_bytes - d.mem_used} free"
            )
        d.mem_used += kernel.mem_bytes
        op = _Op(self._new_id(), _KERNEL, c, self._now)
        op.kernel = kernel
        op.block_time = kernel.block_time(d.t) / self.calibration.flops_efficiency
        op.unstarted = kernel.blocks
        op.share_cap = 1.0 if share is None else check_share(share)
        return self._submit(op)

    def _op(self, op: int) -> _Op:
        o = self._ops.get(op)
        if o is None:
            raise UnknownHandle(f"unknown operation {op!r}")
        return o

    def result(self, op: int) -> np.ndarray:
        o = self._op(op)
        if o.kind != _D2H:
            raise GpuError(f"operation {op} is a {o.kind}, not a d2h copy")
        if not o.done:
            raise GpuError(f"operation {op} has not finished; wait for it first")
        if o.result is None:
            return np.zeros(o.nbytes, dtype=np.uint8)
        return np.frombuffer(o.result, dtype=np.uint8).copy()

    # -- time ------------------------------------------------------------------------------
    def done(self, op: int) -> bool:
        return self._op(op).done

    def now(self) -> float:
        return self._now

    def timing(self, op: int) -> OpTiming:
        o = self._op(op)
        return OpTiming(
            op=o.id,
            kind=o.kind,
            ctx=o.ctx.id,
            submit=o.submit,
            start=o.start,
            end=o.end,
            nbytes=o.nbytes,
            flops=o.kernel.flops if o.kernel else 0.0,
        )

    def advance_to(self, t: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            self._step()
        if t > self._now:
            self._now = t

    def wait(self, ops: Iterable[int], until: float | None = None) -> list[int]:
        want = [self._op(o).id for o in ops]
        done = [o for o in want if self._ops[o].done]
        if done or not want:
            if not want and until is not None:
                self.advance_to(until)
            return done
        wanted = set(want)
        heap = self._heap
        while True:
            if not heap:
                if until is not None:
                    self._now = max(self._now, until)
                    return []
                raise GpuError("simulator deadlock: the awaited operations can never complete")
            if until is not None and heap[0][0] > until:
                self._now = max(self._now, until)
                return []
            self._step()
            if self._completed and any(o.id in wanted for o in self._completed):
                # the host notices a completion only at its next poll
                if self.calibration.poll_s > 0:
                    self.advance_to(self._now + self.calibration.poll_s)
                return [o for o in want if self._ops[o].done]

    def synchronize(self, ctx: int | None = None) -> None:
        if ctx is None:
            targets = [c for c in self._ctxs.values() if c.alive]
        else:
            targets = [self._ctx(ctx)]
        while any(c.current is not None or c.queue for c in targets):
            if not self._heap:
                raise GpuError("simulator deadlock: work in flight but no events pending")
            self._step()

    def run_until_idle(self) -> None:
        """Process every pending event (all streams drained)."""
        self.synchronize(None)

    # -- statistics ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "now": self._now,
            "events": self.events,
            "devices": [
                {
                    "index": d.idx,
                    "type": d.t.name,
                    "busy_sm_s": d.busy_sm_s,
                    "utilization": d.busy_sm_s / (d.t.sm_count * self._now) if self._now > 0 else 0.0,
                    "mem_used": d.mem_used,
                    "switches": d.switches,
                }
                for d in self._devs
            ],
        }

    def context_stats(self, ctx: int) -> dict[str, float]:
        c = self._ctxs[ctx]
        return {"flops_done": c.flops_done, "busy_sm_s": c.busy_sm_s, "kernels_done": c.kernels_done}

    # -- engine ----------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj))

    def _step(self) -> None:
        t, _, kind, obj = heapq.heappop(self._heap)
        self._now = t
        self._completed.clear()
        self.events += 1
        if kind == _WAVE_END:
            self._wave_end(obj)
        elif kind == _DISPATCH:
            obj.dispatch_pending = False
            self._dispatch(obj)
        elif kind == _READY:
            obj.ready = True
            self._request_dispatch(obj.ctx.dev)
        elif kind == _XFER_END:
            self._xfer_end(obj)
        elif kind == _EXPIRE:
            dev, token = obj
            if token == dev.slice_token:
                self._request_dispatch(dev)
        elif kind == _SWITCH_DONE:
            dev, nxt = obj
            dev.switching = False
            if nxt.alive:
                self._begin_slice(dev, nxt)
            self._request_dispatch(dev)

    def _request_dispatch(self, d: _Dev) -> None:
        # Coalesced and deferred to the end of the current instant, so a client that resubmits
        # right after a completion (same virtual time) is seen as still having work.
        if not d.dispatch_pending:
            d.dispatch_pending = True
            self._push(self._now, _DISPATCH, d)

    def _advance_stream(self, c: _Ctx) -> None:
        if c.current is not None or not c.queue:
            return
        op = c.queue.popleft()
        c.current = op
        if op.kind == _KERNEL:
            self._push(max(op.submit + self.calibration.launch_s, self._now), _READY, op)
        else:
            self._start_transfer(op)

    def _start_transfer(self, op: _Op) -> None:
        n = op.nbytes
        now = self._now
        if op.kind == _H2D:
            d = op.dst.dev  # type: ignore[union-attr]
            start = max(now, d.h2d_free)
            end = start + d.t.pcie_latency_s + n / d.t.pcie_bw
            d.h2d_free = end
        elif op.kind == _D2H:
            d = op.src.dev  # type: ignore[union-attr]
            start = max(now, d.d2h_free)
            end = start + d.t.pcie_latency_s + n / d.t.pcie_bw
            d.d2h_free = end
        else:
            s, t = op.src.dev, op.dst.dev  # type: ignore[union-attr]
            if s is t:
                start = now
                cal = self.calibration
                end = start + cal.d2d_latency_s + 2.0 * n / (cal.d2d_bw_factor * s.t.mem_bw)
            else:
                start = max(now, s.d2h_free, t.h2d_free)
                if s.info.server == t.info.server:
                    lat = max(s.t.pcie_latency_s, t.t.pcie_latency_s)
                    bw = min(s.t.pcie_bw, t.t.pcie_bw)
                else:
                    lat = s.t.pcie_latency_s + NET_LATENCY + t.t.pcie_latency_s
                    bw = min(s.t.pcie_bw, NET_BW, t.t.pcie_bw)
                end = start + lat + n / bw
                s.d2h_free = end
                t.h2d_free = end
        op.start = start
        self._push(end, _XFER_END, op)

    def _xfer_end(self, op: _Op) -> None:
        n = op.nbytes
        if op.kind == _H2D:
            b = op.dst
            if b is not None and b.id in self._bufs:
                if op.payload is not None:
                    if b.data is None:
                        b.data = bytearray(b.nbytes)
                    b.data[:n] = op.payload
                elif b.data is not None:
                    b.data[:n] = bytes(n)
        elif op.kind == _D2H:
            b = op.src
            if b is not None and b.data is not None:
                op.result = bytes(b.data[:n])
        else:
            s, t = op.src, op.dst
            if s is not None and t is not None and t.id in self._bufs:
                if s.data is not None:
                    if t.data is None:
                        t.data = bytearray(t.nbytes)
                    t.data[:n] = s.data[:n]
                elif t.data is not None:
                    t.data[:n] = bytes(n)
        self._complete(op)

    def _complete(self, op: _Op) -> None:
        op.done = True
        op.end = self._now
        self._completed.append(op)
        c = op.ctx
        if op.kind == _KERNEL:
            c.dev.mem_used -= op.kernel.mem_bytes  # type: ignore[union-attr]
            c.kernels_done += 1
        c.current = None
        self._advance_stream(c)
        self._check_effective(c)
        self._request_dispatch(c.dev)

    # -- SM allocation -----------------------------------------------------------------------
    @staticmethod
    def _cap(c: _Ctx, share: float) -> int:
        return max(1, int(share * c.dev.t.sm_count + 1e-9))

    def _op_cap(self, c: _Ctx, op: _Op) -> int:
        share = c.share if op.share_fixed is None else op.share_fixed
        return self._cap(c, min(share, op.share_cap))

    @staticmethod
    def _runnable(c: _Ctx) -> _Op | None:
        op = c.current
        if op is not None and op.kind == _KERNEL and op.ready and op.unstarted > 0:
            return op
        return None

    def _owed(self, d: _Dev, exclude: _Ctx) -> bool:
        for c in d.ctxs.values():
            if c is exclude:
                continue
            op = self._runnable(c)
            if op is not None and c.held < self._op_cap(c, op):
                return True
        return False

    def _note_held(self, c: _Ctx) -> None:
        if self.record_timeline:
            self.timeline.append((self._now, c.dev.idx, c.id, c.held, self._cap(c, c.share)))
        if c.effective_at is None:
            self._check_effective(c)

    def _check_effective(self, c: _Ctx) -> None:
        if c.effective_at is not None or c.changed_at is None:
            return
        d = c.dev
        if any(op.share_fixed is not None for op in ([c.current] if c.current is not None else []) + list(c.queue)):
            return  # "kernel" share changes: work submitted before the change still runs at the old share
        if d.sched.startswith("timeslice"):
            # best-effort/equal ignore shares; fixed-share applies at the context's next slice
            if d.sched != "timeslice-fixed":
                c.effective_at = self._now
            return
        cap = self._cap(c, c.share)
        if c.held > cap and (d.sched == "spatial-strict" or self._owed(d, c)):
            return
        op = self._runnable(c)
        if op is not None and c.held < self._op_cap(c, op):
            return
        c.effective_at = self._now

    def _start_group(self, c: _Ctx, op: _Op, n: int) -> None:
        d = c.dev
        d.free_sms -= n
        c.held += n
        self._start_wave(_Group(op, n))
        self._note_held(c)

    def _release(self, c: _Ctx, n: int) -> None:
        c.dev.free_sms += n
        c.held -= n
        self._note_held(c)

    def _start_wave(self, g: _Group) -> None:
        op = g.op
        b = min(g.n, op.unstarted)
        if b < g.n:
            extra = g.n - b
            g.n = b
            self._release(op.ctx, extra)
        if math.isnan(op.start):
            op.start = self._now
        op.unstarted -= b
        op.running += 1
        j = self.jitter
        dur = op.block_time * (1.0 + self._rng.uniform(-j, j)) if j else op.block_time
        g.blocks, g.dur = b, dur
        self._push(self._now + dur, _WAVE_END, g)

    def _wave_end(self, g: _Group) -> None:
        op = g.op
        c = op.ctx
        d = c.dev
        kernel = op.kernel
        busy = g.blocks * g.dur
        c.flops_done += g.blocks * kernel.flops_per_block  # type: ignore[union-attr]
        c.busy_sm_s += busy
        d.busy_sm_s += busy
        op.finished += g.blocks
        op.running -= 1
        keep = g.n
        if op.unstarted == 0 or not c.alive:
            keep = 0
        elif d.sched.startswith("spatial"):
            excess = c.held - self._op_cap(c, op)
            if excess > 0 and (d.sched == "spatial-strict" or self._owed(d, c)):
                keep = max(0, g.n - excess)
        else:
            if d.owner is not c or (self._now >= d.slice_end and self._ts_should_switch(d)):
                keep = 0
        if keep < g.n:
            self._release(c, g.n - keep)
            g.n = keep
        if keep:
            self._start_wave(g)
        if op.finished == kernel.blocks:  # type: ignore[union-attr]
            self._complete(op)
        else:
            self._request_dispatch(d)

    def _dispatch(self, d: _Dev) -> None:
        if d.sched.startswith("spatial"):
            self._dispatch_spatial(d)
        else:
            self._dispatch_timeslice(d)

    def _dispatch_spatial(self, d: _Dev) -> None:
        if d.free_sms <= 0:
            return
        ready = [c for c in d.ctxs.values() if self._runnable(c) is not None]
        if not ready:
            return
        # guarantees first, the most starved context first
        ready.sort(key=lambda c: (c.held / self._op_cap(c, c.current), c.id))  # type: ignore[arg-type]
        for c in ready:
            op = c.current
            want = min(self._op_cap(c, op) - c.held, op.unstarted)  # type: ignore[arg-type,union-attr]
            if want > 0:
                self._start_group(c, op, min(want, d.free_sms))  # type: ignore[arg-type]
            if d.free_sms == 0:
                return
        if d.sched != "spatial":
            return
        # work conserving: lend idle SMs evenly to whoever can use them, except the guaranteed
        # room of contexts between two kernels (launching, or draining a kernel's last wave):
        # lending that for a few microseconds only fragments SM groups
        reserved = 0
        for c in d.ctxs.values():
            op = c.current
            if op is not None and op.kind == _KERNEL and self._runnable(c) is None:
                reserved += max(0, self._op_cap(c, op) - c.held)
        lendable = d.free_sms - reserved
        while lendable > 0:
            cands = [c for c in ready if self._runnable(c) is not None]
            if not cands:
                return
            per = max(1, lendable // len(cands))
            for c in cands:
                op = c.current
                n = min(per, op.unstarted, lendable)  # type: ignore[union-attr]
                if n > 0:
                    self._start_group(c, op, n)  # type: ignore[arg-type]
                    lendable -= n
                if lendable <= 0:
                    return

    # -- time slicing ----------------------------------------------------------------------
    @staticmethod
    def _has_work(c: _Ctx) -> bool:
        op = c.current
        return op is not None and op.kind == _KERNEL and (op.unstarted > 0 or not op.ready)

    def _ts_should_switch(self, d: _Dev) -> bool:
        if d.sched == "timeslice-best-effort":
            return any(self._has_work(c) for c in d.ctxs.values() if c is not d.owner)
        return len(d.ctxs) > 1

    def _ts_next(self, d: _Dev, after: _Ctx | None) -> _Ctx | None:
        ctxs = list(d.ctxs.values())
        if not ctxs or not any(self._has_work(c) for c in ctxs):
            return None
        start = 0
        if after is not None:
            start = next((i for i, c in enumerate(ctxs) if c.id > after.id), 0)
        order = ctxs[start:] + ctxs[:start]
        if d.sched == "timeslice-best-effort":
            return next(c for c in order if self._has_work(c))
        return order[0]

    def _quantum(self, d: _Dev, c: _Ctx) -> float:
        if d.sched != "timeslice-fixed":
            return d.quantum
        total = sum(x.share for x in d.ctxs.values())
        return d.quantum * len(d.ctxs) * c.share / total

    def _begin_slice(self, d: _Dev, c: _Ctx) -> None:
        d.owner = c
        d.last_owner = c
        d.slice_end = self._now + self._quantum(d, c)
        d.slice_token += 1
        self._push(d.slice_end, _EXPIRE, (d, d.slice_token))
        if c.effective_at is None and c.changed_at is not None:
            c.effective_at = self._now

    def _dispatch_timeslice(self, d: _Dev) -> None:
        if d.switching:
            return
        o = d.owner
        now = self._now
        if o is not None:
            expired = now >= d.slice_end
            idle = d.sched == "timeslice-best-effort" and not self._has_work(o)
            if expired or idle:
                if o.held > 0:
                    return  # its running waves stop at their ends
                nxt = self._ts_next(d, o)
                if nxt is None:
                    d.owner = None
                    return
                if nxt is o:
                    if expired:
                        self._begin_slice(d, o)
                else:
                    self._switch_to(d, nxt)
                    return
        else:
            nxt = self._ts_next(d, d.last_owner)
            if nxt is None:
                return
            if nxt is d.last_owner:
                self._begin_slice(d, nxt)
            else:
                self._switch_to(d, nxt)
                return
        o = d.owner
        if o is None or d.free_sms <= 0:
            return
        op = self._runnable(o)
        if op is not None:
            self._start_group(o, op, min(d.free_sms, op.unstarted))

    def _switch_to(self, d: _Dev, nxt: _Ctx) -> None:
        d.owner = None
        d.switching = True
        d.switches += 1
        self._push(self._now + d.switch, _SWITCH_DONE, (d, nxt))
