"""Page-hashing backends behind one interface: CPU (numpy), CuPy (real GPU), simulated GPU.

Catalyst's observation (seeds/000) is that the expensive part of out-of-band deduplication —
hashing every page and finding equal hashes — is SIMD work that can run off the CPU. Every
backend here computes the same 64-bit page hash, **bit for bit**, and a stable argsort of the
hashes, so the engine's results never depend on where they were computed; only the cost does.

The hash (``xsm64``, xor-shift multilinear)
-------------------------------------------
A 4 KiB page is 512 little-endian 64-bit words ``w[0..511]``; with fixed odd keys ``K[i]``
(drawn once from a seeded generator, :data:`KEYS`)::

    h(page) = sum over i of ( (w[i] XOR (w[i] >> 29)) * K[i] )   mod 2**64

The xor-shift is a bijection on words that moves high-bit differences into low bits, so that
pages differing only in the top bits of a few words do not systematically collide (a pure
multilinear sum mod 2**64 collides whenever two words differ by 2**63). It is *not* a
cryptographic hash and needs not be: every candidate group is confirmed byte by byte by the
engine, so a collision costs one extra compare, never a wrong result. A zero page hashes to 0.
Because the sum is taken modulo 2**64, the reduction order does not change the result, which is
what lets a GPU reduction tree match numpy's sequential dot product exactly.

On the CPU it is a compiled loop (:mod:`.native`: one pass, the 64-bit multiply vectorised by
the compiler), 2-2.5x a memcpy of the same buffer on one core of the test host; where no C
compiler is available, one xor-shift pass and one ``numpy.dot`` per L2-sized chunk (numpy's
integer dot is a scalar multiply-accumulate loop that wraps modulo 2**64), about 0.45x memcpy
(``benchmarks/bench_dedup.py`` prints both against memcpy in the same run).

Simulated-GPU cost model
------------------------
:class:`SimulatedGpuBackend` returns the CPU backend's results and charges, per batch of
``n`` pages (``B = 4096 n`` bytes), on a :class:`~symbiont.gpu.backend.GpuType` preset
(``symbiont.gpu.simulated.GPU_TYPES``: A100, V100, T4, H100 with their spec-sheet memory and
PCIe bandwidths)::

    h2d(B)     = pcie_latency + B / pcie_bw                         copy the pages in
    hash(n)    = launch + max(B / (eta * mem_bw), n * OPS_PER_PAGE / int_ops)
    d2h(n)     = pcie_latency + 8 n / pcie_bw                       hashes back
    sort(N)    = h2d(8N) + RADIX_PASSES * (launch + 2 * N * 16 / (eta * mem_bw)) + d2h(8N)

with ``eta`` = 0.8 of peak DRAM bandwidth reachable by a streaming kernel (assumed),
``int_ops`` = SMs x 64 INT32 lanes x clock, ``OPS_PER_PAGE`` = 512 words x 12 INT32
operations (a 64-bit multiply is about four 32-bit multiply-adds, plus the xor-shift, the add
and the load), and an LSD radix sort of 64-bit keys with 64-bit values in 8 passes of 8 bits
that each read and write keys and values. Transfers and kernels do not overlap (conservative:
no stream pipelining). The hash is memory-bound on every preset, so PCIe dominates:
``simulated_s`` is therefore about ``bytes / pcie_bw``. All terms are reported separately
(:class:`BackendStats`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from symbiont.dedup import native

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8
SHIFT = 29
KEY_SEED = 0x5EED_DEDB
KEYS: np.ndarray = np.random.default_rng(KEY_SEED).integers(0, 2**64 - 1, size=WORDS, dtype=np.uint64, endpoint=True)
KEYS |= np.uint64(1)
KEYS.setflags(write=False)

# Pages per inner chunk of the CPU kernel: 256 pages = 1 MiB, a temporary that stays in L2.
_CHUNK = 256

HashFn = Callable[[np.ndarray], np.ndarray]

# Simulated-GPU model constants (assumptions, see the module docstring).
MEM_EFFICIENCY = 0.8
OPS_PER_PAGE = WORDS * 12
INT32_LANES_PER_SM = 64
RADIX_PASSES = 8


class BackendError(Exception):
    """A backend cannot be used here (no GPU, unknown name)."""


def as_pages(buf: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """A contiguous ``(n, 4096)`` uint8 view of ``buf`` (whose length must be a page multiple)."""
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    if arr.dtype != np.uint8:
        arr = arr.view(np.uint8)
    if arr.size % PAGE_SIZE:
        raise ValueError(f"buffer of {arr.size} bytes is not a whole number of {PAGE_SIZE}-byte pages")
    return np.ascontiguousarray(arr.reshape(-1, PAGE_SIZE))


def _words(pages: np.ndarray) -> np.ndarray:
    if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE or pages.dtype != np.uint8:
        raise ValueError(f"expected an (n, {PAGE_SIZE}) uint8 array, got {pages.shape} {pages.dtype}")
    pages = np.ascontiguousarray(pages)
    return pages.view(np.uint64)


def xsm64_cpu(pages: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The page hash on one core: the compiled kernel (:mod:`.native`) where it builds, else
    numpy; both give the same bits."""
    w = _words(pages)
    if out is None:
        out = np.empty(w.shape[0], dtype=np.uint64)
    if w.shape[0] and native.xsm64_native(w, KEYS, SHIFT, out):
        return out
    return xsm64_numpy(pages, out)


