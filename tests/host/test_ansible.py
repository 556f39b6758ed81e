"""The Ansible playbooks: syntax and lint clean, and the provisioning and experiment playbooks
run for real against localhost (connection local), a second run changing nothing.

The provisioning run installs into a scratch copy of the source and of the virtual
environment (so the shared checkout's .venv is never reinstalled), writes the config and
the unit under a scratch folder, and starts a real symbiontd the way a host without systemd
as PID 1 gets it (start-stop-daemon with a pid file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from symbiont.client import Client

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
PLAYBOOKS = ("provision.yml", "lab.yml", "experiment.yml")
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def ansible_env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
    }


def playbook(tmp: Path, name: str, *extra: str, log: Path) -> dict[str, int]:
    """Run a playbook against localhost; return its PLAY RECAP counters (fail on failure)."""
    res = subprocess.run(
        ["ansible-playbook", "-i", "inventory/localhost.yml", name, *extra],
        cwd=ANSIBLE,
        env=ansible_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    with log.open("a") as f:
        f.write(
            f"\n===== ansible-playbook {name} {' '.join(extra)} (rc {res.returncode})\n{res.stdout}{res.stderr}"
        )
    assert res.returncode == 0, f"{name} failed:\n" + "\n".join((res.stdout + res.stderr).splitlines()[-40:])
    recaps = RECAP.findall(res.stdout)
    assert [r[0] for r in recaps] == ["localhost"], res.stdout[-2000:]
    _, ok, changed, unreachable, failed = recaps[0]
    return {"ok": int(ok), "changed": int(changed), "unreachable": int(unreachable), "failed": int(failed)}


def test_syntax_check(tmp_path: Path) -> None:
    assert shutil.which("ansible-playbook"), "ansible missing: scripts/bootstrap.sh installs it"
    for inventory in ("inventory/localhost.yml", "inventory/hosts.example.yml"):
        res = subprocess.run(
            ["ansible-playbook", "-i", inventory, "--syntax-check", *PLAYBOOKS],
            cwd=ANSIBLE,
            env=ansible_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr


def test_syntax_check_catches_a_broken_playbook(tmp_path: Path) -> None:
    bad = ANSIBLE / f".syntax-probe-{os.getpid()}.yml"
    bad.write_text("- hosts: all\n  tasks:\n    - name: x\n      ansible.builtin.command: [unbalanced\n")
    try:
        res = subprocess.run(
            ["ansible-playbook", "--syntax-check", bad.name],
            cwd=ANSIBLE,
            env=ansible_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        bad.unlink()
    assert res.returncode != 0


def test_ansible_lint_clean(tmp_path: Path) -> None:
    assert shutil.which("ansible-lint"), "ansible-lint missing: scripts/bootstrap.sh installs it"
    res = subprocess.run(
        ["ansible-lint", "--offline", "-p"],
        cwd=ANSIBLE,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_inventories_list_their_hosts(tmp_path: Path) -> None:
    for inventory, hosts in (
        ("inventory/localhost.yml", ["localhost"]),
        ("inventory/hosts.example.yml", ["testhost1.example.org", "testhost2.example.org"]),
    ):
        res = subprocess.run(
            ["ansible-inventory", "-i", inventory, "--list"],
            cwd=ANSIBLE,
            env=ansible_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert sorted(json.loads(res.stdout)["_meta"]["hostvars"]) == hosts


@pytest.fixture(scope="module")
def provisioned(as_root, tmp_path_factory):
    """Run provision.yml twice against localhost into a scratch tree; yield its paths."""
    tmp = tmp_path_factory.mktemp("ansible")
    log = tmp / "ansible.log"
    # A snapshot of the checkout (tracked and new files; others may be editing the real one)
    # and a copy of its venv for the role to (re)install symbiont into.
    src = tmp / "src"
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    venv = tmp / "venv"
    subprocess.run(["cp", "-a", str(ROOT / ".venv"), str(venv)], check=True)
    (venv / ".symbiont-installed").unlink(missing_ok=True)
    # The copy's scripts still name the original interpreter in their #! lines: point them at
    # the copy, and make sure its pip installs into the copy, never into the shared .venv.
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.read_bytes()[:2] == b"#!":
            text = script.read_bytes()
            script.write_bytes(text.replace(str(ROOT / ".venv").encode(), str(venv).encode()))
    res = subprocess.run([str(venv / "bin/pip"), "--version"], capture_output=True, text=True, check=True)
    assert str(venv) in res.stdout, f"the copied venv's pip is not its own: {res.stdout}"
    paths = {
        "src": src,
        "dir": tmp / "opt",
        "venv": venv,
        "bin": tmp / "bin",
        "units": tmp / "units",
        "config": tmp / "etc" / "symbiontd.yaml",
        "state": tmp / "state",
        "socket": tmp / "run" / "d.sock",
        "pidfile": tmp / "symbiontd.pid",
        "log": tmp / "symbiontd.log",
        "results": tmp / "results",
        "fetch": tmp / "fetched",
        "ansible_log": log,
        "tmp": tmp,
    }
    for d in ("bin", "units"):
        paths[d].mkdir()
    variables = {
        "symbiont_src": str(src),
        "symbiont_dir": str(paths["dir"]),
        "symbiont_venv": str(venv),
        "symbiont_bin_dir": str(paths["bin"]),
        "symbiont_unit_dir": str(paths["units"]),
        "symbiont_config_path": str(paths["config"]),
        "symbiont_service_name": "symb-ans-symbiontd",
        "symbiont_state_dir": str(paths["state"]),
        "symbiont_socket": str(paths["socket"]),
        "symbiont_pidfile": str(paths["pidfile"]),
        "symbiont_log": str(paths["log"]),
        "symbiont_service_manager": "auto",
        "symbiont_config": {"control": {"period_s": 2}},
        "symbiont_cli": str(paths["bin"] / "symbiont"),
        "symbiont_results_root": str(paths["results"]),
        "symbiont_fetch_dir": str(paths["fetch"]),
    }
    vars_file = tmp / "vars.yml"
    vars_file.write_text(yaml.safe_dump(variables))
    paths["vars"] = vars_file
    try:
        paths["first"] = playbook(tmp, "provision.yml", "-e", f"@{vars_file}", log=log)
        paths["second"] = playbook(tmp, "provision.yml", "-e", f"@{vars_file}", log=log)
        yield paths
    finally:
        if paths["pidfile"].exists():  # the daemon the role started, by its pid
            pid = int(paths["pidfile"].read_text())
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(300):
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except ProcessLookupError:
                pass


@pytest.mark.root
def test_provision_runs_daemon_and_is_idempotent(provisioned) -> None:
    p = provisioned
    assert p["first"]["changed"] > 0 and p["first"]["failed"] == 0
    assert p["second"]["changed"] == 0, f"second provisioning run changed things: {p['second']}"
    # symbiont installed from the copied source into the venv, commands linked.
    res = subprocess.run(
        [str(p["venv"] / "bin/python"), "-c", "import symbiont; print(symbiont.__file__)"],
        capture_output=True,
        text=True,
    )
    assert res.stdout.strip() == str(p["dir"] / "daemon/symbiont/__init__.py")
    assert (p["bin"] / "symbiontd").resolve() == (p["venv"] / "bin/symbiontd").resolve()
    # Config and unit written with this host's paths; the unit is the shipped one.
    cfg = yaml.safe_load(p["config"].read_text())
    assert cfg["socket"] == str(p["socket"]) and cfg["control"]["period_s"] == 2
    unit = (p["units"] / "symb-ans-symbiontd.service").read_text()
    shipped = (ROOT / "systemd/symbiontd.service").read_text()
    assert unit == shipped.replace("/etc/symbiont/symbiontd.yaml", str(p["config"])).replace(
        "/usr/local/bin/", f"{p['bin']}/"
    )
    # No systemd as PID 1 here: the daemon runs under start-stop-daemon, answers on its socket,
    # and is the process the pid file names, started with the role's config.
    pid = int(p["pidfile"].read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert str(p["config"]).encode() in cmdline
    with Client(str(p["socket"])) as c:
        status = c.get("/v1/status")
    assert status["pid"] == pid and status["period_s"] == 2


@pytest.mark.root
def test_config_change_restarts_daemon(provisioned) -> None:
    p = provisioned
    old_pid = int(p["pidfile"].read_text())
    rc = playbook(
        p["tmp"],
        "provision.yml",
        "-e",
        f"@{p['vars']}",
        "-e",
        '{"symbiont_config": {"control": {"period_s": 3}}}',
        log=p["ansible_log"],
    )
    assert rc["changed"] >= 2  # the config, then the restart
    new_pid = int(p["pidfile"].read_text())
    assert new_pid != old_pid and not Path(f"/proc/{old_pid}").exists()
    assert yaml.safe_load(p["config"].read_text())["control"]["period_s"] == 3
    with Client(str(p["socket"])) as c:
        status = c.get("/v1/status")
    assert status["pid"] == new_pid and status["period_s"] == 3


@pytest.mark.root
def test_experiment_playbook_runs_fetches_and_is_idempotent(provisioned) -> None:
    p = provisioned
    params = [
        "-e",
        "symbiont_experiment=gpu-elastic",
        "-e",
        '{"symbiont_experiment_params": {"seed": 3, "shares": [0.5, 1.0, 0.25], "phase_s": 0.02}}',
    ]
    first = playbook(p["tmp"], "experiment.yml", "-e", f"@{p['vars']}", *params, log=p["ansible_log"])
    second = playbook(p["tmp"], "experiment.yml", "-e", f"@{p['vars']}", *params, log=p["ansible_log"])
    assert first["changed"] > 0
    assert second["changed"] == 0, f"second experiment run changed things: {second}"
    fetched = sorted((p["fetch"] / "localhost").rglob("*"))
    csvs = [f for f in fetched if f.suffix == ".csv"]
    pngs = [f for f in fetched if f.suffix == ".png"]
    runs = [f for f in fetched if f.name == "run.json"]
    assert csvs and pngs and len(runs) == 1, fetched
    # The fetched files are the host's files, and the run used the parameters given.
    for f in csvs + pngs:
        rel = f.relative_to(p["fetch"] / "localhost")
        assert f.read_bytes() == (p["results"] / rel).read_bytes()
    assert all(len(f.read_text().splitlines()) >= 2 for f in csvs)
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads(runs[0].read_text())
    assert run["params"]["seed"] == 3 and run["params"]["shares"] == [0.5, 1.0, 0.25]
    # New parameters are a new run, not the old one reused.
    third = playbook(
        p["tmp"],
        "experiment.yml",
        "-e",
        f"@{p['vars']}",
        "-e",
        "symbiont_experiment=gpu-elastic",
        "-e",
        '{"symbiont_experiment_params": {"seed": 4, "phase_s": 0.02}}',
        log=p["ansible_log"],
    )
    assert third["changed"] > 0
    assert len(list((p["fetch"] / "localhost").rglob("run.json"))) == 2


def test_experiment_playbook_rejects_bad_name(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            "inventory/localhost.yml",
            "experiment.yml",
            "-e",
            "symbiont_experiment=../../etc",
            "-e",
            f"symbiont_results_root={tmp_path}/r",
        ],
        cwd=ANSIBLE,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "symbiont_experiment must be a name" in res.stdout
    assert not (tmp_path / "r").exists()
