"""FaaSter-style profiling and dispatch over heterogeneous GPUs."""

from __future__ import annotations

import pytest

# isort: split
from symbiont.gpu.dispatch import (
    DEFAULT_FUNCTIONS,
    Dispatcher,
    FunctionModel,
    Invocation,
    _run_once,
    profile_functions,
    run_dispatch,
    synthetic_invocations,
)
from symbiont.gpu.simulated import SimulatedBackend

IDEAL = "spec-assumed"  # the model's mechanics with the original, idealised costs (gpu/calibration.py)

FNS = {f.name: f for f in DEFAULT_FUNCTIONS}
GPUS = ["A100", "V100", "T4", "T4"]


@pytest.fixture(scope="module")
def profiles():
    return profile_functions(SimulatedBackend(GPUS, jitter=0.0, calibration=IDEAL), DEFAULT_FUNCTIONS, sizes=(1, 8, 64, 256), reps=1)


def test_profiles_fit_and_predict_unseen_sizes(profiles):
    b = SimulatedBackend(GPUS, jitter=0.0, calibration=IDEAL)
    for fn in DEFAULT_FUNCTIONS:
        for tname, dev in (("A100", 0), ("T4", 2)):
            p = profiles.get(fn.name, tname)
            assert p.r2 > 0.99 and p.a >= 0 and p.b > 0
            # a size that was not profiled: the line predicts the measured time within 10 %
            ctx = b.create_context(dev)
            measured = _run_once(b, ctx, fn, 128)
            assert p.predict(128) == pytest.approx(measured, rel=0.10)
            b.destroy_context(ctx)
    # heterogeneity is visible in the profiles: the memory-bound stencil suffers most on a T4
    ratio = {f: profiles.get(f, "T4").b / profiles.get(f, "A100").b for f in FNS}
    assert ratio["stencil"] > ratio["matmul"] > 1.0
    assert len(profiles.as_rows()) == len(FNS) * 3
    with pytest.raises(KeyError):
        profiles.get("nope", "A100")


def test_dispatch_follows_expected_completion(profiles):
    b = SimulatedBackend(GPUS, jitter=0.0, calibration=IDEAL)
    d = Dispatcher(b, DEFAULT_FUNCTIONS, profiles, policy="faaster-nosplit")
    inv = Invocation("i1", "matmul", 64, 0.0)
    assert d.plan(inv, 0.0) == [(0, 64)]  # idle: the fastest GPU
    d.free_at[0] = 1.0  # the A100 is busy for a second
    assert d.plan(inv, 0.0) == [(1, 64)]  # next best: the V100
    d.close()


def test_split_is_water_filled_and_only_for_sliceable_functions(profiles):
    b = SimulatedBackend(GPUS, jitter=0.0, calibration=IDEAL)
    d = Dispatcher(b, DEFAULT_FUNCTIONS, profiles, policy="faaster", split_gain=0.0)
    parts = d.plan(Invocation("i1", "matmul", 4000, 0.0), 0.0)
    assert len(parts) > 1 and sum(n for _, n in parts) == 4000
    ends = [profiles.get("matmul", d.types[dev].name).predict(n) for dev, n in parts]
    assert max(ends) - min(ends) < 0.1 * max(ends)  # all parts expected to end together
    by_dev = dict(parts)
    assert by_dev[0] > by_dev.get(2, 0)  # the A100 gets more than a T4
    assert d.plan(Invocation("i2", "inference", 4000, 0.0), 0.0) == [(0, 4000)]  # not sliceable
    d.close()


def test_faaster_beats_blind_policies(profiles):
    invs = synthetic_invocations(DEFAULT_FUNCTIONS, 600.0, 0.2, seed=4)
    res = {}
    for pol in ("faaster", "round-robin", "random", "fastest"):
        res[pol] = run_dispatch(SimulatedBackend(GPUS, seed=1, calibration=IDEAL), invs, DEFAULT_FUNCTIONS, profiles, pol)
    assert res["faaster"].invocations == len(invs)
    for pol in ("round-robin", "random", "fastest"):
        assert res["faaster"].mean_turnaround_s < res[pol].mean_turnaround_s
    assert sum(res["round-robin"].per_device.values()) == len(invs)
    assert all(r["turnaround_ms"] > 0 for r in res["faaster"].rows)


def test_unknown_policy_and_function(profiles):
    b = SimulatedBackend(GPUS, calibration=IDEAL)
    with pytest.raises(ValueError, match="policy"):
        Dispatcher(b, DEFAULT_FUNCTIONS, profiles, policy="magic")
    d = Dispatcher(b, DEFAULT_FUNCTIONS, profiles)
    with pytest.raises(KeyError):
        d.submit(Invocation("x", "nope", 1, 0.0), 0.0)
    k = FunctionModel("f", 1e6, 10, 10, blocks_per_item=4).kernel(3)
    assert k.blocks == 12 and k.flops == pytest.approx(3e6)
    d.close()
