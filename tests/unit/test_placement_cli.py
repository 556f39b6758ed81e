"""``symbiont place`` through click's CliRunner, on the shipped example files."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner

from symbiont.placement.cli import EXAMPLES, group
from symbiont.plugins import part_modules

HOSTS = str(EXAMPLES / "hosts.yaml")
VMS = str(EXAMPLES / "vms.yaml")
TRACE = str(EXAMPLES / "trace.csv")


def run(*args: str):
    return CliRunner().invoke(group, list(args))


def test_group_is_discoverable_as_a_plugin() -> None:
    mod = part_modules("cli")["placement"]
    assert isinstance(mod.group, click.Group) and mod.group.name == "placement" and mod.ALIASES == ("place",)


def test_plan_json_on_the_examples() -> None:
    r = run("plan", "-i", HOSTS, "-r", VMS, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    by_vm = {d["vm"]: d for d in out["decisions"]}
    # The example's annotated outcomes: db2 avoids node1 (anti-affinity with db1), the shop group
    # lands together, latency1 avoids node3 (batch), bob-big breaks bob's quota, huge fits nowhere.
    assert by_vm["db2"]["host"] not in (None, "node1")
    assert len({by_vm[v]["host"] for v in ("web1", "web2", "cache1")}) == 1 and by_vm["web1"]["host"]
    assert by_vm["latency1"]["host"] not in (None, "node3")
    assert by_vm["bob-big"]["reason"] == "quota: user 'bob' would use cpu 12 of quota 8"
    assert by_vm["huge"]["reason"] == "mem: needs 256, largest free 128 after overcommit 1"
    assert out["placed"] == 7 and out["rejected"] == 2


def test_plan_table_bound_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "util.png"
    r = run("plan", "-i", HOSTS, "-r", VMS, "--heuristic", "cosine", "--bound", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert "plan: cosine, batch mode" in r.output
    assert "quota: user 'bob' would use cpu 12 of quota 8" in r.output
    assert "placed 7 of 9" in r.output and "lower bound" in r.output
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_heuristics_lists_formulas() -> None:
    r = run("heuristics", "--json")
    assert r.exit_code == 0
    items = {h["name"]: h["formula"] for h in json.loads(r.output)}
    assert items["cosine"] == "h* = argmax_h (r^ . a^_h) / (|r^| |a^_h|)"
    assert len(items) == 8
    assert "l2-norm-ratio" in run("heuristics").output


def test_simulate_and_generate(tmp_path: Path) -> None:
    r = run("simulate", "--trace", TRACE, "--hosts", "2", "--overcommit", "cpu=2", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["arrivals"] == 40 and s["placed"] + s["rejected"] == 40
    steps = tmp_path / "steps.csv"
    out = tmp_path / "t.csv"
    r = run("generate", "-o", str(out), "--vms", "12", "--seed", "3")
    assert r.exit_code == 0 and "12 VMs" in r.output
    r = run("simulate", "-t", str(out), "--detection", "black-box", "--csv", str(steps))
    assert r.exit_code == 0, r.output
    assert "hosts_used_mean" in r.output
    assert steps.read_text().splitlines()[0] == "time,hosts_used,overloaded_hosts,max_util"


def test_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  - id: h0\n    capacity: {cpu: -1}\n")
    cases = [
        (["plan", "-i", HOSTS, "-r", VMS, "--heuristic", "nope"], "error: unknown heuristic 'nope'"),
        (["plan", "-i", str(bad), "-r", VMS], "error: host h0: capacity cpu: -1 is negative"),
        (["plan", "-i", str(tmp_path / "missing.yaml"), "-r", VMS], "cannot read"),
        (["simulate", "-t", HOSTS], "missing column"),
        (["simulate", "-t", TRACE, "--overcommit", "cpu"], "expected resource=ratio"),
    ]
    for args, needle in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)
    bad.write_text("hosts:\n  - id: h0\n    capacity: {cpu: 1}\n    cpus: 4\n")
    r = run("plan", "-i", str(bad), "-r", VMS)
    assert r.exit_code == 2 and "hosts[0]: unknown field 'cpus'" in r.output


def test_bound_keeps_the_plan_when_a_running_vm_fits_no_host(tmp_path: Path) -> None:
    # A VM already running that is larger than every host (mem 40; at most 32 after overcommit) has no bound of its own: the plan
    # must still be printed (exit 0), with the bound of the others and the VM named.
    inv = tmp_path / "hosts.yaml"
    inv.write_text(
        "hosts:\n"
        "  - {id: h0, capacity: {cpu: 8, mem: 16}, overcommit: {mem: 2}, vms: [{id: fat, demand: {cpu: 1, mem: 40}}]}\n"
        "  - {id: h1, capacity: {cpu: 8, mem: 16}}\n"
    )
    req = tmp_path / "vms.yaml"
    req.write_text("requests: [{id: a, demand: {cpu: 2, mem: 4}}]\n")
    r = run("plan", "-i", str(inv), "-r", str(req), "--bound", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["placed"] == 1 and out["lower_bound"]["left_out"] == ["fat"]
    assert out["lower_bound"]["value"] == 1 and "fat" in out["lower_bound"]["detail"]


def test_now_must_be_finite() -> None:
    for bad in ("nan", "inf", "-inf"):
        r = run("plan", "-i", HOSTS, "-r", VMS, "--now", bad)
        assert r.exit_code == 2 and "--now" in r.output and "finite" in r.output, r.output
    import math

    import pytest

    from symbiont.placement.model import Host, Request
    from symbiont.placement.planner import plan

    with pytest.raises(ValueError, match="now: nan is not a finite time"):
        plan([Host("h", {"cpu": 1})], [Request("a", {"cpu": 1}, deadline=5)], now=math.nan)


def test_null_ids_are_refused(tmp_path: Path) -> None:
    req = tmp_path / "vms.yaml"
    for text, needle in [
        (
            "requests: [{id: null, demand: {cpu: 1}}]\n",
            "yaml[0].id: expected a non-empty string, got None",
        ),
        ("requests: [{id: '', demand: {cpu: 1}}]\n", "yaml[0].id: expected a non-empty string"),
        (
            "requests: [{id: true, demand: {cpu: 1}}]\n",
            "yaml[0].id: expected a non-empty string, got True",
        ),
        (
            "requests: [{id: a, demand: {cpu: 1}, exclude_apps: [null]}]\n",
            "exclude_apps[0]: expected a non-empty",
        ),
    ]:
        req.write_text(text)
        r = run("plan", "-i", HOSTS, "-r", str(req))
        assert r.exit_code == 2 and needle in r.output, (text, r.output)
    inv = tmp_path / "hosts.yaml"
    inv.write_text("hosts: [{id: null, capacity: {cpu: 1}}]\n")
    r = run("plan", "-i", str(inv), "-r", VMS)
    assert r.exit_code == 2 and "hosts[0].id: expected a non-empty string, got None" in r.output


def test_any_finite_real_number_is_accepted_and_named_when_not(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.json"
    inv.write_text(
        json.dumps({"hosts": [{"id": "h0", "capacity": {"cpu": 4, "mem": 16}}]}).replace("4,", "4e0,")
    )
    assert "4e0" in inv.read_text()
    req = tmp_path / "vms.yaml"
    req.write_text("requests:\n  - {id: a, demand: {cpu: 1e0, mem: 1e1}, start: 0e0, deadline: 1E+3}\n"
                   "  - {id: b, demand: {cpu: 1.0e0, mem: 5e-1}}\n")  # fmt: skip
    r = run("plan", "-i", str(inv), "-r", str(req), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["placed"] == 2 and out["utilisation_after"]["h0"] == {"cpu": 0.5, "mem": 0.65625}
    for value, needle in [
        (".nan", "yaml[0].demand.cpu: nan is not a finite number"),
        (".inf", "yaml[0].demand.cpu: inf is not a finite number"),
        ("true", "yaml[0].demand.cpu: expected a number, got True"),
        ("'1e3'", "yaml[0].demand.cpu: expected a number, got '1e3'"),
        ("1e999", "yaml[0].demand.cpu: inf is not a finite number"),
    ]:
        req.write_text(f"requests: [{{id: a, demand: {{cpu: {value}}}}}]\n")
        r = run("plan", "-i", str(inv), "-r", str(req))
        assert r.exit_code == 2 and needle in r.output, (value, r.output)