def cpu_kernel() -> str:
    """``native`` or ``numpy``: which kernel :func:`xsm64_cpu` runs in this process."""
    return "native" if native.load() is not None else "numpy"


def xsm64_numpy(pages: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The reference implementation of the page hash (numpy, one core)."""
    w = _words(pages)
    n = w.shape[0]
    if out is None:
        out = np.empty(n, dtype=np.uint64)
    tmp = np.empty((min(_CHUNK, max(n, 1)), WORDS), dtype=np.uint64)
    shift = np.uint64(SHIFT)
    for i in range(0, n, _CHUNK):
        c = w[i : i + _CHUNK]
        t = tmp[: c.shape[0]]
        np.right_shift(c, shift, out=t)
        np.bitwise_xor(t, c, out=t)
        np.dot(t, KEYS, out=out[i : i + c.shape[0]])
    return out


def xsm64_scalar(page: bytes) -> int:
    """The same hash in plain Python integers: the specification the vectorised kernels match."""
    if len(page) != PAGE_SIZE:
        raise ValueError("a page is 4096 bytes")
    h = 0
    mask = (1 << 64) - 1
    for i in range(WORDS):
        w = int.from_bytes(page[8 * i : 8 * i + 8], "little")
        h = (h + ((w ^ (w >> SHIFT)) * int(KEYS[i]))) & mask
    return h


@dataclass
class BackendStats:
    """What a backend spent. ``wall_s`` is measured here; ``device_s`` is the GPU's share (measured
    for CuPy, modelled for the simulator, 0 on CPU); the ``*_s`` parts break the device time down."""

    batches: int = 0
    pages: int = 0
    bytes: int = 0
    sorts: int = 0
    sorted_keys: int = 0
    wall_s: float = 0.0
    device_s: float = 0.0
    h2d_s: float = 0.0
    kernel_s: float = 0.0
    d2h_s: float = 0.0
    sort_s: float = 0.0
    transfer_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hash_gib_per_s_wall"] = round(self.bytes / self.wall_s / 2**30, 3) if self.wall_s > 0 else None
        return d


class HashBackend(ABC):
    """Hash pages and sort hashes. Implementations must agree bit for bit with :func:`xsm64_cpu`."""

    name: str = ""
    kind: str = ""  # cpu | gpu | simulated-gpu

    def __init__(self) -> None:
        self.stats = BackendStats()

    def reset_stats(self) -> None:
        self.stats = BackendStats()

    def hash_pages(self, pages: np.ndarray) -> np.ndarray:
        """``(n, 4096)`` uint8 pages → ``(n,)`` uint64 hashes."""
        t0 = time.perf_counter()
        h = self._hash(pages)
        self.stats.wall_s += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.pages += pages.shape[0]
        self.stats.bytes += pages.shape[0] * PAGE_SIZE
        return h

    def argsort(self, keys: np.ndarray) -> np.ndarray:
        """Stable argsort of uint64 keys (ties keep their input order) → int64 positions."""
        t0 = time.perf_counter()
        order = self._argsort(np.ascontiguousarray(keys, dtype=np.uint64))
        self.stats.wall_s += time.perf_counter() - t0
        self.stats.sorts += 1
        self.stats.sorted_keys += int(keys.shape[0])
        return order.astype(np.int64, copy=False)

    @abstractmethod
    def _hash(self, pages: np.ndarray) -> np.ndarray: ...

    def _argsort(self, keys: np.ndarray) -> np.ndarray:
        return np.argsort(keys, kind="stable")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "hash": "xsm64", "cpu_kernel": cpu_kernel(),
                "stats": self.stats.as_dict()}


class CpuBackend(HashBackend):
    """numpy on the host CPU (one core)."""

    name = "cpu"
    kind = "cpu"

    def _hash(self, pages: np.ndarray) -> np.ndarray:
        return xsm64_cpu(pages)


class SimulatedGpuBackend(HashBackend):
    """The CPU kernel's exact results, with the GPU time a real device would take (modelled)."""

    name = "simulated-gpu"
    kind = "simulated-gpu"

    def __init__(self, gpu_type: str = "A100") -> None:
        super().__init__()
        from symbiont.gpu.backend import GpuError
        from symbiont.gpu.simulated import gpu_type as lookup

        try:
            self.gpu = lookup(gpu_type)
        except GpuError as exc:
            raise BackendError(str(exc)) from None

    # -- the cost model (pure functions of sizes; see the module docstring) ----------------
    def h2d_seconds(self, nbytes: int) -> float:
        return self.gpu.pcie_latency_s + nbytes / self.gpu.pcie_bw

    def d2h_seconds(self, nbytes: int) -> float:
        return self.gpu.pcie_latency_s + nbytes / self.gpu.pcie_bw

    def kernel_seconds(self, npages: int) -> float:
        g = self.gpu
        int_ops = g.sm_count * INT32_LANES_PER_SM * g.clock_ghz * 1e9
        mem = npages * PAGE_SIZE / (MEM_EFFICIENCY * g.mem_bw)
        alu = npages * OPS_PER_PAGE / int_ops
        return g.launch_overhead_s + max(mem, alu)

    def sort_seconds(self, nkeys: int) -> float:
        g = self.gpu
        per_pass = g.launch_overhead_s + 2 * nkeys * 16 / (MEM_EFFICIENCY * g.mem_bw)
        return RADIX_PASSES * per_pass

    def batch_seconds(self, npages: int) -> float:
        return self.h2d_seconds(npages * PAGE_SIZE) + self.kernel_seconds(npages) + self.d2h_seconds(8 * npages)

    def _hash(self, pages: np.ndarray) -> np.ndarray:
        h = xsm64_cpu(pages)
        n = pages.shape[0]
        s = self.stats
        h2d, k, d2h = self.h2d_seconds(n * PAGE_SIZE), self.kernel_seconds(n), self.d2h_seconds(8 * n)
        s.h2d_s += h2d
        s.kernel_s += k
        s.d2h_s += d2h
        s.device_s += h2d + k + d2h
        s.transfer_bytes += n * PAGE_SIZE + 8 * n
        return h

    def _argsort(self, keys: np.ndarray) -> np.ndarray:
        n = keys.shape[0]
        h2d, srt, d2h = self.h2d_seconds(8 * n), self.sort_seconds(n), self.d2h_seconds(8 * n)
        s = self.stats
        s.h2d_s += h2d
        s.sort_s += srt
        s.d2h_s += d2h
        s.device_s += h2d + srt + d2h
        s.transfer_bytes += 16 * n
        return np.argsort(keys, kind="stable")

    def describe(self) -> dict[str, Any]:
        g = self.gpu
        return {
            **super().describe(),
            "gpu": g.name,
            "model": {
                "pcie_bw": g.pcie_bw, "pcie_latency_s": g.pcie_latency_s, "mem_bw": g.mem_bw,
                "mem_efficiency": MEM_EFFICIENCY, "launch_overhead_s": g.launch_overhead_s,
                "ops_per_page": OPS_PER_PAGE, "int32_lanes_per_sm": INT32_LANES_PER_SM,
                "radix_passes": RADIX_PASSES, "overlap": False, "source": g.source,
            },
        }  # fmt: skip


