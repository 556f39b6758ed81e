"""The real CuPy/CUDA backend. Run only on a machine with an NVIDIA GPU:

    pip install cupy-cuda12x && pytest -m gpu tests/gpu

Every test is marked ``gpu``. A missing CuPy or GPU is a failure with a clear message, not a
silent skip: this directory is only run where a GPU is expected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# isort: split
from symbiont.gpu.backend import KernelSpec, cupy_status
from symbiont.gpu.calibration import measure_slice_costs
from symbiont.gpu.endpoint import GpuEndpointService
from symbiont.gpu.faas import parse_trace, run_trace

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cb():
    ok, why = cupy_status()
    if not ok:
        pytest.fail(f"the GPU tests need CuPy and a CUDA device ({why}); install e.g. cupy-cuda12x", pytrace=False)
    from symbiont.gpu.cupy_backend import CupyBackend

    return CupyBackend()


def kernel_for(cb, seconds: float, waves: int = 8) -> KernelSpec:
    g = cb.devices()[0].gpu_type
    return KernelSpec.from_time(seconds, g, blocks=waves * g.sm_count * cb.blocks_per_sm)


def test_devices_are_described(cb):
    devs = cb.devices()
    assert devs and devs[0].backend == "cupy"
    g = devs[0].gpu_type
    assert g.sm_count > 0 and g.mem_bytes > 2**30 and g.peak_flops > 1e12


def test_kernel_processes_every_block_exactly_once(cb):
    ctx = cb.create_context(0, 1.0)
    for share in (1.0, 0.5, 0.1):
        k = KernelSpec(blocks=12345, flops_per_block=256 * 2 * 50)
        op = cb.launch(ctx, k, share=share)
        cb.wait_all([op])
        assert cb.blocks_processed(op) == 12345
        t = cb.timing(op)
        assert t.end > t.start >= t.submit - 1e-3
    cb.destroy_context(ctx)


def test_throughput_follows_the_share(cb):
    ctx = cb.create_context(0, 1.0)
    k = kernel_for(cb, 20e-3)
    cb.wait_all([cb.launch(ctx, k)])  # compile + warm up
    times = {}
    for share in (1.0, 0.5, 0.25):
        cb.set_share(ctx, share)
        op = cb.launch(ctx, k)
        cb.wait_all([op])
        times[share] = cb.timing(op).duration
    assert times[0.5] / times[1.0] == pytest.approx(2.0, rel=0.3)
    assert times[0.25] / times[1.0] == pytest.approx(4.0, rel=0.3)
    cb.destroy_context(ctx)


def test_critical_client_keeps_its_share_beside_a_squeezed_neighbour(cb):
    """Shares adding up to more than the device must not make SM ranges overlap: a critical
    client at 1.0 beside a neighbour on its one-SM floor runs (almost) as fast as alone."""
    g = cb.devices()[0].gpu_type
    app = cb.create_context(0, 1.0, "app")
    k = kernel_for(cb, 5e-3)
    cb.wait_all([cb.launch(app, k)])  # warm up
    alone = [cb.launch(app, k) for _ in range(5)]
    cb.wait_all(alone)
    nb = cb.create_context(0, 1.0 / g.sm_count, "neighbour")
    lo_a, hi_a = cb._ctxs[app].sm_range
    lo_n, hi_n = cb._ctxs[nb].sm_range
    assert hi_a - lo_a == g.sm_count - 1 and (lo_n, hi_n) == (g.sm_count - 1, 0)
    noisy = [cb.launch(nb, k) for _ in range(2)]
    beside = [cb.launch(app, k) for _ in range(5)]
    cb.wait_all(beside)
    t_alone = max(cb.timing(o).duration for o in alone)
    t_beside = max(cb.timing(o).duration for o in beside)
    assert t_beside < 1.3 * t_alone, (t_alone, t_beside)
    cb.synchronize(nb)
    assert all(cb.blocks_processed(o) == k.blocks for o in noisy)
    cb.destroy_context(nb)
    cb.destroy_context(app)


def test_copies_roundtrip_and_cost_pcie_time(cb):
    ctx = cb.create_context(0)
    data = np.arange(1 << 20, dtype=np.uint32)
    buf = cb.alloc(ctx, data.nbytes)
    up = cb.memcpy_h2d(buf, data)
    down = cb.memcpy_d2h(buf)
    cb.wait_all([down])
    assert np.array_equal(cb.result(down).view(np.uint32), data)
    other = cb.alloc(ctx, data.nbytes)
    cp = cb.memcpy_d2d(buf, other)
    back = cb.memcpy_d2h(other, 4096)
    cb.wait_all([cp, back])
    assert np.array_equal(cb.result(back).view(np.uint32), data[:1024])
    big = cb.alloc(ctx, 256 << 20)
    op = cb.memcpy_h2d(big)
    cb.wait_all([op])
    gbs = (256 << 20) / cb.timing(op).duration / 1e9
    assert gbs > 2.0, f"H2D at {gbs:.2f} GB/s"
    assert cb.timing(up).duration > 0
    cb.synchronize(ctx)
    cb.destroy_context(ctx)


def test_vertical_scaling_takes_effect_within_250ms(cb):
    ctx = cb.create_context(0, 0.25)
    k = kernel_for(cb, 5e-3)
    ops = [cb.launch(ctx, k) for _ in range(3)]
    cb.set_share(ctx, 1.0)
    t_req = cb.now()
    ops.append(cb.launch(ctx, k))
    cb.wait_all(ops)
    eff = cb.share_effective_at(ctx)
    assert eff is not None and eff - t_req < 0.25
    cb.destroy_context(ctx)


def test_endpoint_on_a_real_gpu_migrates_buffers(cb):
    svc = GpuEndpointService(cb)
    svc.register_client("vm", 0, 0.5, mem_bytes=1 << 30)
    h = svc.alloc("vm", 64 << 20)
    svc.h2d("vm", h, b"real!" * 1000)
    svc.launch("vm", kernel_for(cb, 2e-3))
    res = svc.migrate("vm", 0)  # one GPU here: re-home on the same device, still a full copy
    assert res.downtime_s > 0 and not math.isnan(res.downtime_s)
    op = svc.d2h_submit("vm", h, 5000)
    svc.sync("vm")
    assert bytes(svc.d2h_result("vm", op)) == b"real!" * 1000
    svc.remove_client("vm")


def test_faas_trace_runs_on_the_gpu(cb):
    g = cb.devices()[0].gpu_type
    gflop = g.peak_flops * 1e-3 / 1e9  # about 1 ms each on the whole GPU
    rows = "\n".join(f"t{i},f,{i * 2.0},{5 + i % 3},{gflop:.3f},{g.sm_count * 8}" for i in range(20))
    tasks = parse_trace("task,function,arrival_ms,deadline_ms,gflop,blocks\n" + rows)
    r = run_trace(cb, tasks, "edf-slice")
    assert r.met + r.missed + r.dropped == 20
    assert r.met >= 10


def test_slice_costs_are_measured_for_the_calibration(cb):
    """What one FaaS slice costs here (launch, poll, gap): the figures that replace the fitted
    ``launch_s``/``poll_s`` of ``h100-2026-11`` (print them with ``-s``)."""
    m = measure_slice_costs(cb, n=100)
    print("slice costs:", m.as_dict())
    assert m.launch_wall_s > 0 and -1e-3 < m.poll_s < 5e-3
    assert 0 < m.gap_s < 20e-3  # (host and CUDA-event clocks may disagree by microseconds)
    assert m.h2d_gbs > 2.0
