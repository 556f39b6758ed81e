"""The discrete-event GPU simulator: invariants of the model, not just that it runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# isort: split
from symbiont.gpu.backend import GpuBusy, GpuError, GpuOutOfMemory, KernelSpec, UnknownHandle
from symbiont.gpu.simulated import GPU_TYPES, NET_BW, NET_LATENCY, DeviceConfig, SimulatedBackend

IDEAL = "spec-assumed"  # the model's mechanics with the original, idealised costs (gpu/calibration.py)

A100 = GPU_TYPES["A100"]
T4 = GPU_TYPES["T4"]


def kern(blocks: int, block_s: float, gpu=A100, **kw) -> KernelSpec:
    return KernelSpec(blocks=blocks, flops_per_block=block_s * gpu.sm_flops, **kw)


def test_presets_match_spec_sheet_peaks():
    # the published FP32 peaks: 19.5, 15.7, 8.1 and 67 TFLOPS
    expect = {"A100": 19.5, "V100": 15.7, "T4": 8.1, "H100": 66.9}
    for name, tflops in expect.items():
        assert GPU_TYPES[name].peak_flops / 1e12 == pytest.approx(tflops, rel=0.01)


def test_single_kernel_time_is_waves_times_block_time_plus_launch():
    b = SimulatedBackend(["A100"], jitter=0.0, calibration=IDEAL)
    c = b.create_context(0)
    # 109 blocks on 108 SMs: two waves (the tail effect)
    op = b.launch(c, kern(109, 100e-6))
    b.synchronize()
    t = b.timing(op)
    assert t.start == pytest.approx(A100.launch_overhead_s)
    assert t.duration == pytest.approx(2 * 100e-6)
    assert b.context_stats(c)["flops_done"] == pytest.approx(109 * 100e-6 * A100.sm_flops)


def test_memory_bound_blocks_follow_the_roofline():
    k = KernelSpec(blocks=1, flops_per_block=1.0, dram_bytes_per_block=1e6)
    assert k.block_time(A100) == pytest.approx(1e6 / (A100.mem_bw / A100.sm_count))
    assert k.block_time(T4) > k.block_time(A100)


@settings(max_examples=25, deadline=None)
@given(
    kernels=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 400), st.floats(5e-6, 2e-4)), min_size=1, max_size=8
    ),
    shares=st.tuples(*(st.sampled_from([0.1, 0.25, 0.5, 1.0]) for _ in range(3))),
    sched=st.sampled_from(["spatial", "spatial-strict", "timeslice-best-effort", "timeslice-fixed"]),
)
def test_work_is_conserved(kernels, shares, sched):
    b = SimulatedBackend([DeviceConfig("A100", sched=sched)], jitter=0.0, calibration=IDEAL)
    ctxs = [b.create_context(0, s) for s in shares]
    ops = [(b.launch(ctxs[i], kern(n, t)), i, n, t) for i, n, t in kernels]
    b.synchronize()
    want = [0.0, 0.0, 0.0]
    busy = 0.0
    for op, i, n, t in ops:
        assert b.done(op)
        tm = b.timing(op)
        assert tm.submit <= tm.start < tm.end
        # never faster than the whole device could do it
        assert tm.duration >= math.ceil(n / A100.sm_count) * t * (1 - 1e-9)
        want[i] += n * t * A100.sm_flops
        busy += n * t
    for i, c in enumerate(ctxs):
        assert b.context_stats(c)["flops_done"] == pytest.approx(want[i], rel=1e-9)
    dev = b.stats()["devices"][0]
    assert dev["busy_sm_s"] == pytest.approx(busy, rel=1e-9)
    # the device cannot have done more SM-seconds than it had
    assert busy <= A100.sm_count * b.now() * (1 + 1e-9)


def test_strict_partition_never_exceeds_shares_and_sets_kernel_speed():
    b = SimulatedBackend([DeviceConfig("A100", sched="spatial-strict")], jitter=0.0, record_timeline=True, calibration=IDEAL)
    small, big = b.create_context(0, 0.25), b.create_context(0, 0.75)
    k = kern(2000, 50e-6)
    o1, o2 = b.launch(small, k), b.launch(big, k)
    b.synchronize()
    caps = {small: 27, big: 81}
    assert b.guaranteed_sms(small) == 27 and b.guaranteed_sms(big) == 81
    assert all(held <= caps[ctx] for _, _, ctx, held, _ in b.timeline)
    assert b.timing(o1).duration == pytest.approx(math.ceil(2000 / 27) * 50e-6)
    assert b.timing(o2).duration == pytest.approx(math.ceil(2000 / 81) * 50e-6)


def test_work_conserving_lends_idle_sms_and_returns_them_within_a_block():
    b = SimulatedBackend([DeviceConfig("A100", sched="spatial")], jitter=0.0, record_timeline=True, calibration=IDEAL)
    lender = b.create_context(0, 0.25)
    critical = b.create_context(0, 0.75)
    block = 80e-6
    b.launch(lender, kern(108 * 200, block))
    b.advance_to(1e-3)
    assert b.held_sms(lender) == 108  # alone: it borrows the whole device
    t_arrive = b.now()
    b.launch(critical, kern(81 * 20, block))
    b.synchronize(critical)
    got = [t for t, _, ctx, held, _ in b.timeline if ctx == critical and held >= 81]
    assert got, "the critical context never reached its guarantee"
    # launch overhead, then at most one block of the borrower before SMs come back
    assert got[0] - t_arrive <= A100.launch_overhead_s + block + 1e-12
    b.synchronize()


def test_share_change_takes_effect_within_one_block():
    b = SimulatedBackend([DeviceConfig("A100", sched="spatial-strict")], jitter=0.0, calibration=IDEAL)
    c = b.create_context(0, 1.0)
    b.launch(c, kern(108 * 100, 200e-6))
    b.advance_to(1.03e-3)
    b.set_share(c, 0.5)
    assert b.share_effective_at(c) is None  # blocks in flight keep their SMs
    b.advance_to(2e-3)
    eff = b.share_effective_at(c)
    assert eff is not None and 0 < eff - 1.03e-3 <= 200e-6 + 1e-12
    assert b.held_sms(c) == 54
    b.set_share(c, 1.0)  # scale up: free SMs are granted at once
    b.advance_to(b.now())
    assert b.share_effective_at(c) == pytest.approx(b.now())
    b.synchronize()


def test_determinism_and_seed_sensitivity():
    def run(seed: int) -> list[tuple[float, float]]:
        b = SimulatedBackend([DeviceConfig("A100"), DeviceConfig("T4", sched="timeslice-best-effort")], seed=seed, calibration=IDEAL)
        ops = []
        for dev in (0, 1):
            cs = [b.create_context(dev, s) for s in (0.3, 0.7)]
            for i in range(6):
                ops.append(b.launch(cs[i % 2], kern(500 + 37 * i, 20e-6)))
        b.synchronize()
        return [(b.timing(o).start, b.timing(o).end) for o in ops]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_transfers_cost_latency_plus_bytes_over_bandwidth():
    b = SimulatedBackend(["A100"], jitter=0.0, calibration=IDEAL)
    c = b.create_context(0)
    n = 64 * 2**20
    x, y = b.alloc(c, n), b.alloc(c, n)
    one = A100.pcie_latency_s + n / A100.pcie_bw
    h1 = b.memcpy_h2d(x)
    b.synchronize()
    assert b.timing(h1).duration == pytest.approx(one)
    # two contexts copying host->device share one copy engine: the second waits
    c2 = b.create_context(0)
    z = b.alloc(c2, n)
    t0 = b.now()
    h2, h3 = b.memcpy_h2d(y), b.memcpy_h2d(z)
    b.synchronize()
    ends = sorted([b.timing(h2).end, b.timing(h3).end])
    assert ends[0] - t0 == pytest.approx(one) and ends[1] - t0 == pytest.approx(2 * one)
    # opposite directions overlap
    t0 = b.now()
    d1, d2 = b.memcpy_d2h(x), b.memcpy_h2d(z)
    b.synchronize()
    assert max(b.timing(d1).end, b.timing(d2).end) - t0 == pytest.approx(one)


def test_device_to_device_paths():
    b = SimulatedBackend(
        [DeviceConfig("A100", server="s0"), DeviceConfig("A100", server="s0"), DeviceConfig("T4", server="s1")],
        jitter=0.0, calibration=IDEAL,
    )
    cs = [b.create_context(d) for d in range(3)]
    n = 32 * 2**20
    bufs = [b.alloc(c, n) for c in cs]
    src = bufs[0]
    b.memcpy_h2d(src, bytes(range(256)) * 4)
    b.synchronize()
    p2p = b.memcpy_d2d(src, bufs[1])
    b.synchronize()
    net = b.memcpy_d2d(src, bufs[2])
    b.synchronize()
    assert b.timing(p2p).duration == pytest.approx(A100.pcie_latency_s + n / A100.pcie_bw)
    lat = A100.pcie_latency_s + NET_LATENCY + T4.pcie_latency_s
    assert b.timing(net).duration == pytest.approx(lat + n / min(A100.pcie_bw, NET_BW, T4.pcie_bw))
    back = b.memcpy_d2h(bufs[2], 1024)
    b.synchronize()
    assert bytes(b.result(back)) == bytes(range(256)) * 4


def test_time_slicing_modes():
    k = kern(108 * 10, 100e-6)  # 1 ms alone on the whole device

    def finish(sched: str, shares: tuple[float, float], busy_b: bool = True) -> tuple[float, float]:
        b = SimulatedBackend([DeviceConfig("A100", sched=sched, switch_s=0.0)], jitter=0.0, calibration=IDEAL)
        ca, cb = (b.create_context(0, s) for s in shares)
        oa = [b.launch(ca, k) for _ in range(20)]
        ob = [b.launch(cb, k) for _ in range(20)] if busy_b else []
        b.synchronize()
        return b.timing(oa[-1]).end, (b.timing(ob[-1]).end if ob else 0.0)

    # best effort: two busy contexts finish together, each at half speed
    a, c = finish("timeslice-best-effort", (0.5, 0.5))
    assert a == pytest.approx(c, rel=0.1) and a == pytest.approx(40e-3, rel=0.05)
    # fixed share 1:3: the big context finishes its 20 ms of work in about 20/0.75 ms
    a, c = finish("timeslice-fixed", (0.25, 0.75))
    assert c == pytest.approx(20e-3 / 0.75, rel=0.1)
    # equal share wastes the idle context's slices; best effort does not
    alone_eq, _ = finish("timeslice-equal", (0.5, 0.5), busy_b=False)
    alone_be, _ = finish("timeslice-best-effort", (0.5, 0.5), busy_b=False)
    assert alone_be == pytest.approx(20e-3, rel=0.01)
    assert alone_eq > 1.8 * alone_be


def test_heterogeneous_devices_run_the_same_kernel_at_their_own_speed():
    b = SimulatedBackend(["A100", "T4"], jitter=0.0, calibration=IDEAL)
    k = KernelSpec(blocks=40 * 108, flops_per_block=1e7)
    ops = [b.launch(b.create_context(d), k) for d in (0, 1)]
    b.synchronize()
    ta, tt = (b.timing(o).duration for o in ops)
    assert ta == pytest.approx(k.ideal_time(A100)) and tt == pytest.approx(k.ideal_time(T4))
    # 40 waves on the A100, 108 on the T4, each T4 wave slower by the per-SM FLOP/s ratio
    assert tt / ta == pytest.approx(108 / 40 * A100.sm_flops / T4.sm_flops)


def test_memory_accounting_and_bad_handles():
    b = SimulatedBackend(["T4"], calibration=IDEAL)
    c = b.create_context(0)
    buf = b.alloc(c, 10 * 2**30)
    with pytest.raises(GpuOutOfMemory):
        b.alloc(c, 7 * 2**30)
    with pytest.raises(GpuOutOfMemory):
        b.launch(c, KernelSpec(blocks=1, flops_per_block=1.0, mem_bytes=7 * 2**30))
    b.free(buf)
    assert b.mem_free(0) == T4.mem_bytes
    with pytest.raises(UnknownHandle):
        b.free(buf)
    with pytest.raises(UnknownHandle):
        b.memcpy_d2h(12345)
    with pytest.raises(UnknownHandle):
        b.launch(999, KernelSpec(blocks=1, flops_per_block=1.0))
    with pytest.raises(GpuError):
        b.set_share(c, 1.5)
    x = b.alloc(c, 16)
    with pytest.raises(GpuError):
        b.memcpy_h2d(x, b"x" * 17)
    b.launch(c, kern(100, 1e-3, T4))
    with pytest.raises(GpuBusy):
        b.destroy_context(c)
    b.synchronize()
    b.destroy_context(c)
    assert b.mem_free(0) == T4.mem_bytes


def test_buffers_keep_data_and_ndarrays_roundtrip():
    b = SimulatedBackend(["A100"], calibration=IDEAL)
    c = b.create_context(0)
    arr = np.arange(100, dtype=np.float32)
    x = b.alloc(c, arr.nbytes)
    b.memcpy_h2d(x, arr)
    op = b.memcpy_d2h(x)
    b.wait([op])
    assert np.array_equal(b.result(op).view(np.float32), arr)
    y = b.alloc(c, 1 << 30)  # a "virtual" GiB: no host memory is kept for it
    op = b.memcpy_d2h(y, 8)
    b.synchronize()
    assert bytes(b.result(op)) == bytes(8)


def test_wait_until_returns_empty_when_time_runs_out():
    b = SimulatedBackend(["A100"], jitter=0.0, calibration=IDEAL)
    c = b.create_context(0)
    op = b.launch(c, kern(108 * 10, 1e-3))
    assert b.wait([op], until=1e-3) == []
    assert b.now() == pytest.approx(1e-3)
    assert b.wait([op]) == [op]