class CupyBackend(HashBackend):
    """A real CUDA GPU through CuPy: pages are copied to the device, hashed by a reduction
    kernel (the same formula, modulo 2**64, so bit-identical), and hashes copied back.
    ``device_s`` is measured with CUDA events and includes the transfers."""

    name = "cupy"
    kind = "gpu"

    def __init__(self, device: int = 0) -> None:
        super().__init__()
        from symbiont.gpu.backend import cupy_status

        ok, why = cupy_status()
        if not ok:
            raise BackendError(f"the CuPy backend needs a CUDA GPU: {why}")
        import cupy as cp

        self.cp = cp
        self.device = device
        with cp.cuda.Device(device):
            self._keys = cp.asarray(KEYS)
            self._kernel = cp.ReductionKernel(
                "uint64 w, uint64 k", "uint64 h",
                f"(w ^ (w >> {SHIFT})) * k", "a + b", "h = a", "0", "symbiont_xsm64",
            )  # fmt: skip

    def _timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        cp = self.cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, cp.cuda.get_elapsed_time(start, end) / 1e3

    def _hash(self, pages: np.ndarray) -> np.ndarray:
        cp = self.cp
        w = _words(pages)
        with cp.cuda.Device(self.device):
            dw, h2d = self._timed(lambda: cp.asarray(w))
            dh, k = self._timed(lambda: self._kernel(dw, self._keys, axis=1))
            h, d2h = self._timed(lambda: cp.asnumpy(dh))
        s = self.stats
        s.h2d_s += h2d
        s.kernel_s += k
        s.d2h_s += d2h
        s.device_s += h2d + k + d2h
        s.transfer_bytes += w.nbytes + h.nbytes
        return np.asarray(h, dtype=np.uint64)

    def _argsort(self, keys: np.ndarray) -> np.ndarray:
        cp = self.cp
        with cp.cuda.Device(self.device):
            dk, h2d = self._timed(lambda: cp.asarray(keys))
            # CuPy sorts with CUB/thrust radix sort, which is stable.
            do, srt = self._timed(lambda: cp.argsort(dk))
            order, d2h = self._timed(lambda: cp.asnumpy(do))
        s = self.stats
        s.h2d_s += h2d
        s.sort_s += srt
        s.d2h_s += d2h
        s.device_s += h2d + srt + d2h
        s.transfer_bytes += keys.nbytes + order.nbytes
        return np.asarray(order)

    def describe(self) -> dict[str, Any]:
        cp = self.cp
        props = cp.cuda.runtime.getDeviceProperties(self.device)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return {**super().describe(), "device": self.device, "gpu": name}


