"""The simulator's cost constants, in one place, each with where it comes from.

Why this module exists: the first simulator assumed a kernel launch costs 5 us and that the
host notices a finished kernel at once. On the lent H100 (BENCHMARKS.md, "GPU, real backend",
2026-11-22) that model was wrong where it mattered: the *online* EDF-with-slicing scheduler,
which the simulator predicted would win ``gpu-faas-goodput``, met only 0.09-0.21 of the
deadlines while EDF+drop met 0.56-0.88. Every slice pays host costs (a launch through CuPy,
a polling ``wait``) while the GPU sits idle for that client, and neighbours run concurrently
on the real GPU rather than in hypervisor time slices. A :class:`Calibration` is the set of
these constants; :data:`CALIBRATIONS` holds the original assumptions and the H100 fit, so the
two can be compared (``benchmarks/bench_gpu_faas.py``, ``tests/unit/test_gpu_calibration.py``).

H100 SOURCES (BENCHMARKS.md, section "GPU, real backend (CuPy on an NVIDIA H100 80GB HBM3,
driver 580.159.04, CuPy 14.2)"; commands there: ``pytest -m gpu tests/gpu``,
``benchmarks/bench_gpu.py --backend cupy``, ``symbiont experiment run NAME --param
backend=cupy``):

* ``flops_efficiency`` 0.785: ``gpu-elastic`` (phase_s=0.25, kernel_ms=2): "the critical client
  reached 0.80x share x peak at share 0.25 and 0.77x at 0.5"; the mean of the two. The CuPy work
  kernel (dependent FMA chains) does not reach the spec-sheet FP32 peak.
* ``share_change`` "kernel": the CuPy backend applies a new share to kernels launched after the
  change; the bench line "vertical scaling in-process, p50 ... control 0.06 ms + device effect
  12.3 ms: the 2 ms kernels queued before the change drain at the old share". With this rule,
  ``flops_efficiency`` and ``spatial-strict`` sharing (SM masking lends no SMs) the simulator
  gives 13.3 ms for the same scenario (tested: 10-15 ms); the old rule (the share applies at
  the next wave end) gave 0.05 ms.
* ``d2d_bw_factor`` 0.97 and ``d2d_latency_s`` 77 us: ``gpu-scaling-overhead`` downtime 0.58 /
  0.72 / 1.23 ms at 16 MiB / 256 MiB / 1 GiB in 4 buffers, and the bench's 0.49 ms for one
  256 MiB buffer. The slope, 0.645 us per MiB, is a copy at 1.63 TB/s = 2 x bytes / (0.97 x
  3350 GB/s); the intercepts (0.56 ms for 4 copies, 0.33 ms for 1) give 77 us per copy.
* ``launch_s`` 300 us and ``poll_s`` 100 us: no microbenchmark of them was recorded; they are
  *fitted* to the ``gpu-faas-goodput`` line ("edf+drop 0.84-0.88 / 0.77-0.80 / 0.67 /
  0.56-0.58, edf-slice-offline 0.91 / 0.73-0.86 / 0.61-0.67 / 0.46-0.49, fcfs 0.78 / 0.38 /
  0.09 / 0.06 ... The online edf-slice ... (0.09-0.21)"), by least squares over a grid (launch
  25-300 us x poll 25-250 us) of the same workload (seed 0, loads 0.5-1.4). The simulator
  then gives edf-slice-v1 0.19 / 0.11 / 0.22 / 0.15, edf+drop 0.81 / 0.71 / 0.62 / 0.54,
  offline 0.91 / 0.80 / 0.68 / 0.65, fcfs 0.72 / 0.23 / 0.06 / 0.04. The fit is shallow: any
  per-slice total of 0.2-0.55 ms fits about as well, and the best eight all had launch
  200-300 us. Plausible for the CuPy path: one slice is a scheduler decision in Python, a
  launch (a counter allocation, two events, a memset and the kernel: five CuPy calls), a
  timing read (two ``cudaEventElapsedTime``) and a ``wait`` that polls with
  ``time.sleep(50 us)``, which Linux stretches by its default 50 us timer slack.
  ``bench_gpu_faas.py --backend cupy`` measures launch, poll and gap directly: record them on
  the next GPU run and replace the fit.
* ``sharing`` "spatial": on the GPU the background VM was a second CUDA stream running
  concurrently (the CuPy backend has no hypervisor time slicer), and both contexts had share
  1.0, so before the ``sm_ranges`` fix their SM ranges overlapped; the simulator's work
  conserving ``spatial`` mode is the closest model. The original ``timeslice-best-effort``
  stays in the old set. The two causes are separable: the H100 costs alone, on time slicing,
  also make edf-slice-v1 lose (``bench_gpu_faas.py`` prints both).

What is *not* recalibrated: the spec-sheet constants of :data:`.simulated.GPU_TYPES` (SMs,
clock, memory bandwidth), PCIe bandwidth (the only H100 copy figure, 0.038 s per 256 MiB,
includes pageable-to-pinned staging on one core, so it does not isolate the link), the
time-slice quantum and switch cost (no vGPU time slicer was measured).
"""

