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
from symbiont.memory.part import MemoryPart
from symbiont.placement import api as placement_api
from symbiont.placement.execute import (
    Executor,
    HostEntry,
    MemorySpec,
    MoveSpec,
    check_moves,
    check_plan,
    migration_xml,
    parse_hosts,
    parse_moves,
    parse_plan,
)
from symbiont.placement.part import PlacementPart
from tests.fakes import Env

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
    # The move carries the size the shrink before it set (the destination's daemon sets it again).
    assert parse_moves(idle) == [MoveSpec("db", "A", "B", "idle", balloon_mib=100)]
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
    # The VM's other lab channels (the GPU port) move too; foreign ones stay.
    gpu = DOMAIN.replace("</devices>", "<channel type='unix'><source mode='bind' "
                         "path='/var/lib/symbiont/channels/vm1.gpu.sock'/>"
                         "<target type='virtio' name='org.symbiont.gpu.0'/></channel></devices>")
    xml3, changed3 = migration_xml(gpu, "vm1", "B", "org.symbiont.agent.0")
    assert changed3["/var/lib/symbiont/channels/vm1.gpu.sock"] == "/var/lib/symbiont/channels/vm1@B.gpu.sock"
    xml4, _ = migration_xml(xml3, "vm1", "C", "org.symbiont.agent.0")
    assert "vm1@C.gpu.sock" in xml4 and "@B" not in xml4 and "/var/lib/libvirt/qemu/other.sock" in xml4
    with pytest.raises(ValueError, match="too long"):
        migration_xml(DOMAIN, "vm1", "x" * 80, "org.symbiont.agent.0")


class FakeDaemon:
    """The placement part over the shared fakes (tests/fakes.py), as the daemon builds it."""

    def __init__(self, tmp_path) -> None:
        hosts = [{"id": h.id, "libvirt_uri": h.libvirt_uri} for h in HOSTS.values()]
        self.env = Env(tmp_path, cfg=load_config(None, {"state_dir": str(tmp_path), "placement": {"hosts": hosts}}))
        self.env.add(MemoryPart)
        self.part = self.env.add(PlacementPart)
        self.cfg = self.env.cfg


@pytest.fixture
def api(tmp_path, monkeypatch):
    monkeypatch.setattr(Executor, "locate", lambda self, host, vm: locate(host, vm))
    app = FastAPI()
    app.state.parts = FakeDaemon(tmp_path).env.parts
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
        execute, "_daemon_unregister", lambda h, vm: calls.append(("unreg", h.id)) or {"policy": {"x": 1}}
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
    monkeypatch.setattr(ex.remote, "conn", lambda uri: FakeConn(dom))
    res = ex.migrate(MoveSpec("vm1", "A", "B", "idle"))
    # A plain move (no carried balloon) parks nothing: the policy goes as it was.
    registered = {"x": 1, "extra": {}} if fail is None else {"x": 1}
    assert calls == [("unreg", "A"), ("reg", "B" if fail is None else "A", registered)]
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


# -- idle plans: balloon steps (shrink/grow) through the hosts' daemons, in plan order ----------

DHOSTS = parse_hosts(
    [
        {"id": "A", "libvirt_uri": "qemu:///system", "daemon": "/run/a.sock"},
        {"id": "B", "libvirt_uri": "test:///b", "daemon": "/run/b.sock", "migrate_uri": "tcp://127.0.0.1"},
        {"id": "N", "libvirt_uri": "test:///n"},  # no daemon: no balloon steps there
    ]
)
# What each daemon has registered: host id -> {vm: view}.
VIEWS = {
    "A": {"web": {"policy": {"memory": {"min_mib": 128}}, "max_memory_mib": 1024}},
    "B": {"cache": {"policy": {}, "max_memory_mib": 512}},
    "N": {},
}
DWORLD = {
    "A": {"web": "running", "db": "running", "api": "running"},
    "B": {"cache": "running"},
    "N": {"n1": "running"},
}


def dlocate(host: HostEntry, vm: str) -> str | None:
    return DWORLD[host.id].get(vm)


def dview(host: HostEntry, vm: str) -> dict | None:
    return VIEWS[host.id].get(vm)


