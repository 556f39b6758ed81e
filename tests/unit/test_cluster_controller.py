"""The cluster controller's decisions with the real planner (plan_live: Sandpiper, idle), the real
plan checks (execute.check_plan) and the real sqlite journal; only the hosts are fakes here: their
inventories are generated from a fake cluster that the fake executor's migrations change."""

from __future__ import annotations

import time
from typing import Any

import pytest

from symbiont.cluster.controller import Controller, ControllerConfig
from symbiont.cluster.journal import Journal
from symbiont.placement.execute import HostEntry, MemorySpec, MoveSpec, check_plan

CAP = {"cpu": 4.0, "mem": 8.0}


class FakeCluster:
    """Where each VM runs, its allocation and its CPU usage (cores) per sample."""

    def __init__(self, vms: dict[str, tuple[str, float]], hosts=("h1", "h2", "h3")) -> None:
        self.where = {vm: h for vm, (h, _u) in vms.items()}
        self.use = {vm: u for vm, (_h, u) in vms.items()}
        self.hosts = list(hosts)
        self.dead: set[str] = set()
        self.moves: list[tuple[str, str, str]] = []

    def inventory(self, hid: str) -> dict[str, Any]:
        if hid in self.dead:
            raise ConnectionError(f"daemon /run/{hid}.sock: connection refused")
        vms = [vm for vm, h in self.where.items() if h == hid]
        return {
            "host": {"id": hid, "capacity": CAP, "overcommit": {},
                     "vms": [{"id": vm, "demand": {"cpu": 1.0, "mem": 1.0}} for vm in vms]},
            "usage": {"black-box": {vm: [[self.use[vm], 0.5]] * 6 for vm in vms}, "gray-box": {}},
            "activity": {},
            "libvirt_uri": f"qemu+tcp://{hid}/system",
        }  # fmt: skip


class FakeExecutor:
    def __init__(self, fc: FakeCluster, hosts) -> None:
        self.fc, self.hosts = fc, dict(hosts)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def locate(self, host: HostEntry, vm: str) -> str | None:
        return "running" if self.fc.where.get(vm) == host.id else None

    def view(self, host: HostEntry, vm: str) -> dict[str, Any] | None:
        return {"policy": {"memory": {"min_mib": 128}}, "max_memory_mib": 1024} if self.locate(host, vm) else None

    def check(self, steps):
        return check_plan(steps, self.hosts, self.locate, self.view)

    def migrate(self, m: MoveSpec) -> dict[str, Any]:
        self.fc.where[m.vm] = m.dst
        self.fc.moves.append((m.vm, m.src, m.dst))
        return {**m.to_dict(), "ok": True}

    def set_memory(self, s: MemorySpec) -> dict[str, Any]:
        return {**s.to_dict(), "ok": True}


def controller(tmp_path, fc: FakeCluster, **kw) -> Controller:
    hosts = {h: HostEntry(h, f"qemu+tcp://{h}/system", f"/run/{h}.sock") for h in fc.hosts}
    cfg = ControllerConfig(hosts=hosts, journal=tmp_path / "j.sqlite", period_s=0.01, **kw)
    return Controller(cfg, fetch=lambda spec: fc.inventory(spec.split("/")[-1].removesuffix(".sock")),
                      make_executor=lambda hs: FakeExecutor(fc, hs))  # fmt: skip


def test_planted_hotspot_is_relieved_and_logged_with_inputs(tmp_path) -> None:
    # h1: 4 busy VMs (3.6 of 4 cores = 90% > 75%); h2, h3 idle.
    fc = FakeCluster({f"v{i}": ("h1", 0.9) for i in range(4)} | {"w": ("h2", 0.1)})
    ctl = controller(tmp_path, fc)
    t0 = time.monotonic()
    r = ctl.round()
    assert r["hotspots"] == ["h1"]
    assert r["execution"]["state"] == "done"
    assert len(fc.moves) == 1 and fc.moves[0][1] == "h1" and fc.moves[0][2] in ("h2", "h3")
    # Relieved: the next round sees no hotspot and moves nothing.
    r2 = ctl.round()
    assert r2["hotspots"] == [] and "execution" not in r2 and len(fc.moves) == 1
    assert time.monotonic() - t0 < 5
    j = Journal(tmp_path / "j.sqlite")
    rounds = j.decisions(kind="round")
    assert len(rounds) == 2
    assert rounds[0]["inputs"]["hosts"]["h1"]["vms"] == ["v0", "v1", "v2", "v3"]
    assert rounds[0]["inputs"]["hosts"]["h1"]["samples"]["black-box"]["v0"] == 6
    assert rounds[0]["inputs"]["config"]["thresholds"]["cpu"] == 0.75
    assert rounds[0]["outcome"]["hotspots"] == ["h1"]
    (p,) = j.plans()
    assert p["state"] == "done" and [s["state"] for s in p["steps"]] == ["done"]
    assert p["steps"][0]["context"]["policy"] == {"memory": {"min_mib": 128}}  # what resume re-registers


