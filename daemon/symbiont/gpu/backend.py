"""One interface for GPU backends: the real one (CuPy/CUDA) and the discrete-event simulator.

Everything above this module (the Flyt-style endpoint service, the FaaS schedulers, the
FaaSter dispatcher, the experiments) talks to a :class:`GpuBackend` only, so the same policy
code runs on an H100 and on a 2-core CI machine without a GPU.

The model of a GPU shared by the two backends:

* a *device* has a type (:class:`GpuType`: SM count, per-SM throughput, memory, PCIe link);
* a *context* is one client's view of a device (a CUDA stream plus an SM share). Operations
  submitted to one context run in order, like a CUDA stream; contexts run concurrently;
* a *kernel* is described by its work, not its code: ``blocks`` thread blocks of
  ``flops_per_block`` FLOP each (plus optional DRAM traffic) and a device-memory footprint;
* every operation gets an id; :meth:`GpuBackend.timing` tells when it was submitted, started and
  ended on the backend's clock (virtual seconds for the simulator, host seconds for CUDA).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

BackendName = str  # "auto" | "cupy" | "simulated"


class GpuError(Exception):
    """A backend error with a stable machine-readable ``code`` (sent to endpoint clients)."""

    code: str = "gpu_error"


class GpuOutOfMemory(GpuError):
    code = "out_of_memory"


class GpuUnavailable(GpuError):
    code = "unavailable"


class UnknownHandle(GpuError):
    code = "unknown_handle"


class GpuBusy(GpuError):
    code = "busy"


@dataclass(frozen=True)
class GpuType:
    """Public spec-sheet constants of a GPU model (see CALIBRATION in :mod:`.simulated`)."""

    name: str
    sm_count: int
    clock_ghz: float  # boost clock
    fp32_lanes_per_sm: int  # FP32 FMA units per SM; one FMA = 2 FLOP
    mem_bytes: int
    mem_bw: float  # device-memory bandwidth, bytes/s
    pcie_bw: float  # effective host<->device bandwidth per direction, bytes/s
    pcie_latency_s: float  # fixed cost of one memcpy (driver + DMA setup)
    launch_overhead_s: float  # driver launch latency (dedup model); the simulator charges calibration.launch_s
    source: str = ""

    @property
    def sm_flops(self) -> float:
        """Peak FP32 FLOP/s of one SM."""
        return self.fp32_lanes_per_sm * 2.0 * self.clock_ghz * 1e9

    @property
    def peak_flops(self) -> float:
        return self.sm_flops * self.sm_count

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sm_count": self.sm_count,
            "clock_ghz": self.clock_ghz,
            "fp32_lanes_per_sm": self.fp32_lanes_per_sm,
            "peak_tflops": round(self.peak_flops / 1e12, 2),
            "mem_gib": round(self.mem_bytes / 2**30, 1),
            "mem_bw_gbs": round(self.mem_bw / 1e9, 1),
            "pcie_bw_gbs": round(self.pcie_bw / 1e9, 2),
            "pcie_latency_us": round(self.pcie_latency_s * 1e6, 2),
            "launch_overhead_us": round(self.launch_overhead_s * 1e6, 2),
            "source": self.source,
        }


@dataclass(frozen=True)
class DeviceInfo:
    """One device as a backend exposes it."""

    index: int
    name: str
    gpu_type: GpuType
    server: str
    backend: str
    sched: str = "spatial"

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "type": self.gpu_type.name,
            "server": self.server,
            "backend": self.backend,
            "sched": self.sched,
            "sm_count": self.gpu_type.sm_count,
            "mem_bytes": self.gpu_type.mem_bytes,
            "peak_tflops": round(self.gpu_type.peak_flops / 1e12, 2),
        }


@dataclass(frozen=True)
class KernelSpec:
    """A kernel described by its work: why not code? Because schedulers only need the work.

    ``blocks`` thread blocks, each doing ``flops_per_block`` FP32 FLOP and moving
    ``dram_bytes_per_block`` bytes of device memory; ``mem_bytes`` of device memory are held
    while it runs (scratch space). ``block_offset`` says where a slice starts within the
    original kernel (kernel slicing launches sub-ranges of the block index space).
    """

    blocks: int
    flops_per_block: float
    mem_bytes: int = 0
    dram_bytes_per_block: float = 0.0
    name: str = "kernel"
    block_offset: int = 0

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise ValueError(f"kernel {self.name!r}: blocks must be >= 1, got {self.blocks}")
        if not (self.flops_per_block > 0 and math.isfinite(self.flops_per_block)):
            raise ValueError(f"kernel {self.name!r}: flops_per_block must be > 0")
        if self.mem_bytes < 0 or self.dram_bytes_per_block < 0:
            raise ValueError(f"kernel {self.name!r}: negative memory")

    @property
    def flops(self) -> float:
        return self.blocks * self.flops_per_block

    def block_time(self, t: GpuType) -> float:
        """Seconds one block occupies one SM: a per-SM roofline (compute vs DRAM share)."""
        compute = self.flops_per_block / t.sm_flops
        memory = self.dram_bytes_per_block / (t.mem_bw / t.sm_count) if self.dram_bytes_per_block else 0.0
        return max(compute, memory)

    def ideal_time(self, t: GpuType, sms: int | None = None) -> float:
        """Time on ``sms`` SMs (default all) with no contention: whole waves of blocks."""
        n = t.sm_count if sms is None else max(1, min(sms, t.sm_count))
        return math.ceil(self.blocks / n) * self.block_time(t)

    def slice(self, start: int, count: int) -> KernelSpec:
        """The sub-kernel of blocks ``[start, start+count)`` (a kernel slice)."""
        if start < 0 or count < 1 or start + count > self.blocks + self.block_offset:
            raise ValueError(f"bad slice [{start}, {start + count}) of {self.blocks} blocks")
        return replace(self, blocks=count, block_offset=start)

    @classmethod
    def from_time(
        cls, seconds: float, gpu: GpuType, blocks: int | None = None, name: str = "kernel", mem_bytes: int = 0
    ) -> KernelSpec:
        """A compute-bound kernel that takes ``seconds`` alone on a whole ``gpu``."""
        n = blocks or gpu.sm_count * 32
        waves = math.ceil(n / gpu.sm_count)
        flops_per_block = seconds / waves * gpu.sm_flops
        return cls(blocks=n, flops_per_block=flops_per_block, name=name, mem_bytes=mem_bytes)


@dataclass(frozen=True)
class OpTiming:
    """When an operation was submitted, started and ended (backend clock, seconds)."""

    op: int
    kind: str  # "kernel" | "h2d" | "d2h" | "d2d"
    ctx: int
    submit: float
    start: float
    end: float
    nbytes: int = 0
    flops: float = 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def latency(self) -> float:
        """Submit to end: what the client waited."""
        return self.end - self.submit


class GpuBackend(ABC):
    """What every backend provides. Buffers, contexts and ops are plain integer ids."""

    name: ClassVar[str] = "abstract"
    #: True when ``now()`` is a virtual clock that only moves when work is waited on.
    virtual_time: ClassVar[bool] = False

    # -- devices and contexts --------------------------------------------------------------
    @abstractmethod
    def devices(self) -> list[DeviceInfo]: ...

    @abstractmethod
    def create_context(self, device: int, share: float = 1.0, label: str = "") -> int:
        """A client's stream on ``device`` with an SM share in (0, 1]."""

    @abstractmethod
    def destroy_context(self, ctx: int) -> None:
        """Free the context and its buffers; it must be idle."""

    @abstractmethod
    def set_share(self, ctx: int, share: float) -> None:
        """Vertical scaling: change the context's SM share from now on."""

    @abstractmethod
    def share(self, ctx: int) -> float: ...

    @abstractmethod
    def context_device(self, ctx: int) -> int: ...

    @abstractmethod
    def share_effective_at(self, ctx: int) -> float | None:
        """When the last :meth:`set_share` took effect on the device (None: not yet)."""

    # -- memory ----------------------------------------------------------------------------
    @abstractmethod
    def alloc(self, ctx: int, nbytes: int) -> int: ...

    @abstractmethod
    def free(self, buf: int) -> None: ...

    @abstractmethod
    def buffer_size(self, buf: int) -> int: ...

    @abstractmethod
    def mem_free(self, device: int) -> int: ...

    # -- operations (asynchronous, in stream order per context) ----------------------------
    @abstractmethod
    def memcpy_h2d(self, buf: int, data: bytes | np.ndarray | None = None, nbytes: int | None = None) -> int:
        """Copy ``data`` (or ``nbytes`` zero bytes, default the whole buffer) to the device."""

    @abstractmethod
    def memcpy_d2h(self, buf: int, nbytes: int | None = None) -> int:
        """Copy the buffer back; read the bytes with :meth:`result` once done."""

    @abstractmethod
    def memcpy_d2d(self, src: int, dst: int, nbytes: int | None = None) -> int:
        """Device-to-device copy, possibly across devices or servers (runs in dst's stream)."""

    @abstractmethod
    def launch(self, ctx: int, kernel: KernelSpec, share: float | None = None) -> int:
        """Launch ``kernel``; ``share`` may lower (never raise) the context's SM share."""

    @abstractmethod
    def result(self, op: int) -> np.ndarray:
        """The bytes (uint8) a finished d2h op read."""

    # -- progress and time -----------------------------------------------------------------
    @abstractmethod
    def done(self, op: int) -> bool: ...

    @abstractmethod
    def wait(self, ops: Iterable[int], until: float | None = None) -> list[int]:
        """Block until at least one of ``ops`` is done or the clock reaches ``until``.

        Returns the done subset (possibly empty when ``until`` was reached first).
        """

    @abstractmethod
    def synchronize(self, ctx: int | None = None) -> None:
        """Wait for everything submitted to ``ctx`` (or to every context)."""

    @abstractmethod
    def timing(self, op: int) -> OpTiming: ...

    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    def advance_to(self, t: float) -> None:
        """Let the clock reach ``t`` (simulated: run events; real: sleep)."""

    def wait_all(self, ops: Sequence[int]) -> None:
        pending = [o for o in ops if not self.done(o)]
        while pending:
            self.wait(pending)
            pending = [o for o in pending if not self.done(o)]

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "devices": [d.as_dict() for d in self.devices()]}


