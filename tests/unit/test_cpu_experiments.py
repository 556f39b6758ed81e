"""The CPU part's experiments: registration, parameter checks and the plots (on synthetic rows;
the runs themselves boot a VM and are exercised by ``symbiont experiment run``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiont_research.experiments import cpu as ex
from symbiont_research.experiments.framework import ExperimentError, RunContext, registry


def test_registered_with_small_defaults() -> None:
    reg = registry()
    for name in ("ct-cpu-ratio", "ct-mem-ratio"):
        assert name in reg and reg[name].part == "cpu" and reg[name].needs == {"root", "libvirt", "vm"}
    assert reg["ct-cpu-ratio"].params["step_s"] <= 30  # a few minutes per run by default


def test_parameter_checks() -> None:
    assert ex._ratios("1:1:4") == [1.0, 1.0, 4.0]
    for bad in ("1:x", "0:1", ""):
        with pytest.raises(ExperimentError):
            ex._ratios(bad)
    assert ex.burner(2)[-1].count("while") == 2
    assert "count=5" in ex.filler("a", 5)[-1]


def ctx(tmp_path: Path, name: str) -> RunContext:
    return RunContext(registry()[name], {}, tmp_path, None)


def test_plots_from_synthetic_rows(tmp_path: Path) -> None:
    rows = []
    for mode in ("agnostic", "aware"):
        for t, level in enumerate((4, 4, 3, 3, 2, 2, 1, 1)):
            for n, r in (("c1", 1), ("c2", 1), ("c3", 4)):
                rows.append({"mode": mode, "t_s": float(t), "vcpus": level, "container": n, "ratio": r,
                             "cpus_used": level * r / 6, "share": r / 6, "expected_share": r / 6})
    c = ctx(tmp_path, "ct-cpu-ratio")
    ex._plot_cpu(c, rows, ["agnostic", "aware"], ["c1", "c2", "c3"], [4, 3, 2, 1], {"c1": 1, "c2": 1, "c3": 4})
    assert (tmp_path / "cpu_utilisation.png").stat().st_size > 1000
    mem = []
    for mode in ("stock", "aware"):
        for b in (512, 448, 384):
            for n, s in (("m1", 1), ("m2", 3), ("keep", "no-reclaim")):
                mem.append({"mode": mode, "balloon_mib": b, "container": n, "shares": s, "usage_mib": b / 10,
                            "usage_ratio": 1 / 3})
    c = ctx(tmp_path, "ct-mem-ratio")
    ex._plot_mem(c, mem, ["stock", "aware"], 512, [448, 384])
    assert (tmp_path / "memory_usage_ratio.png").stat().st_size > 1000
