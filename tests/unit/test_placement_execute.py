"""Executing plans: parsing and checking a plan's moves (nothing changes on an error), the
destination XML, and the dry run through the API and the CLI. The migration itself is tested
for real in tests/vm/test_placement_migrate.py."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner
from fastapi import FastAPI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from symbiont.config import load_config
from symbiont.placement import api as placement_api
from symbiont.placement.execute import (
    Executor,
    HostEntry,
    MoveSpec,
    check_moves,
    migration_xml,
    parse_hosts,
    parse_moves,
)

HOSTS = parse_hosts(
    [
        {"id": "A", "libvirt_uri": "qemu:///system", "daemon": "/run/a.sock"},
        {
            "id": "B",
            "libvirt_uri": "qemu+unix:///system?socket=/run/b/libvirt-sock",
            "migrate_uri": "tcp://127.0.0.1",
        },
    ]
)
# Where each VM runs, as libvirt would answer: host id -> {vm: state}.
WORLD = {"A": {"web": "running", "db": "running", "off": "shutoff"}, "B": {"cache": "running"}}


def locate(host: HostEntry, vm: str) -> str | None:
    return WORLD[host.id].get(vm)


def test_parse_hosts_errors_name_the_entry() -> None:
    assert HOSTS["B"].migrate_uri == "tcp://127.0.0.1" and HOSTS["A"].daemon == "/run/a.sock"
    with pytest.raises(ValueError, match=r"hosts\[0\].libvirt_uri: required"):
        parse_hosts([{"id": "A"}], "hosts")
    with pytest.raises(ValueError, match=r"hosts\[0\].port: unknown key"):
        parse_hosts([{"id": "A", "libvirt_uri": "x", "port": 1}], "hosts")
    with pytest.raises(ValueError, match="must be a list"):
        parse_hosts({"id": "A"}, "hosts")  # type: ignore[arg-type]


def test_parse_moves_from_sandpiper_and_idle_plans() -> None:
    moves = parse_moves({"moves": [{"vm": "web", "from": "A", "to": "B", "reason": "hot"}]})
    assert moves == [MoveSpec("web", "A", "B", "hot")]
    idle = {
        "actions": [
            {"kind": "shrink", "vm": "db", "src": "A", "mem_to": 100},
            {"kind": "move", "vm": "db", "src": "A", "dst": "B", "reason": "idle"},
        ]
    }
    assert parse_moves(idle) == [MoveSpec("db", "A", "B", "idle")]
    for bad, msg in [
        ({}, "nothing to execute"),
        ([], "expected a JSON object"),
        ({"moves": "x"}, "expected a list"),
        ({"moves": [{"vm": "web", "from": "A"}]}, r"moves\[0\].to: required"),
        ({"moves": [{"vm": "web", "from": "A", "to": "A"}]}, "to itself"),
        ({"moves": [{"vm": "web", "from": "A", "to": "B"}, {"vm": "web", "from": "B", "to": "A"}]}, "twice"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_moves(bad)


def test_check_moves_validates_everything_first() -> None:
    steps = check_moves([MoveSpec("web", "A", "B"), MoveSpec("db", "A", "B")], HOSTS, locate)
    assert [(s["vm"], s["to_uri"], s["migrate_uri"], s["reregister"]) for s in steps] == [
        ("web", HOSTS["B"].libvirt_uri, "tcp://127.0.0.1", False),
        ("db", HOSTS["B"].libvirt_uri, "tcp://127.0.0.1", False),
    ]
    assert check_moves([MoveSpec("cache", "B", "A")], HOSTS, locate)[0]["reregister"] is True
    cases = [
        (MoveSpec("web", "A", "C"), "unknown to host 'C'; configured: A, B"),
        (MoveSpec("web", "Z", "B"), "unknown from host 'Z'"),
        (MoveSpec("ghost", "A", "B"), "no domain 'ghost' on host A"),
        (MoveSpec("off", "A", "B"), "it is shutoff on A"),
        (MoveSpec("cache", "A", "B"), "no domain 'cache' on host A"),
    ]
    for bad, msg in cases:
        # The bad move comes last: the good one before it must not run either.
        with pytest.raises(ValueError, match=msg):
            check_moves([MoveSpec("web", "A", "B"), bad], HOSTS, locate)
    WORLD["B"]["db"] = "running"
    try:
        with pytest.raises(ValueError, match="host B already has a domain named 'db'"):
            check_moves([MoveSpec("db", "A", "B")], HOSTS, locate)
    finally:
        del WORLD["B"]["db"]
    with pytest.raises(ValueError, match="no hosts configured"):
        check_moves([MoveSpec("web", "A", "B")], {}, locate)


def test_execute_checks_the_whole_plan_before_migrating(monkeypatch) -> None:
    ex = Executor(HOSTS)
    monkeypatch.setattr(ex, "locate", locate)
    migrated: list[str] = []
    monkeypatch.setattr(ex, "migrate", lambda m: migrated.append(m.vm) or {"ok": True})
    with pytest.raises(ValueError, match="no domain 'ghost'"):
        ex.execute([MoveSpec("web", "A", "B"), MoveSpec("ghost", "A", "B")])
    assert migrated == []
    assert ex.execute([MoveSpec("web", "A", "B"), MoveSpec("db", "A", "B")]) == [{"ok": True}] * 2
    assert migrated == ["web", "db"]


DOMAIN = """<domain type='qemu'>
  <name>vm1</name>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/symbiont/vms/vm1/overlay.qcow2'/></disk>
    <serial type='pty'><log file='/var/lib/symbiont/vms/vm1/console.log' append='off'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/symbiont/channels/vm1.agent.sock'/>
      <target type='virtio' name='org.symbiont.agent.0'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/other.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>"""


def test_migration_xml_gives_the_destination_its_own_socket_and_log() -> None:
    xml, changed = migration_xml(DOMAIN, "vm1", "B", "org.symbiont.agent.0")
    assert changed == {
        "/var/lib/symbiont/channels/vm1.agent.sock": "/var/lib/symbiont/channels/vm1@B.agent.sock",
        "/var/lib/symbiont/vms/vm1/console.log": "/var/lib/symbiont/vms/vm1/console@B.log",
    }
    root = ET.fromstring(xml)
    paths = [s.get("path") for s in root.iterfind("./devices/channel/source")]
    assert paths == ["/var/lib/symbiont/channels/vm1@B.agent.sock", "/var/lib/libvirt/qemu/other.sock"]
    assert root.find("./devices/serial/log").get("file") == "/var/lib/symbiont/vms/vm1/console@B.log"
    # The disk is shared storage: the same file on both hosts.
    assert root.find("./devices/disk/source").get("file") == "/var/lib/symbiont/vms/vm1/overlay.qcow2"
    # Moving on again (B -> C) derives the next name from the domain name, not the current path.
    xml2, _ = migration_xml(xml, "vm1", "C", "org.symbiont.agent.0")
    assert "vm1@C.agent.sock" in xml2 and "@B" not in xml2
    with pytest.raises(ValueError, match="too long"):
        migration_xml(DOMAIN, "vm1", "x" * 80, "org.symbiont.agent.0")


class FakeDaemon:
    def __init__(self, tmp_path) -> None:
        self.cfg = load_config(
            None,
            {
                "state_dir": str(tmp_path),
                "placement": {"hosts": [{"id": h.id, "libvirt_uri": h.libvirt_uri} for h in HOSTS.values()]},
            },
        )
        self.logged: list[tuple] = []


@pytest.fixture
def api(tmp_path, monkeypatch):
    monkeypatch.setattr(Executor, "locate", lambda self, host, vm: locate(host, vm))
    app = FastAPI()
    app.state.daemon = FakeDaemon(tmp_path)
    app.include_router(placement_api.router, prefix="/v1/placement")
    return TestClient(app)


def test_execute_api_dry_run_and_errors(api) -> None:
    plan = {"moves": [{"vm": "web", "from": "A", "to": "B", "reason": "hot"}]}
    r = api.post("/v1/placement/execute", json={"plan": plan})
    assert r.status_code == 200, r.text
    assert r.json()["dry_run"] is True and r.json()["steps"][0]["vm"] == "web"
    r = api.post("/v1/placement/execute", json={"plan": {"moves": [{"vm": "web", "from": "A", "to": "Q"}]}})
    assert r.status_code == 422 and "unknown to host 'Q'" in r.json()["detail"]
    r = api.post("/v1/placement/execute", json={"plan": {"moves": [{"vm": "web"}]}, "dry_run": False})
    assert r.status_code == 422 and "from: required" in r.json()["detail"]
    r = api.post("/v1/placement/execute", json={"plan": plan, "force": True})
    assert r.status_code == 422
    assert api.get("/v1/placement/migrations").json() == {"running": {}}


def test_execute_cli_dry_run_and_bad_file(api, tmp_path, monkeypatch) -> None:
    """The CLI talks to the daemon's API; here the API is the TestClient's app."""
    from symbiont.cli import _add_part_groups, cli

    _add_part_groups()

    class Client:  # the CLI's API client, pointed at the test app
        def __init__(self, *a, **k) -> None:
            self.socket_path = "test"

        def __enter__(self):
            return self

        def __exit__(self, *a) -> None:
            pass

        def post(self, path, body):
            r = api.post(path, json=body)
            if r.status_code >= 400:
                from symbiont.client import ApiError

                raise ApiError(r.status_code, r.json()["detail"])
            return r.json()

    monkeypatch.setattr("symbiont.cli.Client", Client)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"moves": [{"vm": "db", "from": "A", "to": "B", "reason": "idle"}]}))
    res = CliRunner().invoke(cli, ["place", "execute", str(p)])
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output and "db" in res.output
    res = CliRunner().invoke(cli, ["place", "execute", str(p), "--json"])
    assert json.loads(res.output)["steps"][0]["from_uri"] == "qemu:///system"
    p.write_text(json.dumps({"moves": [{"vm": "nope", "from": "A", "to": "B"}]}))
    res = CliRunner().invoke(cli, ["place", "execute", str(p), "--yes"])
    assert res.exit_code == 2 and "no domain 'nope' on host A" in res.output
    p.write_text("{not json")
    res = CliRunner().invoke(cli, ["place", "execute", str(p)])
    assert res.exit_code == 2 and "plan.json" in res.output


class FakeDom:
    """Just enough of a libvirt domain for Executor.migrate's bookkeeping (the real migration is in
    tests/vm/test_placement_migrate.py)."""

    def __init__(self, fail: str | None) -> None:
        self.fail = fail
        self.params: dict = {}
        self.flags = 0

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 - libvirt's name
        return DOMAIN

    def migrate3(self, dconn, params, flags):
        import libvirt

        self.params, self.flags = params, flags
        if self.fail:
            raise libvirt.libvirtError(self.fail)
        return object()

    def jobStats(self, flags: int = 0) -> dict:  # noqa: N802 - libvirt's name
        return {"type": 2, "memory_total": 100, "memory_processed": 60, "memory_iteration": 2}


class FakeConn:
    def __init__(self, dom: FakeDom) -> None:
        self.dom = dom

    def lookupByName(self, name: str) -> FakeDom:  # noqa: N802 - libvirt's name
        return self.dom


@pytest.mark.parametrize("fail", [None, "migration job: unexpectedly failed"])
def test_migrate_bookkeeping(monkeypatch, fail: str | None) -> None:
    import libvirt

    from symbiont.placement import execute

    hosts = parse_hosts(
        [
            {"id": "A", "libvirt_uri": "qemu:///system", "daemon": "/run/a.sock"},
            {
                "id": "B",
                "libvirt_uri": "test:///b",
                "daemon": "/run/b.sock",
                "migrate_uri": "tcp://127.0.0.1",
            },
        ]
    )
    calls: list[tuple] = []
    monkeypatch.setattr(
        execute, "_daemon_unregister", lambda h, vm: calls.append(("unreg", h.id)) or {"x": 1}
    )
    monkeypatch.setattr(
        execute, "_daemon_register", lambda h, vm, pol, out: calls.append(("reg", h.id, pol)) or True
    )
    dom = FakeDom(fail)
    decisions: list[tuple] = []
    progress: list[tuple] = []
    ex = Executor(
        hosts,
        unsafe=True,
        log_decision=lambda *a: decisions.append(a),
        progress=lambda *a: progress.append(a),
    )
    monkeypatch.setattr(ex, "conn", lambda host: FakeConn(dom))
    res = ex.migrate(MoveSpec("vm1", "A", "B", "idle"))
    assert calls == [("unreg", "A"), ("reg", "B" if fail is None else "A", {"x": 1})]
    assert res["ok"] is (fail is None) and res["registered_on"] == ("B" if fail is None else "A")
    if fail:
        assert res["error"] == fail
    else:
        assert res["memory_total_bytes"] == 100 and res["iterations"] == 2
    assert dom.flags & libvirt.VIR_MIGRATE_LIVE and dom.flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    assert dom.flags & libvirt.VIR_MIGRATE_PERSIST_DEST and dom.flags & libvirt.VIR_MIGRATE_UNSAFE
    assert dom.params[libvirt.VIR_MIGRATE_PARAM_URI] == "tcp://127.0.0.1"
    assert dom.params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] == "127.0.0.1"
    assert "vm1@B.agent.sock" in dom.params[libvirt.VIR_MIGRATE_PARAM_DEST_XML]
    ((action, vm, inputs, outcome),) = decisions
    assert (action, vm, inputs["from"], inputs["to"], inputs["policy"]) == (
        "migrate",
        "vm1",
        "A",
        "B",
        {"x": 1},
    )
    assert outcome["ok"] is (fail is None)
    assert progress and progress[-1] == ("vm1", 60.0, 100.0)