def check_share(share: float) -> float:
    """Shares are fractions of a device in (0, 1]."""
    s = float(share)
    if not (0.0 < s <= 1.0) or not math.isfinite(s):
        raise GpuError(f"SM share must be in (0, 1], got {share!r}")
    return s


def cupy_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy imports and sees at least one CUDA device."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        return False, f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        import cupy

        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return False, f"no CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "no CUDA device (count 0)"
    return True, f"{n} CUDA device(s)"


def select_backend(name: BackendName = "auto", **sim_kwargs: object) -> GpuBackend:
    """``auto``: CuPy when a GPU is present, else the simulator; ``cupy``/``simulated`` force one.

    ``sim_kwargs`` go to :class:`~symbiont.gpu.simulated.SimulatedBackend` (devices, seed,
    jitter) and are ignored for CuPy.
    """
    key = (name or "auto").strip().lower()
    if key not in ("auto", "cupy", "simulated", "sim"):
        raise ValueError(f"unknown GPU backend {name!r}; choose auto, cupy or simulated")
    if key in ("auto", "cupy"):
        ok, why = cupy_status()
        if ok:
            from symbiont.gpu.cupy_backend import CupyBackend

            return CupyBackend()
        if key == "cupy":
            raise GpuUnavailable(f"cupy backend requested but unavailable: {why}")
    from symbiont.gpu.simulated import SimulatedBackend

    return SimulatedBackend(**sim_kwargs)  # type: ignore[arg-type]
