"""The guest agent's container logic on the host: parsing, validation, and the manager's
bookkeeping on a cgroup-v2-shaped folder (the kernel's side is played by a few lines below;
the real thing is tested inside guests in tests/vm/test_containers.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from symbiont_agent import agent, containers_policy
from symbiont_agent import containers as ct
from symbiont_agent import containers_cgroup as cg
from symbiont_agent import protocol as proto

MiB = 1 << 20


# -- parsers -------------------------------------------------------------------------------
def test_parsers() -> None:
    assert cg.parse_flat_keyed("usage_usec 10\nuser_usec 7\nbad\nx y\n") == {"usage_usec": 10, "user_usec": 7}
    p = cg.parse_pressure("some avg10=1.50 avg60=0.00 avg300=0.00 total=123\nfull avg10=0.00 total=4\n")
    assert p == {"some_avg10": 1.5, "some_avg60": 0.0, "some_avg300": 0.0, "some_total_us": 123.0,
                 "full_avg10": 0.0, "full_total_us": 4.0}
    assert cg.parse_cpu_max("max 100000") == (None, 100000)
    assert cg.parse_cpu_max("50000 100000\n") == (50000, 100000)
    assert cg.format_cpu_max(None) == "max 100000" and cg.format_cpu_max(2000, 10000) == "2000 10000"
    with pytest.raises(ValueError):
        cg.format_cpu_max(10)
    assert cg.parse_mem_value("max\n") is None and cg.parse_mem_value("4096") == 4096
    assert cg.format_mem_value(None) == "max"
    with pytest.raises(ValueError):
        cg.format_mem_value(-1)
    assert cg.parse_cpu_list("0-2,5\n") == [0, 1, 2, 5] and cg.parse_cpu_list("") == []
    assert cg.format_cpu_list([5, 0, 1, 2]) == "0-2,5" and cg.format_cpu_list([]) == ""
    for bad in ("a", "3-1", "-1"):
        with pytest.raises(ValueError):
            cg.parse_cpu_list(bad)
    assert cg.parse_proc_cgroup("0::/system.slice/x.service\n") == "/system.slice/x.service"
    assert cg.parse_proc_cgroup("12:cpu:/x\n") is None
    mounts = ("tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n")
    assert cg.parse_cgroup2_mounts(mounts) == ["/sys/fs/cgroup/unified"]
    assert cg.parse_cgroup2_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == ["/sys/fs/cgroup"]


def test_cgroup_names_cannot_escape() -> None:
    g = cg.Cgroup("/sys/fs/cgroup/symbiont-ct")
    for bad in ("", "..", "a/b", "."):
        with pytest.raises(cg.CgroupError):
            g.child(bad)
    with pytest.raises(cg.CgroupError):
        g.file("../cgroup.procs")


def test_parse_bytes_and_cpu_max() -> None:
    assert ct.parse_bytes("m", "256M") == 256 * MiB and ct.parse_bytes("m", "1GiB") == 1 << 30
    assert ct.parse_bytes("m", 4096) == 4096 and ct.parse_bytes("m", "max") is None
    for bad in (-1, True, "12X", 1.5, [1]):
        with pytest.raises(ct.InvalidSpec):
            ct.parse_bytes("m", bad)
    assert ct.parse_cpu_max(1.5) == (150000, 100000)
    assert ct.parse_cpu_max("20000 50000") == (20000, 50000) and ct.parse_cpu_max("max") == (None, 100000)
    for bad in (0, -1, "x", "10 100000", "1000 5", True):
        with pytest.raises(ct.InvalidSpec):
            ct.parse_cpu_max(bad)


def test_validate_limits_errors_name_the_field() -> None:
    online = [0, 1]
    good = ct.validate_limits({"cpu_weight": 200, "cpuset": "0-1", "memory_max": "128M", "memory_low": "16M",
                               "no_reclaim": True, "pids_max": 50}, online)
    assert good["cpuset"] == "0-1" and good["memory_max"] == 128 * MiB and good["no_reclaim"] is True
    cases = [
        ({"cpu_weight": -5}, "cpu_weight"),
        ({"cpu_weight": 0}, "cpu_weight"),
        ({"cpu_weight": 1.5}, "cpu_weight"),
        ({"cpuset": "0-3"}, "not online"),
        ({"cpuset": [7]}, "not online"),
        ({"cpuset": "x"}, "cpuset"),
        ({"memory_low": "64M", "memory_high": "32M"}, "memory_low"),
        ({"cpu_ratio": 1, "cpu_weight": 10}, "cpu_ratio manages"),
        ({"cpu_ratio": 0}, "cpu_ratio"),
        ({"no_reclaim": "yes"}, "no_reclaim"),
        ({"surprise": 1}, "unknown limit"),
        ({"mem_shares": -1}, "mem_shares"),
    ]
    for args, msg in cases:
        with pytest.raises(ct.InvalidSpec, match=msg):
            ct.validate_limits(args, online)


def test_validate_command_and_name() -> None:
    assert ct.validate_command(["sh", "-c", "true"])[0].endswith("/sh")
    for bad in ([], "sh -c true", [1], ["no-such-program-here"], ["x"] * 65, ["a" * 5000]):
        with pytest.raises(ct.InvalidSpec):
            ct.validate_command(bad)
    assert ct.validate_name("web-1") == "web-1"
    for bad in ("", "../x", "a.b", "cgroup.procs", "x" * 40, 3, "-x"):
        with pytest.raises(ct.InvalidSpec):
            ct.validate_name(bad)


# -- the manager on a cgroup-shaped folder ---------------------------------------------------------
GROUP_FILES = {
    "cgroup.procs": "", "cgroup.kill": "", "cgroup.events": "populated 0\n", "cgroup.subtree_control": "",
    "cgroup.controllers": "cpuset cpu memory pids\n", "cpu.weight": "100\n", "cpu.max": "max 100000\n",
    "cpuset.cpus": "\n", "cpuset.cpus.effective": "0-3\n", "memory.max": "max\n", "memory.high": "max\n",
    "memory.low": "0\n", "memory.min": "0\n", "memory.current": "0\n", "memory.reclaim": "",
    "memory.stat": "anon 0\nfile 0\n", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", "pids.max": "max\n",
}


@pytest.fixture
def kernel(monkeypatch):
    """Make plain folders behave like cgroup v2 groups where the manager relies on it."""
    real_write = cg.Cgroup.write

    def write(self: cg.Cgroup, name: str, value: str) -> None:
        if name == "cgroup.subtree_control":
            cur = set(self.read(name).split())
            for tok in value.split():
                (cur.add if tok[0] == "+" else cur.discard)(tok[1:])
            value = " ".join(sorted(cur))
        elif name == "memory.reclaim":
            left = max(0, self.memory_current() - int(value))
            real_write(self, "memory.current", str(left))
            return
        elif name == "cgroup.kill":
            real_write(self, "cgroup.events", "populated 0\n")
            return
        elif name == "cpu.weight" and not 1 <= int(value) <= 10000:
            raise cg.CgroupError("write: Invalid argument")
        real_write(self, name, value)

    def create(self: cg.Cgroup) -> bool:
        if os.path.isdir(self.path):
            return False
        os.mkdir(self.path)
        for f, v in GROUP_FILES.items():
            Path(self.path, f).write_text(v)
        return True

    monkeypatch.setattr(cg.Cgroup, "write", write)
    monkeypatch.setattr(cg.Cgroup, "create", create)
    monkeypatch.setattr(cg.Cgroup, "remove", lambda self, timeout=2.0: shutil.rmtree(self.path, ignore_errors=True))


@pytest.fixture
def mgr(tmp_path, kernel) -> ct.ContainerManager:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (root / "cgroup.subtree_control").write_text("memory pids\n")
    (root / "cgroup.procs").write_text("1\n")
    cpus = tmp_path / "cpu"
    cpus.mkdir()
    (cpus / "online").write_text("0-3\n")
    (tmp_path / "meminfo").write_text("MemTotal: 480000 kB\nMemFree: 10000 kB\n")
    return ct.ContainerManager(root=str(root), state_path=str(tmp_path / "run/containers.json"),
                               log_dir=str(tmp_path / "log"), cpu_root=str(cpus),
                               meminfo_path=str(tmp_path / "meminfo"))


def read(m: ct.ContainerManager, name: str, f: str) -> str:
    return Path(m.slice.path, name, f).read_text().strip()


def mk(m: ct.ContainerManager, name: str, running: bool = True, **limits) -> dict:
    v = m.create({"name": name, "command": ["sleep", "1000"], "limits": limits, "start": False})
    if running:
        m.containers[name].state = "running"  # as if started: the fake kernel runs nothing
        Path(m.slice.path, name, "cgroup.events").write_text("populated 1\n")
    return v


def test_create_applies_limits_and_enables_controllers(mgr) -> None:
    v = mk(mgr, "web", running=False, cpu_weight=300, cpu_max=1.5, cpuset="1-2", memory_max="256M",
           memory_high="200M", memory_low="32M", pids_max=64)
    assert v["state"] == "created" and v["command"][0].endswith("/sleep")
    assert read(mgr, "web", "cpu.weight") == "300" and read(mgr, "web", "cpu.max") == "150000 100000"
    assert read(mgr, "web", "cpuset.cpus") == "1-2"
    assert read(mgr, "web", "memory.max") == str(256 * MiB) and read(mgr, "web", "memory.high") == str(200 * MiB)
    assert read(mgr, "web", "memory.low") == str(32 * MiB) and read(mgr, "web", "pids.max") == "64"
    assert set(mgr.root.subtree_control()) >= {"cpu", "cpuset", "memory", "pids"}
    assert set(mgr.slice.subtree_control()) == {"cpu", "cpuset", "memory", "pids"}
    assert mgr.ledger["root.subtree_control.added"] == ["cpu", "cpuset"]
    assert v["applied"]["cpu.max"] == [150000, 100000] and v["applied"]["memory.low"] == 32 * MiB
    # State survives an agent restart.
    again = ct.ContainerManager(root=mgr.root.path, state_path=mgr.state_path, log_dir=mgr.log_dir,
                                cpu_root=mgr.cpu_root)
    assert again.list()["containers"][0]["limits"]["cpu_weight"] == 300


def test_bad_input_changes_nothing(mgr) -> None:
    mk(mgr, "a", running=False, cpu_weight=100)
    before = json.loads(Path(mgr.state_path).read_text())
    files = sorted(p.name for p in Path(mgr.slice.path).iterdir())
    bad = [
        ({"name": "a", "command": ["true"]}, ct.Conflict),
        ({"name": "b", "command": ["true"], "limits": {"cpuset": "0-7"}}, ct.InvalidSpec),
        ({"name": "b", "command": ["true"], "limits": {"cpu_weight": -1}}, ct.InvalidSpec),
        ({"name": "b", "command": ["/no/such/binary"]}, ct.InvalidSpec),
        ({"name": "b/../../x", "command": ["true"]}, ct.InvalidSpec),
        ({"name": "b", "command": ["true"], "oops": 1}, ct.InvalidSpec),
    ]
    for args, exc in bad:
        with pytest.raises(exc):
            mgr.create(args)
    for name, limits, exc in (("a", {"cpu_weight": 0}, ct.InvalidSpec), ("a", {"cpuset": "9"}, ct.InvalidSpec),
                              ("nope", {"cpu_weight": 5}, ct.NoSuchContainer), ("a", {}, ct.InvalidSpec)):
        with pytest.raises(exc):
            mgr.set_limits(name, limits)
    for call in (mgr.start, mgr.stop, mgr.destroy, mgr.show):
        with pytest.raises(ct.NoSuchContainer):
            call("nope")
    assert json.loads(Path(mgr.state_path).read_text()) == before
    assert sorted(p.name for p in Path(mgr.slice.path).iterdir()) == files
    assert read(mgr, "a", "cpu.weight") == "100"


def test_set_limits_changes_and_rolls_back(mgr, monkeypatch) -> None:
    mk(mgr, "a", running=False, cpu_weight=100, memory_max="64M")
    v = mgr.set_limits("a", {"cpu_weight": 700, "memory_max": None})
    assert read(mgr, "a", "cpu.weight") == "700" and read(mgr, "a", "memory.max") == "max"
    assert v["limits"]["cpu_weight"] == 700
    real = cg.Cgroup.write

    def failing(self, name, value):  # the kernel refuses memory.high: everything goes back
        if name == "memory.high" and value != "max":
            raise cg.CgroupError("write: Device or resource busy")
        real(self, name, value)

    monkeypatch.setattr(cg.Cgroup, "write", failing)
    with pytest.raises(ct.InvalidSpec, match="rolled back"):
        mgr.set_limits("a", {"cpu_weight": 50, "memory_high": "32M"})
    assert read(mgr, "a", "cpu.weight") == "700" and mgr.containers["a"].limits["cpu_weight"] == 700


def test_ratio_managed_containers_follow_the_online_cpus(mgr) -> None:
    for name, r in (("c1", 1), ("c2", 1), ("c3", 4)):
        mk(mgr, name, cpu_ratio=r)
    plan = mgr.rebalance("request")
    assert plan["allocations"]["c3"]["dedicated"] == [2, 3]
    assert read(mgr, "c3", "cpuset.cpus") == "0-3" and read(mgr, "c1", "cpuset.cpus") == "0-1"
    assert read(mgr, "c3", "cpu.max") == "266667 100000" and read(mgr, "c3", "cpu.weight") == "1000"
    Path(mgr.cpu_root, "online").write_text("0\n")
    mgr.rebalance("cpus")
    assert [read(mgr, n, "cpu.max") for n in ("c1", "c2", "c3")] == ["16667 100000"] * 2 + ["66667 100000"]
    assert read(mgr, "c3", "cpuset.cpus") == "0"
    # Agnostic: a vCPU change leaves the allocation as it was (the baseline) ...
    mgr.set_mode({"nesting_aware": False})
    Path(mgr.cpu_root, "online").write_text("0-3\n")
    mgr.set_mode({"nesting_aware": False})  # re-applies for the CPUs online now: 4
    Path(mgr.cpu_root, "online").write_text("0-1\n")
    res = mgr.rebalance("cpus")
    assert res["applied"] is False and read(mgr, "c3", "cpu.max") == "266667 100000"
    assert read(mgr, "c3", "cpu.weight") == "100"  # absolute terms only, like docker --cpus
    # ... and nesting-aware again re-applies at once.
    res = mgr.set_mode({"nesting_aware": True, "cpu_strategy": "quota"})
    assert res["plan"]["applied"] and read(mgr, "c3", "cpu.max") == "133333 100000"
    assert read(mgr, "c3", "cpuset.cpus") == "0-1"
    with pytest.raises(ct.InvalidSpec):
        mgr.set_mode({"cpu_strategy": "random"})


def test_stopped_containers_leave_the_ratio_plan(mgr) -> None:
    mk(mgr, "a", cpu_ratio=1)
    mk(mgr, "b", cpu_ratio=1)
    assert mgr.rebalance()["allocations"]["a"]["cpus"] == 2.0
    mgr.stop("b")
    assert mgr.containers["b"].state == "stopped"
    assert set(mgr.last_plan["allocations"]) == {"a"} and read(mgr, "a", "cpu.max") == "400000 100000"


def set_usage(m: ct.ContainerManager, name: str, nbytes: int) -> None:
    Path(m.slice.path, name, "memory.current").write_text(f"{nbytes}\n")


def test_reclaim_by_shares_protects_no_reclaim_and_release_restores(mgr) -> None:
    mk(mgr, "a", mem_shares=1)
    mk(mgr, "b", mem_shares=3, memory_high="500M")
    mk(mgr, "keep", no_reclaim=True)
    for n in ("a", "b", "keep"):
        set_usage(mgr, n, 100 * MiB)
    res = mgr.reclaim({"bytes": 80 * MiB, "use_free": False})
    rows = res["containers"]
    assert rows["keep"]["planned"] == 0 and rows["keep"]["status"] == "skipped"
    assert rows["a"]["planned"] == 70 * MiB and rows["b"]["planned"] == 10 * MiB
    assert rows["a"]["freed"] == 70 * MiB and res["freed"] == 80 * MiB
    assert read(mgr, "a", "memory.high") == str(30 * MiB) and read(mgr, "b", "memory.high") == str(90 * MiB)
    # no-reclaim protection: memory.min of the container, and exactly that on the subtree.
    protect = 100 * MiB + ct.PROTECT_HEADROOM
    assert read(mgr, "keep", "memory.min") == str(protect) and read(mgr, "a", "memory.min") == "0"
    assert Path(mgr.slice.path, "memory.min").read_text().strip() == str(protect)
    rel = mgr.release()
    assert rel["restored_memory_high"] == {"a": None, "b": 500 * MiB}
    assert read(mgr, "a", "memory.high") == "max" and read(mgr, "b", "memory.high") == str(500 * MiB)
    # The guest's free memory counts first: here it covers the request, nothing is reclaimed.
    Path(mgr.meminfo_path).write_text("MemFree: 512000 kB\n")
    assert mgr.reclaim({"bytes": 80 * MiB})["needed"] == 0
    for bad in ({"bytes": -1}, {"bytes": "1"}, {"bytes": 1, "use_free": 1}, {}):
        with pytest.raises(ct.InvalidSpec):
            mgr.reclaim(bad)


def test_agnostic_mode_has_no_protection(mgr) -> None:
    mk(mgr, "keep", no_reclaim=True)
    set_usage(mgr, "keep", 50 * MiB)
    mgr.set_mode({"nesting_aware": False})
    assert read(mgr, "keep", "memory.min") == "0"
    mgr.set_mode({"nesting_aware": True})
    assert int(read(mgr, "keep", "memory.min")) == 50 * MiB + ct.PROTECT_HEADROOM


def test_destroy_restores_what_was_changed_outside_the_group(mgr) -> None:
    mk(mgr, "a")
    mk(mgr, "keep", no_reclaim=True)
    set_usage(mgr, "keep", 10 * MiB)
    mgr.reclaim({"bytes": 0})
    assert int(Path(mgr.slice.path, "memory.min").read_text()) > 0
    res = mgr.destroy("keep")
    assert res["restored"]["slice.memory.min"]["slice"] == 0
    assert Path(mgr.slice.path, "memory.min").read_text().strip() == "0"
    assert not Path(mgr.slice.path, "keep").exists()
    res = mgr.destroy("a")
    assert res["restored"]["subtree"]["removed"] == mgr.slice.path
    assert not Path(mgr.slice.path).exists()
    assert mgr.root.subtree_control() == {"memory", "pids"}  # root controllers as they were
    assert mgr.list()["containers"] == []


def test_views_read_usage(mgr) -> None:
    mk(mgr, "a")
    Path(mgr.slice.path, "a", "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
                                                     "nr_throttled 3\nthrottled_usec 1000\n")
    set_usage(mgr, "a", 42)
    u = mgr.list()["containers"][0]["usage"]
    assert u["cpu_usage_usec"] == 2_500_000 and u["nr_throttled"] == 3 and u["memory_current"] == 42
    full = mgr.show("a")
    assert "memory_pressure" in full["usage"] and full["log"].endswith("a.log")


# -- the agent ops ------------------------------------------------------------------------------------
def msg(header: dict) -> proto.Message:
    return proto.FrameReader().feed(proto.encode(header))[0]


def test_ops_are_registered_and_errors_are_typed(mgr, monkeypatch) -> None:
    agent.load_op_modules()
    from symbiont_agent import ops_containers

    monkeypatch.setattr(ops_containers, "MANAGER", mgr)
    reply, _ = agent.handle(msg(proto.hello("host", "0", [])))
    assert {"ct-create", "ct-list", "ct-reclaim", "ct-mode", "online-cpus"} <= set(reply["caps"])
    reply, _ = agent.handle(msg(proto.request(1, "ct-show", {"name": "ghost"})))
    assert not reply["ok"] and reply["error"]["code"] == "not_found"
    assert reply["error"]["message"].startswith("NoSuchContainer: ")
    reply, _ = agent.handle(msg(proto.request(2, "ct-create", {"name": "x", "command": ["true"],
                                                               "limits": {"cpu_weight": -3}})))
    assert not reply["ok"] and reply["error"]["code"] == "invalid"
    assert reply["error"]["message"].startswith("InvalidSpec: cpu_weight")
    reply, _ = agent.handle(msg(proto.request(3, "ct-create", {"name": "x", "command": ["true"], "start": False,
                                                               "limits": {"cpu_ratio": 2}})))
    assert reply["ok"] and reply["result"]["state"] == "created"
    reply, _ = agent.handle(msg(proto.request(4, "ct-list")))
    assert [c["name"] for c in reply["result"]["containers"]] == ["x"]


def test_online_cpus_reapplies_the_plan(mgr, monkeypatch) -> None:
    agent.load_op_modules()
    from symbiont_agent import ops_containers

    monkeypatch.setattr(ops_containers, "MANAGER", mgr)
    calls = []

    def fake_online(args, payload):  # never touch this host's real CPUs
        calls.append(args)
        Path(mgr.cpu_root, "online").write_text("0-1\n")
        return {"onlined": [], "offlined": [2, 3], "online": [0, 1], "present": [0, 1, 2, 3]}

    monkeypatch.setattr(ops_containers, "_base_online_cpus", fake_online)
    mk(mgr, "a", cpu_ratio=1)
    mk(mgr, "b", cpu_ratio=3)
    reply, _ = agent.handle(msg(proto.request(9, "online-cpus", {"target": 2})))
    assert reply["ok"] and calls == [{"target": 2}]
    alloc = reply["result"]["containers"]["allocations"]
    assert alloc["b"]["quota_us"] == 150000 and alloc["a"]["quota_us"] == 50000
    assert read(mgr, "b", "cpu.max") == "150000 100000"
    assert containers_policy.cpu_plan([0, 1], {"a": 1, "b": 3})["b"].quota_us == 150000


def test_other_agent_parts_can_reclaim_by_shares(mgr, monkeypatch) -> None:
    agent.load_op_modules()
    from symbiont_agent import ops_containers

    monkeypatch.setattr(ops_containers, "MANAGER", mgr)
    assert ops_containers.reclaim_by_shares(1 << 20)["freed_bytes"] == 0  # no containers yet
    mk(mgr, "a", mem_shares=1)
    mk(mgr, "keep", no_reclaim=True)
    set_usage(mgr, "a", 40 * MiB)
    set_usage(mgr, "keep", 40 * MiB)
    res = ops_containers.reclaim_by_shares(10 * MiB)
    assert res["freed_bytes"] == 10 * MiB and res["containers"]["keep"]["planned"] == 0
    assert read(mgr, "a", "memory.high") == "max"  # no hold unless asked
    set_usage(mgr, "keep", 60 * MiB)
    reply, _ = agent.handle(msg(proto.request(5, "ct-protect")))
    assert reply["ok"] and reply["result"]["containers"]["keep"] == 60 * MiB + ct.PROTECT_HEADROOM
    assert int(Path(mgr.slice.path, "memory.min").read_text()) == 60 * MiB + ct.PROTECT_HEADROOM
