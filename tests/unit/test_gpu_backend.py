"""Backend selection and the kernel description shared by both backends."""

from __future__ import annotations

import pytest

# isort: split
from symbiont.gpu import backend as gb
from symbiont.gpu.backend import GpuUnavailable, KernelSpec, select_backend
from symbiont.gpu.simulated import GPU_TYPES, DeviceConfig, SimulatedBackend


def test_auto_falls_back_to_the_simulator_without_a_gpu(monkeypatch):
    monkeypatch.setattr(gb, "cupy_status", lambda: (False, "cupy not importable (test)"))
    b = select_backend("auto", devices=[DeviceConfig("T4")], seed=3)
    assert isinstance(b, SimulatedBackend) and b.devices()[0].gpu_type.name == "T4" and b.seed == 3
    assert isinstance(select_backend("simulated"), SimulatedBackend)
    with pytest.raises(GpuUnavailable, match="cupy backend requested but unavailable: cupy not importable"):
        select_backend("cupy")
    with pytest.raises(ValueError, match="unknown GPU backend"):
        select_backend("opencl")


def test_auto_picks_cupy_when_a_gpu_is_present(monkeypatch):
    import sys
    import types

    made = []

    class FakeCupy:
        def __init__(self):
            made.append(self)

    monkeypatch.setattr(gb, "cupy_status", lambda: (True, "1 CUDA device(s)"))
    monkeypatch.setitem(sys.modules, "symbiont.gpu.cupy_backend", types.SimpleNamespace(CupyBackend=FakeCupy))
    assert isinstance(select_backend("auto"), FakeCupy)
    assert isinstance(select_backend("cupy"), FakeCupy) and len(made) == 2


def test_cupy_status_reports_why():
    ok, why = gb.cupy_status()
    assert isinstance(ok, bool) and why


def test_kernel_spec_validation_and_slices():
    with pytest.raises(ValueError):
        KernelSpec(blocks=0, flops_per_block=1.0)
    with pytest.raises(ValueError):
        KernelSpec(blocks=1, flops_per_block=float("nan"))
    k = KernelSpec(blocks=100, flops_per_block=10.0, name="k")
    s = k.slice(40, 60)
    assert (s.blocks, s.block_offset, s.flops) == (60, 40, 600.0)
    with pytest.raises(ValueError):
        k.slice(90, 20)
    a100 = GPU_TYPES["A100"]
    f = KernelSpec.from_time(2e-3, a100, blocks=a100.sm_count * 4)
    assert f.ideal_time(a100) == pytest.approx(2e-3)
    assert f.ideal_time(a100, sms=54) == pytest.approx(4e-3)