IDLE_PLAN = {  # what 'symbiont place plan --json' writes: the idle moves appear in both lists
    "moves": [
        {"vm": "db", "from": "A", "to": "N", "reason": "hot"},
        {"vm": "web", "from": "A", "to": "B", "reason": "idle"},
        {"vm": "cache", "from": "B", "to": "A", "reason": "awake"},
    ],
    "idle": {
        "actions": [
            {"kind": "move", "vm": "cache", "src": "B", "dst": "A", "reason": "awake"},
            {"kind": "grow", "vm": "cache", "src": "A", "mem_from": 100, "mem_to": 512},
            {"kind": "shrink", "vm": "web", "src": "A", "mem_from": 1024, "mem_to": 150.2},
            {"kind": "move", "vm": "web", "src": "A", "dst": "B", "reason": "idle", "mem_to": 151},
            {"kind": "stay", "vm": "other", "src": "A", "reason": "idle host full"},
        ]
    },
}


def test_parse_plan_keeps_the_idle_order_and_carries_the_shrunk_size() -> None:
    steps = parse_plan(IDLE_PLAN)
    assert steps == [
        MoveSpec("db", "A", "N", "hot"),  # the Sandpiper move, not repeated by the actions
        MoveSpec("cache", "B", "A", "awake"),
        MemorySpec("grow", "cache", "A", 512),
        MemorySpec("shrink", "web", "A", 151),  # rounded up to a whole MiB
        MoveSpec("web", "A", "B", "idle", balloon_mib=151),
    ]
    assert parse_moves(IDLE_PLAN) == [s for s in steps if isinstance(s, MoveSpec)]
    for bad, msg in [
        ({"actions": [{"kind": "swap", "vm": "x"}]}, r"actions\[0\].kind: 'swap' is not one of"),
        ({"actions": [{"kind": "grow", "vm": "x", "src": "A"}]}, r"mem_to: expected a number"),
        ({"actions": [{"kind": "grow", "vm": "x", "src": "A", "mem_to": 10}]}, r"10 MiB outside 64\.\."),
        ({"actions": [{"kind": "grow", "vm": "x", "mem_to": 100}]}, r"actions\[0\].src: required"),
        ({"idle": {"actions": "x"}}, r"plan.idle.actions: expected a list"),
        ({"moves": [{"vm": "w", "from": "A", "to": "B", "balloon_mib": True}]}, "balloon_mib: expected"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_plan(bad)


def test_check_plan_follows_the_vm_through_the_plan() -> None:
    steps = check_plan(parse_plan(IDLE_PLAN), DHOSTS, dlocate, dview)
    assert [(s["kind"], s["vm"]) for s in steps] == [
        ("move", "db"), ("move", "cache"), ("grow", "cache"), ("shrink", "web"), ("move", "web"),
    ]  # fmt: skip
    grow = steps[2]
    assert grow["daemon"] == "/run/a.sock" and grow["range_mib"] == [64, 512]  # cache's view, from B
    assert steps[3]["range_mib"] == [128, 1024] and steps[4]["balloon_mib"] == 151
    cases = [
        ([MemorySpec("grow", "web", "Z", 200)], "grow of web: unknown host 'Z'"),
        ([MemorySpec("grow", "n1", "N", 200)], "host N has no daemon configured"),
        ([MemorySpec("shrink", "ghost", "A", 200)], "no domain 'ghost' on host A"),
        ([MemorySpec("shrink", "api", "A", 200)], "shrink of api: not registered with host A's daemon"),
        ([MemorySpec("shrink", "web", "A", 100)], r"100 MiB outside its range 128\.\.1024"),
        ([MoveSpec("web", "A", "B"), MemorySpec("shrink", "web", "A", 200)], "has it on B by then, not on A"),
        (
            [MoveSpec("cache", "B", "A"), MemorySpec("grow", "cache", "A", 600)],
            r"outside its range 64\.\.512",
        ),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_plan([MoveSpec("db", "A", "N"), *bad], DHOSTS, dlocate, dview)
    DWORLD["A"]["off"] = "shutoff"
    try:
        with pytest.raises(ValueError, match="it is shutoff on A; the balloon needs a running VM"):
            check_plan([MemorySpec("grow", "off", "A", 200)], DHOSTS, dlocate, dview)
    finally:
        del DWORLD["A"]["off"]


class FakeDaemons:
    """The hosts' daemons as the executor's API client sees them: it records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, object]] = []
        self.fail: set[str] = set()

    def client(self, spec: str):
        outer = self

        class C:
            def __enter__(self):
                return self

            def __exit__(self, *a) -> None:
                pass

            def get(self, path: str):
                from symbiont.client import ApiError

                outer.calls.append((spec, "GET", path, None))
                host = {"/run/a.sock": "A", "/run/b.sock": "B"}[spec]
                v = VIEWS[host].get(path.rsplit("/", 1)[-1])
                if v is None:
                    raise ApiError(404, "not registered")
                return v

            def put(self, path: str, body):
                from symbiont.client import ApiError

                outer.calls.append((spec, "PUT", path, body))
                if spec in outer.fail:
                    raise ApiError(409, "the balloon needs a running VM")
                return {"vm": path.split("/")[3], "before_mib": 1024, "target_mib": body["target_mib"]}

        return C()


def test_execute_runs_balloon_steps_in_plan_order_through_the_right_daemon(monkeypatch) -> None:
    from symbiont.placement import execute

    daemons = FakeDaemons()
    monkeypatch.setattr(execute, "_client", daemons.client)
    decisions: list[tuple] = []
    ex = Executor(DHOSTS, log_decision=lambda *a: decisions.append(a))
    monkeypatch.setattr(ex, "locate", dlocate)
    order: list[str] = []
    monkeypatch.setattr(
        ex, "migrate", lambda m: order.append(f"move {m.vm} {m.src}->{m.dst}") or {"ok": True}
    )
    plan = [MemorySpec("shrink", "web", "A", 151, "idle"), MoveSpec("web", "A", "B", balloon_mib=151),
            MoveSpec("cache", "B", "A"), MemorySpec("grow", "cache", "A", 512)]  # fmt: skip
    # A bad step anywhere: nothing runs at all, no balloon moves.
    with pytest.raises(ValueError, match="ghost"):
        ex.execute([*plan, MemorySpec("grow", "ghost", "A", 512)])
    assert order == [] and [c for c in daemons.calls if c[1] == "PUT"] == [] and decisions == []
    res = ex.execute(plan)
    assert [r["ok"] for r in res] == [True] * 4
    puts = [(c[0], c[2], c[3]) for c in daemons.calls if c[1] == "PUT"]
    assert puts == [
        ("/run/a.sock", "/v1/vms/web/memory", {"target_mib": 151}),
        ("/run/a.sock", "/v1/vms/cache/memory", {"target_mib": 512}),
    ]
    assert order == ["move web A->B", "move cache B->A"]
    assert res[0] == {"kind": "shrink", "vm": "web", "host": "A", "mem_to": 151, "reason": "idle", "ok": True,
                      "before_mib": 1024, "target_mib": 151, "seconds": res[0]["seconds"]}  # fmt: skip
    # Each balloon step is a decision with its inputs (the migrations log their own in migrate()).
    assert [(d[0], d[1], d[2]["mem_to"], d[2]["daemon"], d[3]["ok"]) for d in decisions] == [
        ("shrink", "web", 151, "/run/a.sock", True),
        ("grow", "cache", 512, "/run/a.sock", True),
    ]
    # A daemon refusing a step stops the plan there; the error is in the result and the decision.
    daemons.fail.add("/run/a.sock")
    order.clear()
    res = ex.execute(plan)
    assert len(res) == 1 and not res[0]["ok"] and "running VM" in res[0]["error"]
    assert order == [] and decisions[-1][3]["ok"] is False


def test_execute_clamps_a_shrink_below_the_guest_floor(monkeypatch) -> None:
    """Issue 16 item 12: a plan that shrinks a 512 MiB guest to 75 MiB shrinks it to the floor its
    daemon reports (GET /v1/memory/vms/{vm}/floor) instead, says so in the dry run and the
    result, and a later move of the VM carries the clamped size to its destination."""
    from symbiont.client import ApiError
    from symbiont.memory.floor import guest_floor
    from symbiont.placement import execute

    floor = guest_floor(512, 43, 60).to_dict()  # 141 MiB: 43 + 60 + 37.4
    daemons = FakeDaemons()
    base = daemons.client

    def client(spec: str):
        c = base(spec)
        get = c.get

        def get_with_floor(path: str):
            if path.startswith("/v1/memory/vms/"):
                daemons.calls.append((spec, "GET", path, None))
                if path.split("/")[4] != "web":
                    raise ApiError(404, "not registered")
                return {"name": "web", **floor}
            return get(path)

        c.get = get_with_floor
        return c

    monkeypatch.setattr(execute, "_client", client)
    decisions: list[tuple] = []
    ex = Executor(DHOSTS, log_decision=lambda *a: decisions.append(a))
    monkeypatch.setattr(ex, "locate", dlocate)
    moved: list[MoveSpec] = []
    monkeypatch.setattr(ex, "migrate", lambda m: moved.append(m) or {"ok": True})
    old = VIEWS["A"]["web"]
    VIEWS["A"]["web"] = {**old, "policy": {"memory": {"min_mib": 64}}}
    try:
        plan = [MemorySpec("shrink", "web", "A", 75, "idle"), MoveSpec("web", "A", "B", balloon_mib=75)]
        (dry, _) = ex.check(plan)
        assert dry["mem_to"] == 75 and dry["clamped_to"] == 141
        assert dry["clamp_reason"].startswith("75 MiB is below the guest's safe floor (guest floor 141 MiB = "
                                              "max(absolute 128, kernel reserve 43 + used 60 + margin 37))")
        res = ex.execute(plan)
        puts = [(c[2], c[3]) for c in daemons.calls if c[1] == "PUT"]
        assert puts == [("/v1/vms/web/memory", {"target_mib": 141})]  # never 75
        assert res[0]["ok"] and res[0]["target_mib"] == 141 and res[0]["clamped_from"] == 75
        assert "safe floor" in res[0]["clamp_reason"] and decisions[0][2]["mem_to"] == 141
        assert moved == [MoveSpec("web", "A", "B", balloon_mib=141)]
        # At or above the floor: untouched.
        assert "clamped_to" not in ex.check([MemorySpec("shrink", "web", "A", 141)])[0]
    finally:
        VIEWS["A"]["web"] = old


def test_migrate_sets_the_carried_balloon_on_the_destination(monkeypatch) -> None:
    """The source daemon restores its knobs when it lets the VM go; the destination's sets the
    shrunk size again after the migration."""
    from symbiont.placement import execute

    knobs = [{"knob": "balloon_mib", "original": 1024, "current": 151}]
    view = {
        "policy": {"memory": {"min_mib": 128}, "extra": {"ssd": {"x": 1}}},
        "knobs": knobs,
        "balloon_mib": 151,
    }
    monkeypatch.setattr(execute, "_daemon_unregister", lambda h, vm: view)
    regs: list[tuple] = []
    monkeypatch.setattr(
        execute, "_daemon_register", lambda h, vm, pol, out: regs.append((h.id, pol)) or h.id == "B"
    )
    sets: list[tuple] = []
    monkeypatch.setattr(
        execute,
        "_daemon_set_memory",
        lambda h, vm, mib: sets.append((h.id, vm, mib)) or {"ok": True, "target_mib": mib},
    )
    decisions: list[tuple] = []
    ex = Executor(DHOSTS, log_decision=lambda *a: decisions.append(a))
    monkeypatch.setattr(ex.remote, "conn", lambda uri: FakeConn(FakeDom(None)))
    res = ex.migrate(MoveSpec("web", "A", "B", "idle", balloon_mib=151))
    assert res["ok"] and res["balloon"] == {"ok": True, "target_mib": 151} and sets == [("B", "web", 151)]
    assert decisions[-1][2]["balloon_mib"] == 151 and decisions[-1][3]["balloon"]["ok"]
    # Parked: B's registration records its home and its full size (A's saved balloon original).
    parked = {"home": "A", "full_mem_mib": 1024}
    assert regs == [("B", {"memory": {"min_mib": 128}, "extra": {"ssd": {"x": 1}, "placement": parked}})]
    # Moving it on keeps that record; a move without a shrunk balloon (the wake-up) drops it.
    assert (
        execute.parked_policy(regs[0][1], {"knobs": []}, MoveSpec("web", "B", "C", balloon_mib=100))["extra"][
            "placement"
        ]
        == parked
    )
    assert execute.parked_policy(regs[0][1], {}, MoveSpec("web", "B", "A"))["extra"] == {"ssd": {"x": 1}}
    regs.clear()
    # A failed migration leaves the VM where it was: no balloon is set anywhere.
    sets.clear()
    monkeypatch.setattr(ex.remote, "conn", lambda uri: FakeConn(FakeDom("migration job: unexpectedly failed")))
    res = ex.migrate(MoveSpec("web", "A", "B", "idle", balloon_mib=151))
    assert not res["ok"] and "balloon" not in res and sets == []
    assert regs == [("A", view["policy"])]  # back where it was, as it was
    # Not registered at the destination (no daemon took it): the balloon step is reported failed.
    monkeypatch.setattr(ex.remote, "conn", lambda uri: FakeConn(FakeDom(None)))
    res = ex.migrate(MoveSpec("n1", "A", "N", balloon_mib=151))
    assert res["ok"] and res["balloon"]["ok"] is False and sets == []


def test_execute_api_and_cli_dry_run_show_balloon_steps(tmp_path, monkeypatch) -> None:
    from symbiont.cli import _add_part_groups, cli

    monkeypatch.setattr(Executor, "locate", lambda self, host, vm: dlocate(host, vm))
    monkeypatch.setattr(Executor, "view", lambda self, host, vm: dview(host, vm))
    d = FakeDaemon(tmp_path)
    d.cfg.placement.hosts = [
        {k: getattr(h, k) for k in ("id", "libvirt_uri", "daemon")} for h in DHOSTS.values()
    ]
    app = FastAPI()
    app.state.parts = d.env.parts
    app.include_router(placement_api.router, prefix="/v1/placement")
    api = TestClient(app)
    r = api.post("/v1/placement/execute", json={"plan": IDLE_PLAN})
    assert r.status_code == 200, r.text
    assert [(s["kind"], s["vm"]) for s in r.json()["steps"]][2:4] == [("grow", "cache"), ("shrink", "web")]
    bad = {"actions": [{"kind": "shrink", "vm": "n1", "src": "N", "mem_to": 100}]}
    r = api.post("/v1/placement/execute", json={"plan": bad, "dry_run": False})
    assert r.status_code == 422 and "host N has no daemon configured" in r.json()["detail"]

    class Client:  # the CLI's API client, pointed at the test app
        def __init__(self, *a, **k) -> None:
            self.socket_path = "test"

        def __enter__(self):
            return self

        def __exit__(self, *a) -> None:
            pass

        def post(self, path, body):
            return api.post(path, json=body).json()

    monkeypatch.setattr("symbiont.cli.Client", Client)
    _add_part_groups()
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(IDLE_PLAN))
    res = CliRunner().invoke(cli, ["place", "execute", str(p)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "A: balloon to 151 MiB" in res.output and "then balloon 151 MiB" in res.output
    assert res.output.index("grow") < res.output.index("shrink")


def test_remote_libvirt_on_libvirts_test_driver() -> None:
    """host/migrate.py's door, against libvirt's in-process test driver (no libvirtd): domain
    state, the migratable XML, and a connection that cannot be opened as a HostError that the
    executor reports as a plan error naming the host."""
    from symbiont.host.migrate import RemoteLibvirt
    from symbiont.host.port import HostError

    remote = RemoteLibvirt()
    try:
        assert remote.state("test:///default", "test") == "running"
        assert remote.state("test:///default", "nope") is None
        assert "<name>test</name>" in remote.migratable_xml("test:///default", "test")
        with pytest.raises(HostError, match="nope"):
            remote.migratable_xml("test:///default", "nope")
        with pytest.raises(HostError, match="cannot connect to bogus:///x"):
            remote.conn("bogus:///x")
        ex = Executor(parse_hosts([{"id": "Z", "libvirt_uri": "bogus:///x"}]), remote=remote)
        with pytest.raises(ValueError, match="host Z: cannot connect"):
            ex.locate(ex.hosts["Z"], "vm1")
    finally:
        remote.close()


def test_a_move_carries_the_size_the_shrink_really_set_when_steps_run_apart(monkeypatch) -> None:
    """``place execute --yes`` checks the plan once (dry run) and then posts each step as its own
    plan, each checked against the guest floor of its moment. The dry run sees a floor of 129 MiB
    (the shrink is clamped to 129), the shrink's own run a floor of 130 (the guest used a little
    more by then): A's daemon sets 130. The move that follows, posted alone with the dry run's
    size, must set 130 on B — the size A really set (its balloon knob), not 129."""
    from symbiont.client import ApiError
    from symbiont.placement import execute

    floor = {"mib": 129}
    a_knobs: list[dict] = []
    registered = {"A": {"web"}, "B": set()}
    puts: list[tuple[str, int]] = []

    def client(spec: str):
        host = {"/run/a.sock": "A", "/run/b.sock": "B"}[spec]

        class C:
            def __enter__(self):
                return self

            def __exit__(self, *a) -> None:
                pass

            def get(self, path: str):
                if "web" not in registered[host]:
                    raise ApiError(404, "not registered")
                if path.endswith("/floor"):
                    return {"floor_mib": floor["mib"], "reason": f"guest floor {floor['mib']} MiB"}
                return {"policy": {"memory": {"min_mib": 64}}, "max_memory_mib": 256,
                        "knobs": [dict(k) for k in a_knobs] if host == "A" else []}  # fmt: skip

            def put(self, path: str, body):  # the real daemon refuses below its floor, never raises
                if host == "A" and body["target_mib"] < floor["mib"]:
                    raise ApiError(422, f"target_mib {body['target_mib']} below the safe floor")
                puts.append((host, body["target_mib"]))
                if host == "A":
                    a_knobs[:] = [{"knob": "balloon_mib", "original": 256, "current": body["target_mib"]}]
                return {"vm": "web", "before_mib": 256, "target_mib": body["target_mib"]}

            def delete(self, path: str):
                registered[host].discard("web")

            def post(self, path: str, body):
                registered[host].add(body["name"])

        return C()

    monkeypatch.setattr(execute, "_client", client)
    ex = Executor(DHOSTS)
    monkeypatch.setattr(ex, "locate", dlocate)
    monkeypatch.setattr(ex.remote, "conn", lambda uri: FakeConn(FakeDom(None)))
    plan = {"idle": {"actions": [
        {"kind": "shrink", "vm": "web", "src": "A", "mem_to": 120, "reason": "idle"},
        {"kind": "move", "vm": "web", "src": "A", "dst": "B", "reason": "idle"},
    ]}}  # fmt: skip
    dry = ex.check(execute.parse_plan(plan))
    assert dry[0]["clamped_to"] == 129 and dry[1]["balloon_mib"] == 120
    floor["mib"] = 130  # the guest's used memory rose a little after the dry run
    results = []
    for st in dry:  # as the CLI posts them: one plan per step, from the dry run's steps
        if st["kind"] == "move":
            one = {"moves": [{k: st[k] for k in ("vm", "from", "to", "reason", "balloon_mib") if k in st}]}
        else:
            one = {"actions": [{"kind": st["kind"], "vm": st["vm"], "src": st["host"], "mem_to": st["mem_to"],
                                "reason": st["reason"]}]}  # fmt: skip
        results += ex.execute(execute.parse_plan(one))
    rs, r = results
    assert rs["ok"] and rs["target_mib"] == 130 and "safe floor" in rs["clamp_reason"]
    assert r["ok"] and r["registered_on"] == "B", r
    assert r["balloon"] == {"ok": True, "before_mib": 256, "target_mib": 130}, r
    assert r["balloon_mib"] == 130 and puts == [("A", 130), ("B", 130)]