from __future__ import annotations

from dataclasses import dataclass

from symbiont.gpu.backend import GpuError

SHARE_CHANGE_MODES = ("wave", "kernel")


@dataclass(frozen=True)
class Calibration:
    """Host and device costs the simulator charges beyond the spec-sheet roofline."""

    name: str
    launch_s: float  # submit -> dispatchable: host work of one launch (GPU idle for this stream)
    poll_s: float  # completion -> the host's ``wait`` returns (polling latency)
    flops_efficiency: float  # achieved fraction of the spec FP32 peak by a compute-bound kernel
    share_change: str  # "wave": at the next wave end; "kernel": kernels launched after the change
    d2d_latency_s: float  # fixed cost of one device-to-device copy on one device
    d2d_bw_factor: float  # effective fraction of the memory bandwidth for a device-local copy
    sharing: str  # how co-located VMs share a GPU in the FaaS experiment (a simulated sched mode)
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("launch_s", "poll_s", "d2d_latency_s"):
            if not getattr(self, key) >= 0:
                raise GpuError(f"calibration {self.name}: {key} must be >= 0")
        if not (0 < self.flops_efficiency <= 1 and 0 < self.d2d_bw_factor <= 1):
            raise GpuError(f"calibration {self.name}: efficiencies must be in (0, 1]")
        if self.share_change not in SHARE_CHANGE_MODES:
            raise GpuError(f"calibration {self.name}: share_change must be one of {', '.join(SHARE_CHANGE_MODES)}")

    @property
    def slice_overhead_s(self) -> float:
        """Idle time one extra kernel slice costs its stream: launch plus noticing the end."""
        return self.launch_s + self.poll_s

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "launch_us": round(self.launch_s * 1e6, 2),
            "poll_us": round(self.poll_s * 1e6, 2),
            "flops_efficiency": self.flops_efficiency,
            "share_change": self.share_change,
            "d2d_latency_us": round(self.d2d_latency_s * 1e6, 2),
            "d2d_bw_factor": self.d2d_bw_factor,
            "sharing": self.sharing,
            "source": self.source,
        }


#: The original assumptions (docs/gpu.md, "Assumptions"): what predicted that online
#: EDF-with-slicing would win on a time-sliced vGPU.
SPEC_ASSUMED = Calibration(
    name="spec-assumed",
    launch_s=5e-6,
    poll_s=0.0,
    flops_efficiency=1.0,
    share_change="wave",
    d2d_latency_s=5e-6,
    d2d_bw_factor=1.0,
    sharing="timeslice-best-effort",
    source="assumptions of the first simulator (launch 5 us, immediate completion, spec peak)",
)

