"""Each placement experiment once, with tiny parameters, through the experiment framework."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from symbiont_research.experiments.framework import ExperimentError, registry, run_experiment


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def check_record(out: Path, files: list[str]) -> dict:
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "ok"
    for f in files:
        assert (out / f).exists() and f in rec["files"], f
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:4] == b"\x89PNG"
    return rec


def test_registered() -> None:
    reg = registry()
    for name in ("placement-heuristics", "placement-overcommit", "placement-hotspots"):
        assert name in reg and reg[name].part == "placement"


def test_heuristics_experiment(tmp_path: Path) -> None:
    out, summary = run_experiment(
        "placement-heuristics",
        [
            "seeds=1",
            "mixes=azure",
            "heuristics=first-fit,best-fit,ffd-sum",
            "n_vms=40",
            "trace_vms=40",
            "bound_time_limit=2",
        ],
        results_root=tmp_path,
        show_progress=False,
    )
    check_record(out, ["packing.csv", "trace_replay.csv", "heuristics.png"])
    pk = rows(out / "packing.csv")
    assert len(pk) == 3 * 2  # heuristics x modes
    for r in pk:
        assert int(r["lower_bound"]) <= int(r["hosts_used"])
        assert float(r["ratio"]) == pytest.approx(int(r["hosts_used"]) / int(r["lower_bound"]), abs=1e-3)
        assert int(r["placed"]) == 40
    # ffd-sum in batch mode is first fit after sorting by the same key as first-fit's batch order
    by = {(r["heuristic"], r["mode"]): r["hosts_used"] for r in pk}
    assert by[("ffd-sum", "batch")] == by[("first-fit", "batch")]
    tr = rows(out / "trace_replay.csv")
    assert {r["heuristic"] for r in tr} == {"first-fit", "best-fit", "ffd-sum"}
    assert all(0 <= float(r["rejection_rate"]) <= 1 and float(r["us_per_decision"]) > 0 for r in tr)
    assert summary["best_batch"] in ("first-fit", "best-fit", "ffd-sum")


def test_overcommit_experiment(tmp_path: Path) -> None:
    out, summary = run_experiment(
        "placement-overcommit",
        ["ratios=1.0,4.0", "n_vms=60", "n_hosts=1"],
        results_root=tmp_path,
        show_progress=False,
    )
    check_record(out, ["overcommit.csv", "overcommit_timeseries.csv", "overcommit.png"])
    r1, r4 = rows(out / "overcommit.csv")
    # more overcommit on one host admits more VMs (fewer rejections) and never less overload
    assert int(r4["rejected"]) < int(r1["rejected"])
    assert float(r4["overload_minutes"]) >= float(r1["overload_minutes"])
    assert float(r1["overload_minutes"]) == 0.0  # without overcommit usage never exceeds capacity
    assert len(summary["rows"]) == 2


def test_hotspots_experiment(tmp_path: Path) -> None:
    out, summary = run_experiment(
        "placement-hotspots",
        ["n_vms=80", "n_hosts=6", "cpu_ratio=4.0", "horizon=240", "burst_fraction=0.5"],
        results_root=tmp_path,
        show_progress=False,
    )
    check_record(out, ["hotspots.csv", "hotspots_timeseries.csv", "migrations.csv", "hotspots.png"])
    assert summary["off"]["migrations"] == 0
    assert summary["off"]["overload_minutes"] > 0
    for det in ("black-box", "gray-box"):
        assert summary[det]["migrations"] > 0
        assert summary[det]["overload_minutes"] < summary["off"]["overload_minutes"]
    moves = rows(out / "migrations.csv")
    assert all(m["from"] != m["to"] and "hot" in m["reason"] for m in moves)


def test_bad_parameter_is_an_experiment_error(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="unknown heuristic 'nope'"):
        run_experiment(
            "placement-heuristics", ["heuristics=nope"], results_root=tmp_path, show_progress=False
        )


def test_standard_instances_experiment(tmp_path: Path) -> None:
    assert "placement-standard-instances" in registry()
    out, summary = run_experiment(
        "placement-standard-instances",
        [
            "source=generated",
            "per_class=1",
            "families=gen-falkenauer-t,gen-scholl1",
            "heuristics=first-fit,ffd-sum",
            "improve_time=0.3",
        ],  # fmt: skip
        results_root=tmp_path,
        show_progress=False,
    )
    check_record(out, ["instances.csv", "standard_instances.png"])
    r = rows(out / "instances.csv")
    assert len(r) == 2 * 2 * 2  # instances x heuristics x (with, without improvement)
    t = {(x["heuristic"], x["improve"]): x for x in r if x["family"] == "gen-falkenauer-t"}
    assert t[("ffd-sum", "False")]["reference_kind"] == "optimum"
    assert int(t[("ffd-sum", "True")]["hosts_used"]) <= int(t[("ffd-sum", "False")]["hosts_used"])
    assert all(float(x["ratio"]) >= 1.0 for x in r)  # never below the optimum or a valid bound
    assert summary["gen-falkenauer-t/ffd-sum+improve"] <= summary["gen-falkenauer-t/ffd-sum"]
    out, summary = run_experiment(
        "placement-standard-instances",
        ["source=bpplib", "families=scholl3", "heuristics=ffd-sum", "improve_time=0.3"],
        results_root=tmp_path / "bpplib",  # runs are named by the second: the first may end within it
        show_progress=False,
    )
    r = rows(out / "instances.csv")
    assert len(r) == 10 * 2 and {x["reference_kind"] for x in r} == {"optimum"}  # Scholl's 10 hard ones
    assert summary["scholl3/ffd-sum+improve"] < summary["scholl3/ffd-sum"]
    with pytest.raises(ExperimentError, match="unknown family"):
        run_experiment(
            "placement-standard-instances", ["families=nope"], results_root=tmp_path, show_progress=False
        )