def test_rate_limit_and_cooldown(tmp_path) -> None:
    # h1 and h2 both hot (each needs a move), h3 empty: one migration per round.
    fc = FakeCluster({"a1": ("h1", 1.05), "a2": ("h1", 1.05), "a3": ("h1", 1.05),
                      "b1": ("h2", 1.05), "b2": ("h2", 1.05), "b3": ("h2", 1.05)})  # fmt: skip
    ctl = controller(tmp_path, fc, max_migrations=1, cooldown_s=3600)
    r = ctl.round()
    assert len(fc.moves) == 1
    held = r["execution"]["held"]
    assert len(held) >= 1 and all("rate limit: 1 migrations per round" in h["reason"] for h in held)
    moved = fc.moves[0][0]
    # A plan that moves the same VM again within the cooldown is held back, with the reason.
    back = {"moves": [{"vm": moved, "from": fc.where[moved], "to": fc.moves[0][1]}]}
    res = ctl.execute_plan(back, "test", limit=True)
    assert res["state"] == "empty" and "cooldown" in res["held"][0]["reason"]
    assert len(fc.moves) == 1


def test_dry_run_changes_nothing(tmp_path) -> None:
    fc = FakeCluster({f"v{i}": ("h1", 0.9) for i in range(4)})
    ctl = controller(tmp_path, fc, dry_run=True)
    r = ctl.round()
    assert r["hotspots"] == ["h1"] and r["execution"]["state"] == "dry-run"
    assert r["execution"]["steps"][0]["kind"] == "move"
    assert fc.moves == [] and set(fc.where.values()) == {"h1"}


def test_unreachable_host_marked_and_planned_around(tmp_path) -> None:
    fc = FakeCluster({f"v{i}": ("h1", 0.9) for i in range(4)})
    fc.dead.add("h2")
    ctl = controller(tmp_path, fc)
    r = ctl.round()
    assert "h2" in r["down"] and "connection refused" in r["down"]["h2"]
    assert [m[2] for m in fc.moves] == ["h3"]  # relieved onto the host that answers
    j = Journal(tmp_path / "j.sqlite")
    assert j.hosts()["h2"]["state"] == "down" and j.hosts()["h1"]["state"] == "up"
    assert [d["inputs"]["host"] for d in j.decisions(kind="host-down")] == ["h2"]
    # A plan that needs the dead host is refused, naming it; nothing moves.
    before = dict(fc.where)
    stay = next(vm for vm, h in before.items() if h == "h1")
    res = ctl.execute_plan({"moves": [{"vm": stay, "from": "h1", "to": "h2"}]}, "test")
    assert res["state"] == "refused" and "host h2 is not answering" in res["reason"]
    assert fc.where == before
    # It comes back: marked up again (a decision), usable again.
    fc.dead.clear()
    ctl.round()
    assert j.hosts()["h2"]["state"] == "up"
    assert [d["inputs"]["host"] for d in j.decisions(kind="host-up")][-1] == "h2"


