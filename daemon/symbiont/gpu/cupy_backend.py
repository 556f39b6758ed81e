"""The real backend: CUDA through CuPy (imported lazily; CI machines have no GPU).

Why these mechanisms:

* **Contexts are CUDA streams** (non-blocking) in the process's one CUDA context, so kernels
  of different clients can run concurrently, as under MPS.
* **SM shares are enforced in software by SM masking.** Every launch has a full grid
  (``blocks_per_sm`` resident blocks per SM); each block reads its SM id (PTX ``%smid``,
  scaled by ``%nsmid`` because ids need not be contiguous) and exits at once unless the SM
  lies in the context's SM range. Blocks on allowed SMs pull virtual blocks of work from an
  atomic counter until it runs out. Contexts on one device get consecutive, disjoint SM ranges
  sized ``max(1, floor(share * SMs))`` (they overlap only when shares add up to more than 1).
  A new share applies to kernels launched after the change, so vertical scaling takes effect
  when the client's running kernel ends. To stay correct whatever the hardware block
  scheduler does, the last block of a launch to finish drains any work left.
* **The kernel does real, tunable work**: each virtual block is ``threads`` threads running a
  dependent FMA chain of ``iters`` iterations, ``flops_per_block = threads * iters * 2``. It
  is compute bound; ``dram_bytes_per_block`` of a :class:`KernelSpec` is not modelled here.
* **Timings come from CUDA events** recorded around each operation in its stream, converted
  to the backend clock (``time.perf_counter`` since the backend started) through one
  reference event per device.
* **Copies use pinned host staging buffers**, so H2D/D2H run asynchronously at PCIe speed.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from symbiont.gpu.backend import (
    DeviceInfo,
    GpuBackend,
    GpuBusy,
    GpuError,
    GpuOutOfMemory,
    GpuType,
    GpuUnavailable,
    KernelSpec,
    OpTiming,
    UnknownHandle,
    check_share,
)

KERNEL_SOURCE = r"""
extern "C" __global__
void symbiont_work(float* __restrict__ out, unsigned long long* __restrict__ ctr,
                   const long long vblocks, const int iters,
                   const unsigned int sm_lo, const unsigned int sm_hi, const unsigned int sm_total)
{
    // ctr[0]: next virtual block, ctr[1]: blocks finished, ctr[2]: virtual blocks processed
    __shared__ long long vb;
    __shared__ int last;
    unsigned int smid, nsmid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    asm volatile("mov.u32 %0, %%nsmid;" : "=r"(nsmid));
    unsigned int slot = (unsigned int)(((unsigned long long)smid * sm_total) / (nsmid ? nsmid : sm_total));
    bool allowed = (sm_lo <= sm_hi) ? (slot >= sm_lo && slot < sm_hi) : (slot >= sm_lo || slot < sm_hi);
    float acc = 0.0f;
    for (int pass = 0; pass < 2; ++pass) {
        if (pass == 0 && !allowed) continue;
        if (pass == 1) {
            __syncthreads();
            if (threadIdx.x == 0) last = (atomicAdd(&ctr[1], 1ULL) == (unsigned long long)(gridDim.x - 1));
            __syncthreads();
            if (!last) break;
        }
        while (true) {
            if (threadIdx.x == 0) vb = (long long)atomicAdd(&ctr[0], 1ULL);
            __syncthreads();
            long long mine = vb;
            __syncthreads();
            if (mine >= vblocks) break;
            float x = (float)((mine * blockDim.x + threadIdx.x) & 1023) * 1e-3f;
            for (int i = 0; i < iters; ++i) x = fmaf(x, 0.9999f, 0.0001f);
            acc += x;
            if (threadIdx.x == 0) atomicAdd(&ctr[2], 1ULL);
        }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
"""

# FP32 lanes per SM by compute capability (CUDA C++ Programming Guide, "Arithmetic Instructions").
_FP32_LANES = {(6, 0): 64, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128,
               (8, 9): 128, (9, 0): 128}  # fmt: skip


def _lanes(major: int, minor: int) -> int:
    if (major, minor) in _FP32_LANES:
        return _FP32_LANES[(major, minor)]
    return 128 if major >= 8 else 64


def sm_ranges(shares: list[float], total: int) -> list[tuple[int, int]]:
    """Consecutive SM ranges ``(lo, hi)`` (``hi < lo`` wraps; ``hi == lo + total``: all SMs).

    Each context gets ``max(1, floor(share * total))`` SMs. Shares may add up to more than the
    device (a critical client at 1.0 beside a neighbour squeezed to its one-SM floor);
    overlapping ranges would let the neighbour's blocks slow the critical client's kernels
    (seen on an H100: 2.6 ms kernels stretched to 7 ms, once stalled for 300 ms), so the
    largest ranges give SMs up until they fit. They overlap only with more contexts than SMs.
    """
    caps = [max(1, int(s * total + 1e-9)) for s in shares]
    while sum(caps) > total and max(caps) > 1:
        i = max(range(len(caps)), key=lambda j: (caps[j], j))
        caps[i] -= 1
    out, lo = [], 0
    for cap in caps:
        out.append((lo % total, (lo + cap) % total if cap < total else lo % total + total))
        lo += cap
    return out


class _RCtx:
    def __init__(self, cid: int, dev: int, share: float, label: str, stream: Any) -> None:
        self.id = cid
        self.dev = dev
        self.share = share
        self.label = label
        self.stream = stream
        self.bufs: set[int] = set()
        self.last_op: int | None = None
        self.sm_range = (0, 1)
        self.changed_at: float | None = None
        self.effective_at: float | None = None
        self.first_op_after_change: int | None = None
        self.alive = True
        self.out: Any = None


class _ROp:
    def __init__(self, oid: int, kind: str, ctx: _RCtx, submit: float) -> None:
        self.id = oid
        self.kind = kind
        self.ctx = ctx
        self.submit = submit
        self.ev_start: Any = None
        self.ev_end: Any = None
        self.nbytes = 0
        self.flops = 0.0
        self.host: Any = None
        self.keep: list[Any] = []
        self.counter: Any = None
        self.is_done = False


class CupyBackend(GpuBackend):
    """CUDA devices through CuPy; see the module docstring for how shares are enforced."""

    name = "cupy"
    virtual_time = False

    def __init__(self, threads_per_block: int = 256, blocks_per_sm: int = 4, poll_s: float = 5e-5) -> None:
        try:
            import cupy as cp
        except Exception as exc:  # pragma: no cover - exercised only without cupy
            raise GpuUnavailable(f"cupy not importable: {exc}") from exc
        self._cp = cp
        try:
            import cupyx

            self._empty_pinned = cupyx.empty_pinned
        except Exception:  # pragma: no cover - old CuPy
            self._empty_pinned = lambda n, dtype=np.uint8: np.empty(n, dtype=dtype)
        try:
            n = int(cp.cuda.runtime.getDeviceCount())
        except Exception as exc:
            raise GpuUnavailable(f"no CUDA device: {exc}") from exc
        if n < 1:
            raise GpuUnavailable("no CUDA device")
        self.threads = int(threads_per_block)
        self.blocks_per_sm = int(blocks_per_sm)
        self.poll_s = poll_s
        self._t0 = time.perf_counter()
        self._next = 1
        self._ctxs: dict[int, _RCtx] = {}
        self._bufs: dict[int, tuple[int, Any]] = {}  # id -> (ctx id, cupy uint8 array)
        self._ops: dict[int, _ROp] = {}
        self._infos: list[DeviceInfo] = []
        self._refs: list[tuple[Any, float]] = []
        self._kernels: dict[int, Any] = {}
        for i in range(n):
            self._infos.append(self._probe(i))
            with cp.cuda.Device(i):
                ev = cp.cuda.Event()
                ev.record()
                ev.synchronize()
                self._refs.append((ev, self.now()))
                # compile now (NVRTC, tens of ms): not inside the first measured launch
                self._kernel(i).compile()

    # -- devices ---------------------------------------------------------------------------
    def _probe(self, i: int) -> DeviceInfo:
        cp = self._cp
        p = cp.cuda.runtime.getDeviceProperties(i)
        raw_name = p.get("name", b"cuda")
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        sms = int(p.get("multiProcessorCount", 1))
        clock_khz = p.get("clockRate") or 0  # deprecated in recent CUDA; may be 0 or absent
        clock = clock_khz / 1e6 if clock_khz else 1.5
        mem_bus = p.get("memoryBusWidth") or 0
        mem_khz = p.get("memoryClockRate") or 0
        mem_bw = 2.0 * mem_khz * 1e3 * mem_bus / 8 if mem_bus and mem_khz else 1e12
        from symbiont.gpu.simulated import GPU_TYPES

        preset = next((t for k, t in GPU_TYPES.items() if k.lower() in name.lower()), None)
        t = GpuType(
            name=name,
            sm_count=sms,
            clock_ghz=clock,
            fp32_lanes_per_sm=_lanes(int(p.get("major", 8)), int(p.get("minor", 0))),
            mem_bytes=int(p.get("totalGlobalMem", 0)),
            mem_bw=mem_bw,
            pcie_bw=preset.pcie_bw if preset else 12e9,
            pcie_latency_s=preset.pcie_latency_s if preset else 10e-6,
            launch_overhead_s=5e-6,
            source="cudaGetDeviceProperties" + (f"; link constants of preset {preset.name}" if preset else ""),
        )
        return DeviceInfo(index=i, name=name, gpu_type=t, server="localhost", backend="cupy", sched="spatial")

    def devices(self) -> list[DeviceInfo]:
        return list(self._infos)

    def _kernel(self, dev: int) -> Any:
        k = self._kernels.get(dev)
        if k is None:
            k = self._cp.RawKernel(KERNEL_SOURCE, "symbiont_work")
            self._kernels[dev] = k
        return k

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def _id(self) -> int:
        i = self._next
        self._next += 1
        return i

    # -- contexts --------------------------------------------------------------------------
    def create_context(self, device: int, share: float = 1.0, label: str = "") -> int:
        if not (0 <= device < len(self._infos)):
            raise UnknownHandle(f"unknown device {device!r}")
        cp = self._cp
        with cp.cuda.Device(device):
            stream = cp.cuda.Stream(non_blocking=True)
        c = _RCtx(self._id(), device, check_share(share), label, stream)
        self._ctxs[c.id] = c
        self._assign_ranges(device)
        return c.id

    def _ctx(self, ctx: int) -> _RCtx:
        c = self._ctxs.get(ctx)
        if c is None or not c.alive:
            raise UnknownHandle(f"unknown context {ctx!r}")
        return c

    def _assign_ranges(self, device: int) -> None:
        total = self._infos[device].gpu_type.sm_count
        ctxs = sorted((c for c in self._ctxs.values() if c.alive and c.dev == device), key=lambda c: c.id)
        for c, r in zip(ctxs, sm_ranges([c.share for c in ctxs], total), strict=True):
            c.sm_range = r

    def destroy_context(self, ctx: int) -> None:
        c = self._ctx(ctx)
        if c.last_op is not None and not self.done(c.last_op):
            raise GpuBusy(f"context {ctx} still has work in flight; synchronize first")
        for b in list(c.bufs):
            self.free(b)
        c.alive = False
        self._assign_ranges(c.dev)

    def set_share(self, ctx: int, share: float) -> None:
        c = self._ctx(ctx)
        c.share = check_share(share)
        c.changed_at = self.now()
        c.effective_at = None
        c.first_op_after_change = None
        self._assign_ranges(c.dev)
        if c.last_op is None or self.done(c.last_op):
            c.effective_at = c.changed_at  # nothing running: the next launch uses the new share

    def share(self, ctx: int) -> float:
        return self._ctx(ctx).share

    def context_device(self, ctx: int) -> int:
        return self._ctx(ctx).dev

    def share_effective_at(self, ctx: int) -> float | None:
        c = self._ctx(ctx)
        if c.effective_at is None and c.first_op_after_change is not None:
            op = c.first_op_after_change
            if self.done(op):
                c.effective_at = self.timing(op).start
        elif c.effective_at is None and c.changed_at is not None and c.last_op is not None and self.done(c.last_op):
            # nothing launched since the change: it took effect when the work queued before it
            # drained, the first moment a launch would run with the new SM range
            c.effective_at = max(c.changed_at, self.timing(c.last_op).end)
        return c.effective_at

    # -- memory ----------------------------------------------------------------------------
    def alloc(self, ctx: int, nbytes: int) -> int:
        c = self._ctx(ctx)
        n = int(nbytes)
        if n <= 0:
            raise GpuError(f"allocation size must be > 0, got {nbytes!r}")
        cp = self._cp
        try:
            with cp.cuda.Device(c.dev):
                arr = cp.empty(n, dtype=cp.uint8)
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise GpuOutOfMemory(str(exc)) from exc
        bid = self._id()
        self._bufs[bid] = (c.id, arr)
        c.bufs.add(bid)
        return bid

    def _buf(self, buf: int) -> tuple[_RCtx, Any]:
        entry = self._bufs.get(buf)
        if entry is None:
            raise UnknownHandle(f"unknown buffer {buf!r}")
        return self._ctxs[entry[0]], entry[1]

    def free(self, buf: int) -> None:
        c, _ = self._buf(buf)
        del self._bufs[buf]
        c.bufs.discard(buf)

    def buffer_size(self, buf: int) -> int:
        return int(self._buf(buf)[1].nbytes)

    def mem_free(self, device: int) -> int:
        cp = self._cp
        with cp.cuda.Device(device):
            free, _total = cp.cuda.runtime.memGetInfo()
        return int(free) + int(cp.get_default_memory_pool().free_bytes())

    # -- operations ------------------------------------------------------------------------
    def _begin(self, kind: str, c: _RCtx) -> _ROp:
        cp = self._cp
        op = _ROp(self._id(), kind, c, self.now())
        with cp.cuda.Device(c.dev):
            op.ev_start = cp.cuda.Event()
            op.ev_end = cp.cuda.Event()
            op.ev_start.record(c.stream)
        return op

    def _finish(self, op: _ROp) -> int:
        c = op.ctx
        with self._cp.cuda.Device(c.dev):
            op.ev_end.record(c.stream)
        self._ops[op.id] = op
        c.last_op = op.id
        return op.id

    def memcpy_h2d(self, buf: int, data: bytes | np.ndarray | None = None, nbytes: int | None = None) -> int:
        c, arr = self._buf(buf)
        if data is not None:
            src = np.frombuffer(
                np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data), dtype=np.uint8
            )
            n = src.size
        else:
            n = arr.nbytes if nbytes is None else int(nbytes)
            src = None
        if not (0 < n <= arr.nbytes):
            raise GpuError(f"copy of {n} bytes does not fit buffer {buf} of {arr.nbytes} bytes")
        host = self._empty_pinned(n, dtype=np.uint8)
        if src is not None:
            host[:] = src
        else:
            host[:] = 0
        op = self._begin("h2d", c)
        op.nbytes = n
        op.keep.append(host)
        with self._cp.cuda.Device(c.dev):
            arr.data.copy_from_host_async(ctypes.c_void_p(host.ctypes.data), n, c.stream)
        return self._finish(op)

    def memcpy_d2h(self, buf: int, nbytes: int | None = None) -> int:
        c, arr = self._buf(buf)
        n = arr.nbytes if nbytes is None else int(nbytes)
        if not (0 < n <= arr.nbytes):
            raise GpuError(f"copy of {n} bytes does not fit buffer {buf} of {arr.nbytes} bytes")
        host = self._empty_pinned(n, dtype=np.uint8)
        op = self._begin("d2h", c)
        op.nbytes = n
        op.host = host
        with self._cp.cuda.Device(c.dev):
            arr.data.copy_to_host_async(ctypes.c_void_p(host.ctypes.data), n, c.stream)
        return self._finish(op)

    def memcpy_d2d(self, src: int, dst: int, nbytes: int | None = None) -> int:
        _sc, sarr = self._buf(src)
        dc, darr = self._buf(dst)
        n = min(sarr.nbytes, darr.nbytes) if nbytes is None else int(nbytes)
        if not (0 < n <= min(sarr.nbytes, darr.nbytes)):
            raise GpuError(f"copy of {n} bytes does not fit buffers {src}->{dst}")
        op = self._begin("d2d", dc)
        op.nbytes = n
        with self._cp.cuda.Device(dc.dev):
            darr.data.copy_from_device_async(sarr.data, n, dc.stream)
        return self._finish(op)

    def launch(self, ctx: int, kernel: KernelSpec, share: float | None = None) -> int:
        c = self._ctx(ctx)
        cp = self._cp
        total = self._infos[c.dev].gpu_type.sm_count
        lo, hi = c.sm_range
        if share is not None and check_share(share) < c.share:
            cap = max(1, int(share * total + 1e-9))
            hi = (lo + cap) % total if cap < total else lo + total
        if hi > total:  # the whole device
            lo, hi = 0, total
        iters = max(1, round(kernel.flops_per_block / (self.threads * 2)))
        grid = total * self.blocks_per_sm
        # allocate in the context's stream: CuPy's pool is stream-ordered, and a memset on the
        # legacy default stream would not be ordered with this non-blocking stream
        with cp.cuda.Device(c.dev), c.stream:
            if c.out is None or c.out.size < grid * self.threads:
                c.out = cp.empty(grid * self.threads, dtype=cp.float32)
            counter = cp.empty(3, dtype=cp.uint64)
            try:
                scratch = cp.empty(kernel.mem_bytes, dtype=cp.uint8) if kernel.mem_bytes else None
            except cp.cuda.memory.OutOfMemoryError as exc:
                raise GpuOutOfMemory(f"kernel {kernel.name!r}: {exc}") from exc
        op = self._begin("kernel", c)
        op.flops = kernel.blocks * self.threads * iters * 2.0
        op.counter = counter
        op.keep.extend([scratch])
        with cp.cuda.Device(c.dev), c.stream:
            counter.fill(0)
            self._kernel(c.dev)(
                (grid,),
                (self.threads,),
                (c.out, counter, np.int64(kernel.blocks), np.int32(iters), np.uint32(lo), np.uint32(hi),
                 np.uint32(total)),
            )  # fmt: skip
        if c.changed_at is not None and c.effective_at is None and c.first_op_after_change is None:
            c.first_op_after_change = op.id
        return self._finish(op)

    def effective_kernel(self, kernel: KernelSpec) -> KernelSpec:
        """The kernel as it really runs here (FLOP rounded to whole FMA iterations)."""
        iters = max(1, round(kernel.flops_per_block / (self.threads * 2)))
        return replace(kernel, flops_per_block=float(self.threads * iters * 2))

    def blocks_processed(self, op: int) -> int:
        """How many virtual blocks a finished kernel processed (each exactly once if correct)."""
        o = self._op(op)
        if o.counter is None:
            raise GpuError(f"operation {op} is not a kernel")
        self.wait_all([op])
        return int(o.counter[2].get())

    def result(self, op: int) -> np.ndarray:
        o = self._op(op)
        if o.kind != "d2h":
            raise GpuError(f"operation {op} is a {o.kind}, not a d2h copy")
        if not self.done(op):
            raise GpuError(f"operation {op} has not finished; wait for it first")
        return np.array(o.host, dtype=np.uint8, copy=True)

    # -- progress and time -----------------------------------------------------------------
    def _op(self, op: int) -> _ROp:
        o = self._ops.get(op)
        if o is None:
            raise UnknownHandle(f"unknown operation {op!r}")
        return o

    def done(self, op: int) -> bool:
        o = self._op(op)
        if not o.is_done and o.ev_end.done:  # cudaEventQuery
            o.is_done = True
            o.keep.clear()
        return o.is_done

    def wait(self, ops: Iterable[int], until: float | None = None) -> list[int]:
        want = list(ops)
        while True:
            done = [o for o in want if self.done(o)]
            if done:
                return done
            now = self.now()
            if until is not None and now >= until:
                return []
            if not want:
                if until is None:
                    return []
                time.sleep(max(0.0, until - now))
                return []
            time.sleep(self.poll_s if until is None else min(self.poll_s, max(0.0, until - now)))

    def synchronize(self, ctx: int | None = None) -> None:
        targets = [self._ctx(ctx)] if ctx is not None else [c for c in self._ctxs.values() if c.alive]
        for c in targets:
            c.stream.synchronize()
            if c.last_op is not None:
                self.done(c.last_op)

    def advance_to(self, t: float) -> None:
        d = t - self.now()
        if d > 0:
            time.sleep(d)

    def timing(self, op: int) -> OpTiming:
        o = self._op(op)
        if not self.done(op):
            return OpTiming(o.id, o.kind, o.ctx.id, o.submit, math.nan, math.nan, o.nbytes, o.flops)
        ref, t_ref = self._refs[o.ctx.dev]
        cp = self._cp
        start = t_ref + cp.cuda.get_elapsed_time(ref, o.ev_start) / 1e3
        end = t_ref + cp.cuda.get_elapsed_time(ref, o.ev_end) / 1e3
        return OpTiming(o.id, o.kind, o.ctx.id, o.submit, start, end, o.nbytes, o.flops)
