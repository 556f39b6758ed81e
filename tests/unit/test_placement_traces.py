"""Trace CSV format and the seeded generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from symbiont.placement.traces import AZURE_MIX, Event, generate, make_trace, read_csv, sizes, write_csv

EXAMPLE = Path(__file__).resolve().parents[2] / "daemon" / "symbiont" / "placement" / "examples" / "trace.csv"


def test_roundtrip(tmp_path: Path) -> None:
    tr = generate(30, seed=3, horizon=600, interval=10)
    p = write_csv(tr, tmp_path / "t.csv")
    back = read_csv(p)
    assert back.dims == tr.dims
    assert len(back.events) == len(tr.events)
    for a, b in zip(tr.events, back.events, strict=True):
        assert (a.kind, a.vm) == (b.kind, b.vm)
        assert a.time == pytest.approx(b.time, rel=1e-5)
        if a.values is not None:
            np.testing.assert_allclose(a.values, b.values, rtol=1e-5)
    reqs = {r.id: r for r in back.requests()}
    assert len(reqs) == 30
    depart = {e.vm: e.time for e in back.events if e.kind == "depart"}
    assert all(reqs[v].end == pytest.approx(t) for v, t in depart.items())  # end filled from departures


def test_generator_is_deterministic_per_seed() -> None:
    a, b, c = generate(50, seed=1), generate(50, seed=1), generate(50, seed=2)

    def key(tr: object) -> list[tuple]:
        return [(e.time, e.kind, e.vm, None if e.values is None else tuple(e.values)) for e in tr.events]  # type: ignore[attr-defined]

    assert key(a) == key(b)
    assert key(a) != key(c)


def test_azure_mix_proportions() -> None:
    # 20,000 draws: each (cores, GiB) menu entry appears with its documented weight (+-1.5 points).
    s = sizes(20_000, np.random.default_rng(0), "azure", ("cpu", "mem", "net"))
    for cores, mem, prob in AZURE_MIX:
        frac = np.mean((s[:, 0] == cores) & (s[:, 1] == mem))
        assert abs(frac - prob) < 0.015, (cores, mem, frac, prob)
    np.testing.assert_allclose(s[:, 2], 200.0 * s[:, 0])  # net = 200 Mbit/s per core


def test_generated_usage_is_within_allocation_and_lifetimes_are_consistent() -> None:
    tr = generate(40, seed=4, horizon=1000, interval=5, burst_fraction=0.5)
    alloc = {e.vm: e.values for e in tr.events if e.kind == "arrive"}
    life: dict[str, list[float]] = {}
    for e in tr.events:
        life.setdefault(e.vm, []).append(e.time)
        if e.kind == "usage":
            assert np.all(e.values <= alloc[e.vm] + 1e-9) and np.all(e.values >= 0)
    kinds = [e.kind for e in tr.events if e.vm == "vm00000"]
    assert kinds[0] == "arrive" and kinds[-1] == "depart" and set(kinds[1:-1]) == {"usage"}
    assert max(e.time for e in tr.events) <= 1000


def test_example_trace_reads() -> None:
    tr = read_csv(EXAMPLE)
    assert tr.dims == ("cpu", "mem", "net")
    assert len(tr.requests()) == 40


@pytest.mark.parametrize(
    "text, message",
    [
        ("time,event,vm_id\n0,arrive,a\n", "no resource columns"),
        ("time,vm_id,cpu\n0,a,1\n", "missing column 'event'"),
        ("time,event,vm_id,cpu\nzero,arrive,a,1\n", r":2: column time: 'zero' is not a number"),
        ("time,event,vm_id,cpu\n0,arrive,a,1\n1,explode,a,\n", r":3: unknown event 'explode'"),
        ("time,event,vm_id,cpu\n0,usage,a,1\n1,arrive,a,1\n", "usage of a at 0 before it arrives"),
        ("time,event,vm_id,cpu\n0,arrive,a,-1\n", r":2: negative value for cpu"),
        ("time,event,vm_id,cpu\n0,arrive,a,1\n1,arrive,a,1\n", "a arrives twice"),
        (
            "time,event,vm_id,cpu\n0,arrive,a,1\n5,depart,a,\n6,usage,a,1\n",
            "usage of a at 6 after it departed",
        ),
        ("", "empty file"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_csv(p)


def test_same_time_order_is_depart_arrive_usage() -> None:
    tr = make_trace(
        ("cpu",),
        [
            Event(5, "usage", "b", np.array([1.0])),
            Event(5, "arrive", "b", np.array([1.0])),
            Event(0, "arrive", "a", np.array([1.0])),
            Event(5, "depart", "a"),
        ],
    )
    assert [(e.time, e.kind, e.vm) for e in tr.events] == [
        (0, "arrive", "a"),
        (5, "depart", "a"),
        (5, "arrive", "b"),
        (5, "usage", "b"),
    ]
    # so a usage sample at the departure time comes after the departure, which is an error
    with pytest.raises(ValueError, match="after it departed"):
        make_trace(
            ("cpu",),
            [
                Event(0, "arrive", "a", np.array([1.0])),
                Event(5, "depart", "a"),
                Event(5, "usage", "a", np.array([1.0])),
            ],
        )


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown mix 'aws'"):
        generate(5, mix="aws")
    with pytest.raises(ValueError, match="knows no resource 'tpu'"):
        generate(5, dims=("cpu", "tpu"))


def test_standard_instances_are_seeded_and_triplets_have_their_optimum() -> None:
    from symbiont.placement.traces import standard_instances, triplet_instance

    a = standard_instances(per_class=1)
    b = standard_instances(per_class=1)
    assert [i.name for i in a] == [i.name for i in b]
    assert all(np.array_equal(x.sizes, y.sizes) for x, y in zip(a, b, strict=True))
    w, cap, opt = triplet_instance(60, seed=4)
    assert len(w) == 60 and opt == 20 and w.sum() == cap * opt  # every host exactly full
    assert w.min() >= 250 and w.max() < cap / 2
    for inst in a:
        if inst.optimum is not None:  # by construction: the volume meets the optimum in each dimension
            assert np.allclose(inst.sizes.sum(axis=0), inst.capacity * inst.optimum)


def test_load_bpplib(tmp_path: Path) -> None:
    from symbiont.placement.traces import load_bpplib

    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "x.txt").write_text("3\n10\n6\n5\n4\n")
    (tmp_path / "optima.tsv").write_text("fam/x.txt\t2\t2\n")
    (inst,) = load_bpplib(tmp_path)
    assert (inst.name, inst.family, inst.optimum, inst.capacity.tolist()) == ("x", "fam", 2, [10.0])
    (tmp_path / "fam" / "y.txt").write_text("3\n10\n6\n5\n")
    with pytest.raises(ValueError, match="y.txt: expected the item count"):
        load_bpplib(tmp_path)
    stored = load_bpplib(Path(__file__).resolve().parents[2] / "benchmarks" / "instances" / "bpplib")
    assert len(stored) == 110 and all(i.optimum for i in stored)
    assert {i.family for i in stored} == {"scholl1", "scholl2", "scholl3", "falkenauer_t", "falkenauer_u"}