@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        ({"moves": [{"vm": "ghost", "from": "h1", "to": "h2"}]}, "ghost: no host daemon manages a running VM"),
        ({"moves": [{"vm": "v0", "from": "h1", "to": "h9"}]}, "unknown host 'h9'"),
        ({"moves": [{"vm": "v0", "from": "h2", "to": "h3"}]}, "no domain 'v0' on host h2"),
        ({"moves": [{"vm": f"v{i}", "from": "h1", "to": "h2"} for i in range(5)]},
         "host h2 would be over capacity after the plan: cpu 5 > 4"),
        ({"moves": [{"vm": "v0", "from": "h1", "to": "h1"}]}, "goes from h1 to itself"),
        ({"nothing": 1}, "has no 'moves'"),
    ],
)
def test_bad_plans_refused_with_reason_and_change_nothing(tmp_path, plan, reason) -> None:
    fc = FakeCluster({f"v{i}": ("h1", 0.1) for i in range(5)})
    ctl = controller(tmp_path, fc)
    before = dict(fc.where)
    res = ctl.execute_plan(plan, "test")
    assert res["state"] == "refused" and reason in res["reason"], res
    assert fc.where == before and fc.moves == []
    j = Journal(tmp_path / "j.sqlite")
    assert j.plans()[-1]["state"] == "refused" and reason in j.plans()[-1]["reason"]
    assert j.decisions(kind="refused")[-1]["outcome"]["reason"] == res["reason"]


def test_journal_unfinished_and_cooldown_clock(tmp_path) -> None:
    with Journal(tmp_path / "j.sqlite") as j:
        pid = j.new_plan("round", {"moves": []}, {}, [{"kind": "move", "vm": "a"}, {"kind": "move", "vm": "b"}],
                         "running")  # fmt: skip
        j.start_step(pid, 0, {"policy": {"x": 1}})
        (u,) = j.unfinished()
        assert [s["state"] for s in u["steps"]] == ["started", "pending"]
        assert u["steps"][0]["context"] == {"policy": {"x": 1}}
        assert j.last_move("a") is not None and j.last_move("b") is None
        j.end_step(pid, 0, "rolled-back", {})
        j.skip_rest(pid, "restart")
        j.set_plan(pid, "resumed")
        assert j.unfinished() == []
    # Survives a reopen (sqlite, committed per change).
    with Journal(tmp_path / "j.sqlite") as j:
        assert [s["state"] for s in j.steps(pid)] == ["rolled-back", "skipped"]


