"""``symbiont ct`` through click's CliRunner, against a recorded daemon API."""

from __future__ import annotations

import json
from typing import Any

import click
import pytest
from click.testing import CliRunner

import symbiont.cli
from symbiont.cli import cli
from symbiont.cpu import cli as ct_cli
from symbiont.plugins import part_modules

LIST = {
    "nesting_aware": True, "cpu_strategy": "pin-share", "online": [0, 1],
    "containers": [{
        "name": "web", "state": "running", "pid": 42, "command": ["sh", "-c", "sleep 1"],
        "limits": {"cpu_ratio": 4, "no_reclaim": True},
        "applied": {"cpuset.cpus.effective": "0-1", "cpu.max": [133333, 100000], "cpu.weight": 1000,
                    "memory.high": None},
        "usage": {"cpu_usage_usec": 2_500_000, "memory_current": 3 << 20},
    }],
}


@pytest.fixture
def calls(monkeypatch):
    seen: list[tuple[str, str, Any]] = []

    def fake_api(ctx: Any, method: str, path: str, body: Any = None, **params: Any) -> Any:
        seen.append((method, path, body))
        if path.endswith("/containers") and method == "GET":
            return LIST
        if path.endswith("/vcpus") and method == "PUT":
            return {"before": {"guest_online": 4}, "after": {"guest_online": body["count"], "online": [0],
                                                              "libvirt": 4},
                    "libvirt": "skipped: offlined in the guest only", "timings": {"ratios_in_force_s": 0.42}}
        if path.endswith("/memory"):
            return {"before_mib": 512, "target_mib": body["target_mib"],
                    "reclaim": {"freed": 70 << 20, "needed": 80 << 20,
                                "containers": {"a": {"status": "ok", "freed": 70 << 20, "usage_before": 100 << 20,
                                                     "usage_after": 30 << 20}}}}
        if path.endswith("/mode"):
            return {"nesting_aware": (body or {}).get("nesting_aware", True), "cpu_strategy": "pin-share"}
        if method == "DELETE":
            return {"destroyed": "web", "restored": {"subtree": {}}}
        return {"name": "web", "state": "running", "pid": 7, "cgroup": "/sys/fs/cgroup/symbiont-ct/web",
                "applied": {"cpu.weight": 5}}

    monkeypatch.setattr(ct_cli, "api", fake_api)
    monkeypatch.setattr(symbiont.cli, "api", fake_api)  # what call_and_show calls
    return seen


def run(*args: str):
    return CliRunner().invoke(ct_cli.group, list(args), obj=object())


def test_group_is_discoverable_and_mounted() -> None:
    mod = part_modules("cli")["cpu"]
    assert isinstance(mod.group, click.Group) and mod.group.name == "cpu"  # one name per part
    from symbiont.cli import _add_part_groups

    _add_part_groups()
    assert cli.commands["cpu"] is mod.group and cli.commands["ct"] is mod.group  # the old name kept


def test_create_passes_command_and_limits(calls) -> None:
    r = run("create", "vm1", "web", "--cpu-ratio", "4", "--memory-max", "256M", "--no-reclaim", "--netns",
            "--", "sh", "-c", "sleep 1")
    assert r.exit_code == 0, r.output
    method, path, body = calls[-1]
    assert (method, path) == ("POST", "/v1/cpu/vms/vm1/containers")
    assert body == {"name": "web", "command": ["sh", "-c", "sleep 1"], "netns": True, "start": True,
                    "limits": {"cpu_ratio": 4.0, "memory_max": "256M", "no_reclaim": True}}
    assert "running" in r.output


def test_create_migratable_wraps_the_command_as_the_migration_tests_run_it(calls) -> None:
    from symbiont.migration.workload import migratable_command

    r = run("create", "vm1", "ctr", "--migratable", "--", "python3", "-c", "print(1)")
    assert r.exit_code == 0, r.output
    cmd = calls[-1][2]["command"]
    assert cmd == migratable_command("ctr", ["python3", "-c", "print(1)"])
    assert cmd[0] == "setsid" and cmd[-3:] == ["python3", "-c", "print(1)"]
    assert "/var/log/symbiont-containers/ctr.log" in cmd


def test_list_table_and_json(calls) -> None:
    r = run("list", "vm1")
    assert r.exit_code == 0 and "web" in r.output and "1.33" in r.output and "yes" in r.output
    r = run("list", "vm1", "--json")
    assert json.loads(r.output)["containers"][0]["name"] == "web"


def test_set_needs_a_limit_and_sends_only_given_ones(calls) -> None:
    r = run("set", "vm1", "web")
    assert r.exit_code == 2 and "at least one limit" in r.output
    r = run("set", "vm1", "web", "--cpu-weight", "5", "--cpuset", "0-1", "--cpu-max", "0.5", "--memory-low", "1024")
    assert r.exit_code == 0, r.output
    assert calls[-1] == ("PATCH", "/v1/cpu/vms/vm1/containers/web",
                         {"cpu_weight": 5, "cpu_max": 0.5, "cpuset": "0-1", "memory_low": 1024})


def test_lifecycle_and_scaling_commands(calls) -> None:
    for args, method, path in ((("start", "vm1", "web"), "POST", "/v1/cpu/vms/vm1/containers/web/start"),
                               (("stop", "vm1", "web"), "POST", "/v1/cpu/vms/vm1/containers/web/stop"),
                               (("destroy", "vm1", "web"), "DELETE", "/v1/cpu/vms/vm1/containers/web"),
                               (("mode", "vm1", "--agnostic"), "PUT", "/v1/cpu/vms/vm1/mode")):
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert calls[-1][:2] == (method, path)
    assert calls[-1][2] == {"nesting_aware": False}
    r = run("vcpus", "vm1", "1")
    assert r.exit_code == 0 and "0.420 s" in r.output
    assert calls[-1][2] == {"count": 1, "libvirt_unplug": False}
    r = run("balloon", "vm1", "432")
    assert r.exit_code == 0 and "70.0 MiB" in r.output
    assert calls[-1][2] == {"target_mib": 432, "nesting_aware": True}


def test_errors_from_the_daemon_are_one_line_exit_2(tmp_path) -> None:
    sock = str(tmp_path / "none.sock")
    from symbiont.cli import _add_part_groups

    _add_part_groups()
    r = CliRunner().invoke(cli, ["--socket", sock, "ct", "list", "vm1"])
    assert r.exit_code in (1, 2) and "cannot reach symbiontd" in r.output