#: Fitted to the H100 run of 2026-11-22 (see the module docstring for each constant's line).
H100_2026_11 = Calibration(
    name="h100-2026-11",
    launch_s=300e-6,
    poll_s=100e-6,
    flops_efficiency=0.785,
    share_change="kernel",
    d2d_latency_s=77e-6,
    d2d_bw_factor=0.97,
    sharing="spatial",
    source="BENCHMARKS.md, GPU real backend, NVIDIA H100 80GB HBM3, CuPy 14.2, 2026-11-22",
)

CALIBRATIONS: dict[str, Calibration] = {c.name: c for c in (SPEC_ASSUMED, H100_2026_11)}
DEFAULT_CALIBRATION = H100_2026_11.name


def get_calibration(name: str | Calibration | None) -> Calibration:
    """A calibration by name (None: the default, the H100 fit)."""
    if isinstance(name, Calibration):
        return name
    key = (name or DEFAULT_CALIBRATION).strip().lower()
    if key not in CALIBRATIONS:
        raise GpuError(f"unknown calibration {name!r}; known: {', '.join(CALIBRATIONS)}")
    return CALIBRATIONS[key]


@dataclass(frozen=True)
class SliceCosts:
    """What one slice costs on a backend, measured the way :func:`.faas.run_faas` uses it."""

    backend: str
    launch_wall_s: float  # median host time inside ``launch()``
    poll_s: float  # median time from a kernel's end (its event) to ``wait()`` returning
    gap_s: float  # median idle time between back-to-back slices: what one more slice costs
    h2d_gbs: float  # one 256 MiB host-to-device copy (pinned staging on CuPy), GB/s

    @property
    def launch_s(self) -> float:
        """The calibration's ``launch_s``: the part of the gap that is not polling."""
        return max(0.0, self.gap_s - self.poll_s)

    def as_dict(self) -> dict[str, float | str]:
        return {"backend": self.backend, "launch_wall_us": round(self.launch_wall_s * 1e6, 2),
                "poll_us": round(self.poll_s * 1e6, 2), "gap_us": round(self.gap_s * 1e6, 2),
                "launch_us": round(self.launch_s * 1e6, 2), "h2d_gbs": round(self.h2d_gbs, 2)}  # fmt: skip


def measure_slice_costs(backend: object, n: int = 200, device: int = 0, kernel_s: float = 50e-6) -> SliceCosts:
    """Launch ``n`` short kernels one at a time, as the FaaS loop does, and time the gaps.

    Run on CuPy this measures ``launch_s`` and ``poll_s`` directly (they are fitted today);
    run on the simulator it gives back its calibration, which is how it is tested.
    """
    import statistics

    from symbiont.gpu.backend import GpuBackend, KernelSpec

    b: GpuBackend = backend  # type: ignore[assignment]
    gpu = b.devices()[device].gpu_type
    ctx = b.create_context(device, 1.0, label="calibrate")
    k = KernelSpec.from_time(kernel_s, gpu, blocks=gpu.sm_count, name="calibrate")
    try:
        b.wait_all([b.launch(ctx, k)])  # warm up (compilation, pools)
        launches, polls, gaps = [], [], []
        prev_end: float | None = None
        for _ in range(n):
            t0 = b.now()
            op = b.launch(ctx, k)
            launches.append(b.now() - t0)
            while not b.wait([op]):
                pass
            t_seen = b.now()
            tm = b.timing(op)
            polls.append(t_seen - tm.end)
            if prev_end is not None:
                gaps.append(tm.start - prev_end)
            prev_end = tm.end
        buf = b.alloc(ctx, 256 << 20)
        op = b.memcpy_h2d(buf)
        b.wait_all([op])
        h2d = (256 << 20) / b.timing(op).duration / 1e9
        b.free(buf)
    finally:
        b.synchronize(ctx)
        b.destroy_context(ctx)
    return SliceCosts(b.name, statistics.median(launches), statistics.median(polls), statistics.median(gaps), h2d)
