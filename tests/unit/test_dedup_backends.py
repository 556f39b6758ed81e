"""Hashing backends: CPU and simulated GPU agree bit for bit (and with the scalar specification);
the simulated GPU's cost model is the documented one; selection is automatic and forceable."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.dedup import backends as B
from symbiont.gpu.simulated import GPU_TYPES


def _structured_pages(seed: int = 0, n: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 256, size=(n, B.PAGE_SIZE), dtype=np.uint8)
    w = p.view(np.uint64)
    p[:20] = 0
    w[20:40] = 0
    w[20:40, 5] = np.uint64(1 << 63)  # high-bit-only differences
    w[40:60] = np.uint64(0xFFFFFFFFFFFFFFFF)
    w[60:80] = np.arange(512, dtype=np.uint64)
    p[80:90] = p[100]  # duplicates
    return p


def test_cpu_matches_the_scalar_specification() -> None:
    p = _structured_pages(n=120)
    h = B.xsm64_cpu(p)
    for i in (0, 20, 25, 40, 60, 85, 100, 119):
        assert int(h[i]) == B.xsm64_scalar(p[i].tobytes())
    assert int(h[0]) == 0  # a zero page hashes to 0
    assert len({int(x) for x in h[80:90]} | {int(h[100])}) == 1


def test_cpu_and_simulated_gpu_agree_bit_for_bit() -> None:
    p = _structured_pages()
    cpu, sim = B.CpuBackend(), B.SimulatedGpuBackend("H100")
    h1, h2 = cpu.hash_pages(p), sim.hash_pages(p)
    assert h1.dtype == h2.dtype == np.uint64 and np.array_equal(h1, h2)
    # batching does not matter either
    h3 = np.concatenate([sim.hash_pages(p[i : i + 7]) for i in range(0, p.shape[0], 7)])
    assert np.array_equal(h1, h3)
    keys = np.concatenate([h1, h1[:50]])  # ties: stability decides the order
    assert np.array_equal(cpu.argsort(keys), sim.argsort(keys))
    assert np.array_equal(cpu.argsort(keys), np.argsort(keys, kind="stable"))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 511), st.integers(0, 63))
def test_property_a_one_bit_change_changes_the_hash(seed: int, word: int, bit: int) -> None:
    a = np.random.default_rng(seed).integers(0, 256, size=(1, B.PAGE_SIZE), dtype=np.uint8)
    page = a.tobytes()
    b = a.copy()
    b.view(np.uint64)[0, word] ^= np.uint64(1 << bit)
    ha, hb = B.xsm64_cpu(a)[0], B.SimulatedGpuBackend().hash_pages(b)[0]
    assert ha != hb  # a single-word difference d*K (K odd, d != 0 after the bijective xor-shift) is never 0
    assert int(ha) == B.xsm64_scalar(page)


def test_native_kernel_is_built_here_and_agrees_with_numpy_bit_for_bit() -> None:
    """The compiled loop (issue 18 item 4: >= 0.5x memcpy per core) must give numpy's bits: on
    structured pages, random ones, an unaligned buffer and odd batch sizes."""
    from symbiont.dedup import native

    assert native.load() is not None, native.why()  # the test host has a C compiler (bootstrap)
    assert B.cpu_kernel() == "native" and B.CpuBackend().describe()["cpu_kernel"] == "native"
    p = np.concatenate([_structured_pages(1), np.random.default_rng(5).integers(0, 256, (333, B.PAGE_SIZE),
                                                                                 dtype=np.uint8)])  # fmt: skip
    ref = B.xsm64_numpy(p)
    assert np.array_equal(B.xsm64_cpu(p), ref)
    for i in (0, 20, 25, 40, 300, 632):
        assert int(B.xsm64_cpu(p[i : i + 1])[0]) == B.xsm64_scalar(p[i].tobytes()) == int(ref[i])
    raw = bytearray(p.nbytes + 1)
    raw[1:] = p.tobytes()
    unaligned = np.frombuffer(raw, dtype=np.uint8, offset=1).reshape(-1, B.PAGE_SIZE)
    assert unaligned.ctypes.data % 8 != 0 and np.array_equal(B.xsm64_cpu(unaligned), ref)
    assert np.array_equal(np.concatenate([B.xsm64_cpu(p[i : i + 7]) for i in range(0, len(p), 7)]), ref)
    assert B.xsm64_cpu(p[:0]).shape == (0,)


def test_without_the_native_kernel_the_numpy_one_gives_the_same_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    from symbiont.dedup import native

    p = _structured_pages(2)
    want = B.xsm64_cpu(p)
    monkeypatch.setattr(native.LIB, "_tried", False)
    monkeypatch.setattr(native.LIB, "_loaded", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert native.load() is None and "no C compiler" in native.why()
    assert B.cpu_kernel() == "numpy" and np.array_equal(B.xsm64_cpu(p), want)
    monkeypatch.setattr(native.LIB, "_tried", False)
    monkeypatch.setenv("SYMBIONT_NATIVE_HASH", "0")
    assert native.load() is None and "SYMBIONT_NATIVE_HASH=0" in native.why()


def test_high_bit_differences_do_not_collide() -> None:
    # pure multilinear hashing mod 2**64 maps a 2**63 difference in two words to 0; xsm64 does not
    p = np.zeros((64, B.PAGE_SIZE), dtype=np.uint8)
    w = p.view(np.uint64)
    for i in range(1, 64):
        w[i, i] = w[i, (i + 7) % 512] = np.uint64(1 << 63)
    assert len(set(B.xsm64_cpu(p).tolist())) == 64


def test_simulated_cost_model_is_the_documented_one() -> None:
    sim = B.SimulatedGpuBackend("A100")
    g = GPU_TYPES["A100"]
    n = 4096
    p = np.zeros((n, B.PAGE_SIZE), dtype=np.uint8)
    sim.hash_pages(p)
    s = sim.stats
    nbytes = n * B.PAGE_SIZE
    assert s.h2d_s == pytest.approx(g.pcie_latency_s + nbytes / g.pcie_bw)
    assert s.d2h_s == pytest.approx(g.pcie_latency_s + 8 * n / g.pcie_bw)
    mem = nbytes / (B.MEM_EFFICIENCY * g.mem_bw)
    alu = n * B.OPS_PER_PAGE / (g.sm_count * B.INT32_LANES_PER_SM * g.clock_ghz * 1e9)
    assert s.kernel_s == pytest.approx(g.launch_overhead_s + max(mem, alu))
    assert mem > alu  # memory-bound on the preset
    assert s.device_s == pytest.approx(s.h2d_s + s.kernel_s + s.d2h_s)
    assert s.transfer_bytes == nbytes + 8 * n and s.pages == n and s.batches == 1
    # PCIe dominates: the modelled time is close to bytes / link bandwidth
    assert s.device_s == pytest.approx(nbytes / g.pcie_bw, rel=0.1)
    before = s.device_s
    sim.argsort(np.arange(1000, dtype=np.uint64))
    assert s.sort_s == pytest.approx(B.RADIX_PASSES * (g.launch_overhead_s + 2 * 1000 * 16 / (B.MEM_EFFICIENCY * g.mem_bw)))
    assert s.device_s > before
    # a faster link and memory: less modelled time for the same work
    assert B.SimulatedGpuBackend("H100").batch_seconds(n) < B.SimulatedGpuBackend("T4").batch_seconds(n)
    d = sim.describe()
    assert d["gpu"] == "A100" and d["model"]["overlap"] is False and d["stats"]["pages"] == n


def test_selection_is_automatic_and_forceable() -> None:
    avail = B.available_backends()
    assert avail["cpu"]["available"] and avail["simulated-gpu"]["available"]
    auto = B.select_backend("auto")
    assert auto.name == ("cupy" if avail["cupy"]["available"] else "cpu")
    assert B.select_backend("cpu").name == "cpu"
    assert B.select_backend("simulated").name == "simulated-gpu"
    assert B.select_backend("simulated-gpu", "t4").gpu.name == "T4"  # type: ignore[attr-defined]
    with pytest.raises(B.BackendError, match="unknown hashing backend"):
        B.select_backend("tpu")
    with pytest.raises(B.BackendError, match="unknown GPU type"):
        B.select_backend("simulated-gpu", "Z9")
    if not avail["cupy"]["available"]:
        with pytest.raises(B.BackendError, match="needs a CUDA GPU"):
            B.select_backend("cupy")


def test_bad_page_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(n, 4096\) uint8"):
        B.xsm64_cpu(np.zeros((2, 100), dtype=np.uint8))
    assert B.as_pages(bytes(2 * B.PAGE_SIZE)).shape == (2, B.PAGE_SIZE)
    assert B.as_pages(np.zeros(B.PAGE_SIZE // 8, dtype=np.uint64)).shape == (1, B.PAGE_SIZE)


@pytest.mark.gpu
def test_cupy_agrees_bit_for_bit_with_cpu() -> None:
    cu = B.select_backend("cupy")
    p = _structured_pages(n=2048)
    assert np.array_equal(cu.hash_pages(p), B.xsm64_cpu(p))
    keys = np.concatenate([B.xsm64_cpu(p), B.xsm64_cpu(p[:100])])
    assert np.array_equal(cu.argsort(keys), np.argsort(keys, kind="stable"))
    assert cu.stats.device_s > 0 and cu.stats.h2d_s > 0