BACKENDS = ("auto", "cpu", "cupy", "simulated-gpu")


def available_backends() -> dict[str, dict[str, Any]]:
    from symbiont.gpu.backend import cupy_status

    ok, why = cupy_status()
    return {
        "cpu": {"available": True, "reason": "numpy"},
        "cupy": {"available": ok, "reason": why},
        "simulated-gpu": {"available": True, "reason": "CPU results with a modelled GPU cost"},
    }


def select_backend(name: str = "auto", gpu_type: str = "A100") -> HashBackend:
    """``auto``: CuPy when a CUDA GPU is usable, else the CPU; any other name forces that backend
    (``cupy`` fails with :class:`BackendError` where there is no GPU; ``simulated-gpu`` models
    ``gpu_type``)."""
    key = (name or "auto").strip().lower()
    if key in ("sim", "simulated", "simulated_gpu"):
        key = "simulated-gpu"
    if key not in BACKENDS:
        raise BackendError(f"unknown hashing backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if key == "cpu":
        return CpuBackend()
    if key == "simulated-gpu":
        return SimulatedGpuBackend(gpu_type)
    if key == "cupy":
        return CupyBackend()
    try:
        return CupyBackend()
    except BackendError as exc:
        log.debug("auto backend: %s; using the CPU", exc)
        return CpuBackend()


__all__ = [
    "BACKENDS",
    "KEYS",
    "PAGE_SIZE",
    "BackendError",
    "BackendStats",
    "CpuBackend",
    "CupyBackend",
    "HashBackend",
    "SimulatedGpuBackend",
    "as_pages",
    "available_backends",
    "select_backend",
    "cpu_kernel",
    "xsm64_cpu",
    "xsm64_numpy",
    "xsm64_scalar",
]
