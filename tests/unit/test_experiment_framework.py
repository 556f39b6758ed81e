"""The experiment framework: registration, parameter coercion, results folder and record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from symbiont_research.experiments import framework as fw


@fw.experiment("unit-test-exp", "squares", params={"n": 3, "scale": 1.5, "label": "x", "flag": False, "xs": [1, 2]})
def _exp(ctx: fw.RunContext) -> dict:
    ctx.stage("squaring", total=ctx.params["n"])
    rows = []
    for i in range(ctx.params["n"]):
        rows.append({"i": i, "sq": i * i * ctx.params["scale"]})
        ctx.advance()
    ctx.write_csv("squares.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([r["i"] for r in rows], [r["sq"] for r in rows])
    ctx.savefig(fig, "squares.png")
    ctx.note("done")
    return {"total": sum(r["sq"] for r in rows), "flag": ctx.params["flag"], "xs": ctx.params["xs"]}


def test_run_writes_csv_png_and_record(tmp_path: Path) -> None:
    out, summary = fw.run_experiment("unit-test-exp", ["n=4", "scale=2", "flag=yes", "xs=3,4"], tmp_path,
                                     show_progress=False)
    assert summary == {"total": 2 * (0 + 1 + 4 + 9), "flag": True, "xs": [3, 4]}
    assert out.parent == tmp_path / "unit-test-exp"
    lines = (out / "squares.csv").read_text().splitlines()
    assert lines[0] == "i,sq" and len(lines) == 5
    assert (out / "squares.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "ok" and rec["params"]["n"] == 4 and rec["notes"] == ["done"]
    assert rec["host"]["cpus"] >= 1 and "python" in rec["host"]
    assert set(rec["files"]) == {"squares.csv", "squares.png"}


@pytest.mark.parametrize(
    "override, msg",
    [("n=three", "n='three'"), ("nope=1", "unknown parameter"), ("n", "expected key=value"), ("flag=maybe", "true/false")],
)
def test_bad_overrides_are_clear(tmp_path: Path, override: str, msg: str) -> None:
    with pytest.raises(fw.ExperimentError, match=msg):
        fw.run_experiment("unit-test-exp", [override], tmp_path, show_progress=False)
    assert not (tmp_path / "unit-test-exp").exists()  # nothing written


def test_unknown_experiment(tmp_path: Path) -> None:
    with pytest.raises(fw.ExperimentError, match="unknown experiment"):
        fw.run_experiment("no-such-thing", [], tmp_path, show_progress=False)


def test_failed_run_still_records(tmp_path: Path) -> None:
    @fw.experiment("unit-test-fails", "fails")
    def _fails(ctx: fw.RunContext) -> dict:
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError):
        fw.run_experiment("unit-test-fails", [], tmp_path, show_progress=False)
    (run_dir,) = (tmp_path / "unit-test-fails").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_registry_has_the_demo() -> None:
    reg = fw.registry()
    assert "demo" in reg and {"vm", "libvirt"} <= reg["demo"].needs


def test_run_has_an_id_and_is_current_only_while_it_runs(tmp_path: Path) -> None:
    """LabSession names VMs after the current run (issue 16 item 19): the run must be visible
    to code it calls, and not leak into the next one."""
    seen: list[tuple[str, str]] = []

    @fw.experiment("unit-test-current-run", "current run")
    def _cur(ctx: fw.RunContext) -> dict:
        cur = fw.current_run()
        assert cur is ctx
        seen.append((cur.experiment.name, cur.run_id))
        ctx.lab_prefixes.append("p-")
        return {}

    assert fw.current_run() is None
    out, _ = fw.run_experiment("unit-test-current-run", [], tmp_path, show_progress=False)
    fw.run_experiment("unit-test-current-run", [], tmp_path / "again", show_progress=False)
    assert fw.current_run() is None
    rec = json.loads((out / "run.json").read_text())
    assert rec["run_id"] == seen[0][1] and rec["lab_prefixes"] == ["p-"]
    assert seen[0][0] == "unit-test-current-run" and seen[0][1] != seen[1][1]
