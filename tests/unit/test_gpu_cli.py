"""``symbiont gpu`` through click's test runner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

# isort: split
from symbiont.gpu import backend as gb
from symbiont.gpu.cli import group


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setattr(gb, "cupy_status", lambda: (False, "cupy not importable (test)"))
    import symbiont.gpu.cli as cli

    monkeypatch.setattr(cli, "cupy_status", lambda: (False, "cupy not importable (test)"))
    return CliRunner()


TRACE = "task,function,arrival_ms,deadline_ms,gflop,blocks\n" + "\n".join(
    f"t{i},f,{i * 0.4},{1.5 + i % 4},{8 + 2 * i},{108 * 8}" for i in range(15)
)


def test_group_is_named_gpu_and_lists(runner):
    assert group.name == "gpu"
    r = runner.invoke(group, ["list", "--gpus", "A100,T4"])
    assert r.exit_code == 0, r.output
    assert "sim-A100-0" in r.output and "sim-T4-1" in r.output and "cupy" in r.output
    r = runner.invoke(group, ["list", "--json", "--backend", "simulated"])
    data = json.loads(r.output)
    assert data["backend"] == "simulated" and data["cupy"]["available"] is False


def test_types(runner):
    r = runner.invoke(group, ["types"])
    assert r.exit_code == 0 and "A100" in r.output and "whitepaper" in r.output
    rows = json.loads(runner.invoke(group, ["types", "--json"]).output)
    assert {x["name"] for x in rows} == {"A100", "V100", "T4", "H100"}


def test_run_trace(runner, tmp_path):
    p = tmp_path / "trace.csv"
    p.write_text(TRACE)
    out = tmp_path / "tasks.csv"
    r = runner.invoke(group, ["run-trace", str(p), "--scheduler", "edf-slice", "--background-vms", "1",
                              "--tasks-csv", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "edf-slice" in r.output and "15 tasks" in r.output
    assert len(out.read_text().splitlines()) == 16
    r = runner.invoke(group, ["run-trace", str(p), "--compare", "--json", "--background-vms", "1"])
    res = json.loads(r.output)
    assert [x["scheduler"] for x in res] == ["fcfs", "rr", "edf", "edf-slice", "edf-slice-offline", "edf-slice-v1"]
    assert all(x["tasks"] == 15 for x in res)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run-trace", "/nonexistent/trace.csv"], "cannot read trace"),
        (["run-trace", "{bad}"], "lacks column"),
        (["run-trace", "{good}", "--backend", "cupy"], "cupy backend requested but unavailable"),
        (["run-trace", "{good}", "--gpu", "Z9"], "unknown GPU type"),
        (["run-trace", "{good}", "--scheduler", "sjf"], "Invalid value"),
        (["list", "--gpus", ","], "at least one GPU type"),
    ],
)
def test_errors_exit_2_with_a_clear_message(runner, tmp_path, args, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_ms,gflop\n1,2\n")
    good = tmp_path / "good.csv"
    good.write_text(TRACE)
    args = [a.format(bad=bad, good=good) for a in args]
    r = runner.invoke(group, args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