@pytest.mark.parametrize(
    ("kw", "msg"),
    [({"period_s": 0}, "period"), ({"period_s": float("nan")}, "period"), ({"max_migrations": -1}, "max_migrations"),
     ({"mode": "x"}, "mode"), ({"thresholds": {"cpu": 0}}, "thresholds.cpu"),
     ({"idle": {"window": 0}}, "idle: window"), ({"idle": {"cpu_threshold": 2}}, "idle: cpu_threshold"),
     ({"idle": {"windw": 3}}, "idle: .*windw")],
)
def test_config_errors_name_the_key(tmp_path, kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        ControllerConfig(hosts={"h1": HostEntry("h1", "qemu:///system")}, journal=tmp_path / "j", **kw)


# -- resume after a crash: every VM ends on exactly one host, registered with exactly its daemon --


class FakeDom:
    def __init__(self, state: int, persistent: bool = True) -> None:
        self.st, self.persistent, self.gone, self.aborted = state, persistent, False, False

    def state(self):
        return [self.st, 0]

    def isActive(self):  # noqa: N802 - libvirt's name
        return self.st in (1, 3)

    def isPersistent(self):  # noqa: N802
        return self.persistent

    def destroy(self):
        self.st = 5

    def undefine(self):
        self.gone = True

    def resume(self):
        self.st = 1

    def abortJob(self):  # noqa: N802
        self.aborted = True

    def XMLDesc(self, _flags=0):  # noqa: N802
        return "<domain/>"


class FakeConn:
    def __init__(self, doms: dict[str, FakeDom]) -> None:
        self.doms = doms

    def lookupByName(self, name):  # noqa: N802
        import libvirt

        d = self.doms.get(name)
        if d is None or d.gone or (d.st == 5 and not d.persistent):
            raise libvirt.libvirtError("no domain")
        return d

    def defineXML(self, _xml):  # noqa: N802
        return next(iter(self.doms.values()))


class ResumeExecutor:
    def __init__(self, conns: dict[str, FakeConn], reg: dict[str, set[str]]) -> None:
        from symbiont.host.migrate import RemoteLibvirt

        self.conns, self.reg = conns, reg
        self.remote = RemoteLibvirt()  # the real door, on fake connections kept by URI
        self.remote._conns = {f"qemu+tcp://{h}/system": c for h, c in conns.items()}

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def locate(self, host, vm):
        try:
            d = self.conns[host.id].lookupByName(vm)
        except Exception:  # noqa: BLE001
            return None
        return {1: "running", 3: "paused", 5: "shut off"}[d.st]

    def view(self, host, vm):
        return {"policy": {}} if vm in self.reg[host.id] else None


class FakeClient:
    def __init__(self, reg: set[str]) -> None:
        self.reg = reg

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def delete(self, path):
        self.reg.discard(path.rsplit("/", 1)[-1])

    def post(self, _path, body):
        self.reg.add(body["name"])


@pytest.mark.parametrize(
    ("src", "dst", "reg_src", "expect"),
    [
        # killed after the destination took over: the source copy is paused, the destination runs
        (FakeDom(3), FakeDom(1, persistent=False), False, ("completed", "h2")),
        # killed while streaming: the destination holds a paused incoming copy; the source runs
        (FakeDom(1), FakeDom(3, persistent=False), False, ("rolled-back", "h1")),
        # libvirt cleaned up already, but left the source paused (perform done, no finish)
        (FakeDom(3), None, False, ("rolled-back", "h1")),
        # killed before the source daemon let go: still registered there
        (FakeDom(1), None, True, ("rolled-back", "h1")),
    ],
)
def test_resume_leaves_each_vm_on_exactly_one_host(tmp_path, monkeypatch, src, dst, reg_src, expect) -> None:
    import symbiont.placement.execute as ex_mod

    conns = {"h1": FakeConn({"vm": src}), "h2": FakeConn({"vm": dst} if dst else {})}
    reg = {"h1": {"vm"} if reg_src else set(), "h2": set()}
    monkeypatch.setattr(ex_mod, "_client", lambda spec: FakeClient(reg[spec.split("/")[-1].removesuffix(".sock")]))
    fc = FakeCluster({}, hosts=("h1", "h2"))
    hosts = {h: HostEntry(h, f"qemu+tcp://{h}/system", f"/run/{h}.sock") for h in ("h1", "h2")}
    cfg = ControllerConfig(hosts=hosts, journal=tmp_path / "j.sqlite", resume_wait_s=0.0)
    ctl = Controller(cfg, fetch=lambda spec: fc.inventory(spec.split("/")[-1].removesuffix(".sock")),
                     make_executor=lambda hs: ResumeExecutor(conns, reg))  # fmt: skip
    pid = ctl.journal.new_plan("round", {}, {}, [{"kind": "move", "vm": "vm", "from": "h1", "to": "h2"},
                                                 {"kind": "move", "vm": "other", "from": "h1", "to": "h2"}],
                               "running")  # fmt: skip
    ctl.journal.start_step(pid, 0, {"policy": {"memory": {"min_mib": 128}}, "registered": True})
    (res,) = ctl.resume()
    (f,) = res["fixed"]
    assert (f["state"], f["on"]) == expect
    ex = ResumeExecutor(conns, reg)
    present = [h for h in ("h1", "h2") if ex.locate(hosts[h], "vm") is not None]
    assert present == [expect[1]]
    assert ex.locate(hosts[expect[1]], "vm") == "running"
    assert [h for h in ("h1", "h2") if "vm" in reg[h]] == [expect[1]]
    steps = ctl.journal.steps(pid)
    assert [s["state"] for s in steps] == [expect[0], "skipped"]
    assert ctl.journal.plans()[-1]["state"] == "resumed" and ctl.journal.unfinished() == []
    assert ctl.resume() == []  # nothing left to do


def test_real_hosts_from_a_yaml_file(tmp_path) -> None:
    from symbiont.cluster.controller import hosts_from_cluster

    f = tmp_path / "hosts.yaml"
    f.write_text("hosts:\n  - {id: a, libvirt_uri: 'qemu+tls://a/system', daemon: 'https://a:8080', migrate_uri: 'tcp://a'}\n"
                 "  - {id: b, libvirt_uri: 'qemu+tls://b/system'}\nmigrate_unsafe: false\n")  # fmt: skip
    hosts, ns, unsafe = hosts_from_cluster(f)
    assert sorted(hosts) == ["a", "b"] and hosts["a"].daemon == "https://a:8080" and ns == "" and not unsafe
    f.write_text("hosts:\n  - {id: a, libvirt: 'x'}\n")
    with pytest.raises(ValueError, match=r"hosts\[0\]\.libvirt: unknown key"):
        hosts_from_cluster(f)
    f.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a mapping with a 'hosts' list"):
        hosts_from_cluster(f)


def test_reconcile_door_on_libvirts_test_driver() -> None:
    """RemoteLibvirt's reconcile calls on a real (in-process) libvirt: resume a paused copy,
    define a transient one, remove a duplicate, and an abort with no job only answers False."""
    import libvirt

    from symbiont.host.migrate import RemoteLibvirt, quiet_errors
    from symbiont.host.port import HostError

    quiet_errors()
    uri, vm = "test:///default", "recon-vm"
    r = RemoteLibvirt()
    try:
        xml = (f"<domain type='test'><name>{vm}</name><memory>65536</memory>"
               "<os><type>hvm</type></os></domain>")  # fmt: skip
        dom = r.conn(uri).createXML(xml, 0)  # transient, running
        dom.suspend()
        assert r.state(uri, vm) == "paused"
        assert r.resume_if_paused(uri, vm) and r.state(uri, vm) == "running"
        assert not r.resume_if_paused(uri, vm)
        assert r.ensure_persistent(uri, vm) and r.conn(uri).lookupByName(vm).isPersistent()
        assert not r.ensure_persistent(uri, vm)
        assert r.abort_job(uri, vm) is False  # no job to cancel: libvirt refuses, nothing raised
        r.remove(uri, vm)
        assert r.state(uri, vm) is None
        with pytest.raises(HostError, match=vm):
            r.remove(uri, vm)
    finally:
        try:
            d = r.conn(uri).lookupByName(vm)
            if d.isActive():
                d.destroy()
            if d.isPersistent():
                d.undefine()
        except libvirt.libvirtError:
            pass
        r.close()


# -- idle consolidation (seeds/004) through the controller: the real plan_live idle logic --


class IdleCluster(FakeCluster):
    """VMs of 256 MiB with the guest's CPU samples (fraction of its vCPU) and memory in use; the
    fake executor's balloon steps change their allocations, its moves carry the parking record."""

    def __init__(self, vms: dict[str, tuple[str, float]], wss: float = 30.0) -> None:
        super().__init__(vms)
        self.mem = {vm: 256.0 for vm in vms}
        self.wss = wss
        self.parked: dict[str, dict[str, Any]] = {}
        self.series: dict[str, list[float]] = {}  # a VM's CPU samples, where not [use] * 12

    def inventory(self, hid: str) -> dict[str, Any]:
        inv = super().inventory(hid)
        vms = [v["id"] for v in inv["host"]["vms"]]
        for v in inv["host"]["vms"]:
            v["demand"]["mem"] = self.mem[v["id"]] / 1024
        inv["activity"] = {vm: {"mem_mib": self.mem[vm], "cpu": self.series.get(vm, [self.use[vm]] * 12), "wss_mib": self.wss,
                                "full_mem_mib": self.parked.get(vm, {}).get("full_mem_mib", 256.0),
                                "home": self.parked.get(vm, {}).get("home"), "min_mib": 64.0,
                                "reserve_mib": 20.0, "floor_mib": None} for vm in vms}  # fmt: skip
        return inv


class IdleExecutor(FakeExecutor):
    def migrate(self, m: MoveSpec) -> dict[str, Any]:
        if m.balloon_mib is not None:  # parked: the destination's registration keeps home and full size
            self.fc.parked[m.vm] = {"home": m.src, "full_mem_mib": 256.0}
            self.fc.mem[m.vm] = float(m.balloon_mib)
        else:
            self.fc.parked.pop(m.vm, None)
        return super().migrate(m)

    def set_memory(self, s: MemorySpec) -> dict[str, Any]:
        self.fc.mem[s.vm] = float(s.mem_mib)
        return super().set_memory(s)


def idle_controller(tmp_path, fc: IdleCluster, **kw) -> Controller:
    hosts = {h: HostEntry(h, f"qemu+tcp://{h}/system", f"/run/{h}.sock") for h in fc.hosts}
    cfg = ControllerConfig(hosts=hosts, journal=tmp_path / "j.sqlite", period_s=0.01, idle_host="h3",
                           thresholds={"cpu": 10.0, "mem": 10.0}, **kw)  # fmt: skip
    return Controller(cfg, fetch=lambda spec: fc.inventory(spec.split("/")[-1].removesuffix(".sock")),
                      make_executor=lambda hs: IdleExecutor(fc, hs))  # fmt: skip


def test_idle_vms_parked_on_the_idle_host_then_woken_back_home(tmp_path) -> None:
    fc = IdleCluster({"a1": ("h1", 0.0), "a2": ("h1", 0.0), "b1": ("h2", 0.0), "c1": ("h3", 0.0)})
    ctl = idle_controller(tmp_path, fc, max_migrations=2, cooldown_s=0)
    r = ctl.round()
    assert r["execution"]["state"] == "done"
    assert len(fc.moves) == 2 and {d for _v, _s, d in fc.moves} == {"h3"}
    assert len(r["execution"]["held"]) == 1 and "rate limit" in r["execution"]["held"][0]["reason"]
    ctl.round()
    # Every idle VM is on the idle host and shrunk; h1 and h2 are empty.
    assert set(fc.where.values()) == {"h3"} and all(m < 256 for m in fc.mem.values()), (fc.where, fc.mem)
    n = len(fc.moves)
    assert "execution" not in ctl.round() and len(fc.moves) == n  # nothing left to do: no churn
    # a2 wakes (a busy guest): back home to h1 and grown to its full size; the others stay parked.
    fc.use["a2"] = 0.9
    ctl.round()
    assert fc.where["a2"] == "h1" and fc.mem["a2"] == 256.0
    assert {vm for vm, h in fc.where.items() if h == "h3"} == {"a1", "b1", "c1"}
    j = Journal(tmp_path / "j.sqlite")
    rounds = j.decisions(kind="round")
    assert rounds[0]["inputs"]["config"]["idle_host"] == "h3"


def test_idle_round_parks_what_fits_and_holds_back_the_rest_with_the_reason(tmp_path) -> None:
    # h3 (the idle host) has 3 of its 4 cores allocated: one more 1-vCPU VM fits, not two. The
    # idle planner sizes h3 by memory only; the round used to be refused whole (nothing parked).
    fc = IdleCluster({"a1": ("h1", 0.0), "a2": ("h1", 0.0), "c1": ("h3", 0.0), "c2": ("h3", 0.0),
                      "c3": ("h3", 0.0)})  # fmt: skip
    ctl = idle_controller(tmp_path, fc, max_migrations=2, cooldown_s=0)
    r = ctl.round()
    assert r["execution"]["state"] == "done", r
    assert fc.moves == [("a1", "h1", "h3")]
    (held,) = r["execution"]["held"]
    assert held["vm"] == "a2" and "h3 would be over capacity: cpu 5 > 4" in held["reason"]
    assert fc.where["a2"] == "h1" and fc.mem["a2"] == 256.0  # held back whole: not shrunk either
    assert fc.mem["a1"] < 256 and all(fc.mem[c] < 256 for c in ("c1", "c2", "c3"))
    j = Journal(tmp_path / "j.sqlite")
    assert [d["vm"] for d in j.decisions(kind="held-back")] == ["a2"]
    # A plan handed in from outside is still checked whole and refused (nothing half done).
    res = ctl.execute_plan({"moves": [{"vm": "a2", "from": "h1", "to": "h3"}]}, "test")
    assert res["state"] == "refused" and "h3 would be over capacity after the plan: cpu 5 > 4" in res["reason"]


def test_one_noisy_cpu_sample_does_not_wake_a_parked_vm(tmp_path) -> None:
    # The lab run: a parked idle guest showed one sample of 0.23 while burners saturated the idle
    # host, and was moved home and grown, then parked again 12 s later. Now it takes 2 samples.
    fc = IdleCluster({"a1": ("h1", 0.0), "c1": ("h3", 0.0)})
    ctl = idle_controller(tmp_path, fc, cooldown_s=0, idle={"wake_samples": 2})
    ctl.round()
    assert fc.where["a1"] == "h3" and fc.mem["a1"] < 256
    fc.series["a1"] = [0.0] * 11 + [0.23]
    r = ctl.round()
    assert fc.where["a1"] == "h3" and not r["planned"]
    fc.series["a1"] = [0.0] * 10 + [0.9, 0.95]
    r = ctl.round()
    assert fc.where["a1"] == "h1" and fc.mem["a1"] == 256.0
    assert r["planned"][0]["reason"] == "awake (CPU 0.95 >= 0.2 in the last 2 samples); back to h1"


class FloorExecutor(IdleExecutor):
    """h3's daemon refuses a shrink below its guest floor, as in the lab run (the plan a round old)."""

    def __init__(self, fc: FakeCluster, hosts, floor: dict[str, int]) -> None:
        super().__init__(fc, hosts)
        self.floor = floor

    def set_memory(self, s: MemorySpec) -> dict[str, Any]:
        if s.mem_mib < self.floor.get(s.vm, 0):
            return {**s.to_dict(), "ok": False, "error": f"target_mib {s.mem_mib} below the safe floor "
                                                           f"({self.floor[s.vm]} MiB)"}  # fmt: skip
        return super().set_memory(s)


def test_a_refused_shrink_skips_only_that_vms_steps_and_is_logged(tmp_path) -> None:
    # The lab journal: h3's daemon refused one shrink (below its safe floor) and the rest of the
    # plan, other VMs' shrinks and moves, was skipped until the next round.
    fc = IdleCluster({"c1": ("h3", 0.0), "a1": ("h1", 0.0), "b1": ("h2", 0.0)})
    hosts = {h: HostEntry(h, f"qemu+tcp://{h}/system", f"/run/{h}.sock") for h in fc.hosts}
    cfg = ControllerConfig(hosts=hosts, journal=tmp_path / "j.sqlite", period_s=0.01, idle_host="h3",
                           thresholds={"cpu": 10.0, "mem": 10.0}, max_migrations=2, cooldown_s=0)  # fmt: skip
    ctl = Controller(cfg, fetch=lambda spec: fc.inventory(spec.split("/")[-1].removesuffix(".sock")),
                     make_executor=lambda hs: FloorExecutor(fc, hs, {"c1": 131}))  # fmt: skip
    # c1 (on h3) comes first in the plan: its shrink is refused; a1 and b1 are still parked.
    plan = {"idle": {"actions": [
        {"kind": "shrink", "vm": "c1", "src": "h3", "mem_to": 128},
        {"kind": "shrink", "vm": "a1", "src": "h1", "mem_to": 128},
        {"kind": "move", "vm": "a1", "src": "h1", "dst": "h3"},
        {"kind": "shrink", "vm": "b1", "src": "h2", "mem_to": 128},
        {"kind": "move", "vm": "b1", "src": "h2", "dst": "h3"},
    ]}}  # fmt: skip
    res = ctl.execute_plan(plan, "test")
    assert res["state"] == "failed" and [r["ok"] for r in res["results"]] == [False, True, True, True, True]
    assert fc.where == {"c1": "h3", "a1": "h3", "b1": "h3"} and fc.mem == {"c1": 256.0, "a1": 128.0, "b1": 128.0}
    j = Journal(tmp_path / "j.sqlite")
    (p,) = j.plans()
    assert p["state"] == "failed" and "step 0 (shrink of c1) failed: target_mib 128 below the safe floor" in p["reason"]
    assert [s["state"] for s in j.steps(p["id"])] == ["failed", "done", "done", "done", "done"]
    (d,) = j.decisions(kind="step-refused")
    assert d["vm"] == "c1" and "safe floor" in d["outcome"]["error"]
    # The refused VM's own later steps are skipped (its move was sized on the shrink), with the reason.
    fc2 = IdleCluster({"a1": ("h1", 0.0), "b1": ("h2", 0.0)})
    ctl2 = Controller(ControllerConfig(hosts=hosts, journal=tmp_path / "j2.sqlite", idle_host="h3"),
                      fetch=lambda spec: fc2.inventory(spec.split("/")[-1].removesuffix(".sock")),
                      make_executor=lambda hs: FloorExecutor(fc2, hs, {"a1": 131}))  # fmt: skip
    res = ctl2.execute_plan({"idle": {"actions": plan["idle"]["actions"][1:]}}, "test")
    assert fc2.moves == [("b1", "h2", "h3")] and fc2.where["a1"] == "h1"
    assert res["results"][1]["skipped"] and "step 0 (shrink of a1) failed" in res["results"][1]["error"]
    (p2,) = Journal(tmp_path / "j2.sqlite").plans()
    assert [s["state"] for s in Journal(tmp_path / "j2.sqlite").steps(p2["id"])] == ["failed", "skipped", "done", "done"]
