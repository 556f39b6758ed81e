"""The CPU part's API and controller with a real Daemon object, a fake libvirt and an agent whose
requests go through the real agent ops and container manager (on the cgroup-shaped folder of
test_agent_containers): validation, error mapping, guest-first scale-down, accepted unplug
timeouts, the vCPU record, nesting-aware ballooning and restoring on stop."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from symbiont.agentlink import AgentOpError, _op_error
from symbiont.config import load_config
from symbiont.cpu import controller as cpu_controller
from symbiont.daemon import Daemon
from symbiont.host.libvirt_host import DomainInfo, LibvirtError
from symbiont_agent import agent
from symbiont_agent import protocol as proto
from symbiont_agent.containers_cgroup import parse_cpu_list
from tests.unit.test_agent_containers import kernel, mgr, set_usage  # noqa: F401  (fixtures)

VM = "vm1"
MiB = 1 << 20


class FakeLibvirt:
    def __init__(self) -> None:
        self.vcpus = 1
        self.memory_kib = 512 * 1024
        self.unplug_times_out = True
        self.calls: list[tuple[str, int]] = []
        self.conn = self

    def isAlive(self) -> bool:  # noqa: N802 (libvirt's name)
        return True

    def close(self) -> None:
        pass

    def info(self, name: str) -> DomainInfo:
        if name != VM:
            raise LibvirtError(f"no domain {name}")
        return DomainInfo(name, "uuid-1", "running", self.memory_kib, 512 * 1024, self.vcpus, 4, "qemu")

    def set_vcpus(self, name: str, count: int) -> None:
        self.calls.append(("vcpus", count))
        if count < self.vcpus and self.unplug_times_out:
            raise LibvirtError(f"{name}: setting {count} vCPUs failed: Timed out during operation: "
                               "vcpu unplug request timed out")
        self.vcpus = count

    def set_balloon(self, name: str, kib: int) -> None:
        self.calls.append(("balloon", kib // 1024))
        self.memory_kib = kib

    def domain(self, name: str) -> Any:
        raise LibvirtError("no monitor in this test")

    def qemu_pid(self, name: str) -> None:
        return None

    def memory_stats(self, name: str) -> dict[str, int]:
        return {}

    def channel_path(self, name: str, target: str) -> None:
        return None


class FakeLink:
    """An agent link whose requests run the real agent ops in this process."""

    def __init__(self) -> None:
        self.ready = self.cooperative = self.connected = True
        self.caps = sorted(agent.OPS)
        self.hello = {"caps": self.caps}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.ids = itertools.count(1)

    async def request(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
                      timeout: float | None = None) -> tuple[Any, bytes]:
        self.requests.append((op, dict(args or {})))
        frame = proto.FrameReader().feed(proto.encode(proto.request(next(self.ids), op, args or {})))[0]
        reply, _ = agent.handle(frame)
        if not reply["ok"]:
            raise _op_error(reply["error"])  # as the real link does
        return reply["result"], b""

    async def stop(self) -> None:
        pass


@pytest.fixture
def env(tmp_path, mgr, monkeypatch):  # noqa: F811
    agent.load_op_modules()
    from symbiont_agent import ops_containers

    monkeypatch.setattr(ops_containers, "MANAGER", mgr)
    online = Path(mgr.cpu_root, "online")
    lv = FakeLibvirt()

    def fake_online(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        pres = list(range(lv.vcpus))
        target = args.get("target") or len(pres)
        if not 1 <= target <= len(pres):
            raise ValueError(f"target {target} outside 1..{len(pres)} present CPUs")
        online.write_text(f"0-{target - 1}\n" if target > 1 else "0\n")
        return {"online": list(range(target)), "present": pres}

    def fake_stats(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        on = parse_cpu_list(online.read_text())
        return {"cpus": {"online": on, "present": list(range(lv.vcpus)), "count_online": len(on)}}

    monkeypatch.setattr(ops_containers, "_base_online_cpus", fake_online)
    monkeypatch.setitem(agent.OPS, "stats", fake_stats)
    online.write_text("0\n")
    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "d.sock")})
    d = Daemon(cfg)
    d._libvirt = lv  # type: ignore[assignment]
    d.store.add_vm(VM, "uuid-1", {"memory": {"min_mib": 128}, "cpu": {}})
    link = FakeLink()
    d.links[VM] = link  # type: ignore[assignment]
    from symbiont.api import create_app

    app = create_app(d)
    with TestClient(app) as client:
        yield {"client": client, "daemon": d, "libvirt": lv, "link": link, "mgr": mgr, "online": online}
    d.store.close()


def test_container_crud_and_error_mapping(env) -> None:
    c = env["client"]
    r = c.post(f"/v1/cpu/vms/{VM}/containers", json={"name": "a", "command": ["sleep", "9"], "start": False,
                                                     "limits": {"cpu_weight": 200, "memory_max": "64M"}})
    assert r.status_code == 201, r.text
    assert r.json()["applied"]["cpu.weight"] == 200 and r.json()["limits"]["memory_max"] == 64 * MiB
    assert [x["name"] for x in c.get(f"/v1/cpu/vms/{VM}/containers").json()["containers"]] == ["a"]
    cases = [
        (c.get, f"/v1/cpu/vms/{VM}/containers/ghost", None, 404, "no container 'ghost'"),
        (c.get, "/v1/cpu/vms/nope/containers", None, 404, "not registered"),
        (c.post, f"/v1/cpu/vms/{VM}/containers", {"name": "a", "command": ["true"]}, 409, "already exists"),
        (c.post, f"/v1/cpu/vms/{VM}/containers", {"name": "b", "command": ["true"],
                                                  "limits": {"cpu_weight": -1}}, 422, "cpu_weight"),
        (c.post, f"/v1/cpu/vms/{VM}/containers", {"name": "b", "command": ["true"],
                                                  "limits": {"cpuset": "0-2"}}, 422, "not online"),
        (c.post, f"/v1/cpu/vms/{VM}/containers", {"name": "b/..", "command": ["true"]}, 422, "name"),
        (c.post, f"/v1/cpu/vms/{VM}/containers", {"name": "b", "command": []}, 422, "command"),
        (c.post, f"/v1/cpu/vms/{VM}/containers", {"name": "b", "command": ["true"], "x": 1}, 422, "x"),
        (c.patch, f"/v1/cpu/vms/{VM}/containers/a", {"memory_low": "1G", "memory_high": "1M"}, 422, "memory_low"),
        (c.put, f"/v1/cpu/vms/{VM}/mode", {"cpu_strategy": "random"}, 422, "cpu_strategy"),
    ]
    for call, path, body, status, reason in cases:
        r = call(path, json=body) if body is not None else call(path)
        assert r.status_code == status, (path, body, r.text)
        assert reason in r.text, (path, r.text)
    assert c.get(f"/v1/cpu/vms/{VM}/containers/a").json()["applied"]["cpu.weight"] == 200
    r = c.patch(f"/v1/cpu/vms/{VM}/containers/a", json={"cpu_weight": 900})
    assert r.status_code == 200 and r.json()["applied"]["cpu.weight"] == 900
    r = c.delete(f"/v1/cpu/vms/{VM}/containers/a")
    assert r.status_code == 200 and r.json()["destroyed"] == "a"
    actions = [d["action"] for d in c.get("/v1/decisions").json()]
    assert "ct-create" in actions and "ct-destroy" in actions


def make_ratio_containers(env) -> None:
    for name, r in (("c1", 1), ("c2", 1), ("c3", 4)):
        env["mgr"].create({"name": name, "command": ["sleep", "9"], "limits": {"cpu_ratio": r}, "start": False})
        env["mgr"].containers[name].state = "running"
        Path(env["mgr"].slice.path, name, "cgroup.events").write_text("populated 1\n")


def quota(env, name: str) -> str:
    return Path(env["mgr"].slice.path, name, "cpu.max").read_text().strip()


def test_scale_up_then_down_guest_first_keeps_ratios_and_the_record(env) -> None:
    c, lv, link = env["client"], env["libvirt"], env["link"]
    make_ratio_containers(env)
    r = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 4})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["step"]["direction"] == "up" and up["libvirt"] == "ok" and lv.vcpus == 4
    assert up["after"]["guest_online"] == 4 and quota(env, "c3") == "266667 100000"
    assert up["containers"]["allocations"]["c3"]["dedicated"] == [2, 3]
    link.requests.clear()
    down = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 1}).json()
    # Guest first, libvirt not asked by default: its count stays, the record says so.
    assert [op for op, _ in link.requests][:2] == ["stats", "online-cpus"]
    assert lv.calls[-1] == ("vcpus", 4) and down["libvirt"].startswith("skipped")
    assert down["after"] == {"guest_online": 1, "online": [0], "libvirt": 4, "qemu": None}
    assert [quota(env, n) for n in ("c1", "c2", "c3")] == ["16667 100000", "16667 100000", "66667 100000"]
    view = c.get(f"/v1/cpu/vms/{VM}/vcpus").json()
    assert view["effective"] == 1 and view["offlined_in_guest"] == 3 and view["record"]["requested"] == 1
    # Back up: the CPUs are still plugged, so it is onlining only.
    up = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 3}).json()
    assert up["step"]["libvirt"] is False and up["after"]["guest_online"] == 3
    assert quota(env, "c3") == "200000 100000"


def test_libvirt_unplug_timeout_is_accepted_after_the_guest_offlined(env) -> None:
    c, lv = env["client"], env["libvirt"]
    make_ratio_containers(env)
    c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 4})
    r = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 2, "libvirt_unplug": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["libvirt"].startswith("timeout (accepted") and body["after"]["guest_online"] == 2
    assert body["record"]["unplug_timeouts"] == 1 and quota(env, "c3") == "133333 100000"
    knobs = {k["knob"]: k for k in env["daemon"].store.knobs(VM)}
    assert knobs["vcpus"]["original"] == 1  # libvirt's boot count, restored on unregister/stop
    lv.unplug_times_out = False
    body = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 1, "libvirt_unplug": True}).json()
    assert body["libvirt"] == "ok" and lv.vcpus == 1


def test_scale_validation(env) -> None:
    c = env["client"]
    for body, status, reason in (({"count": 9}, 422, "outside"), ({"count": 0}, 422, "count"),
                                 ({"count": 2, "x": 1}, 422, "x")):
        r = c.put(f"/v1/cpu/vms/{VM}/vcpus", json=body)
        assert r.status_code == status and reason in r.text
    env["link"].cooperative = False
    r = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 2})
    assert r.status_code == 503 and "not cooperative" in r.text
    assert env["libvirt"].calls == []


def test_nesting_aware_balloon_reclaims_first_then_releases(env) -> None:
    c, m, lv = env["client"], env["mgr"], env["libvirt"]
    for name, lim in (("a", {"mem_shares": 1}), ("b", {"mem_shares": 3}), ("keep", {"no_reclaim": True})):
        m.create({"name": name, "command": ["sleep", "9"], "limits": lim, "start": False})
        m.containers[name].state = "running"
        Path(m.slice.path, name, "cgroup.events").write_text("populated 1\n")
        set_usage(m, name, 100 * MiB)
    Path(m.meminfo_path).write_text("MemFree: 0 kB\n")
    r = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 432})
    assert r.status_code == 200, r.text
    body = r.json()
    rows = body["reclaim"]["containers"]
    assert rows["keep"]["planned"] == 0 and rows["a"]["planned"] == 70 * MiB and rows["b"]["planned"] == 10 * MiB
    assert lv.calls[-1] == ("balloon", 432) and body["balloon"]["target_mib"] == 432
    assert Path(m.slice.path, "a", "memory.high").read_text() == str(30 * MiB)
    body = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 512}).json()
    assert body["release"]["restored_memory_high"] == {"a": None, "b": None}
    # The stock baseline: the balloon only, no agent request.
    env["link"].requests.clear()
    body = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 300, "nesting_aware": False}).json()
    assert "reclaim" not in body and body["balloon"]["target_mib"] == 300
    assert not any(op == "ct-reclaim" for op, _ in env["link"].requests)
    r = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 10})
    assert r.status_code == 422
    env["link"].requests.clear()
    r = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 100})  # below the VM's min_mib 128
    assert r.status_code == 422 and "outside this VM's range" in r.text
    assert env["link"].requests == [] and lv.calls[-1] == ("balloon", 300)  # nothing asked, nothing moved


def test_stop_onlines_what_scaling_offlined_and_lifts_holds(env) -> None:
    c, d = env["client"], env["daemon"]
    c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 4})
    c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 2})
    assert env["online"].read_text().strip() == "0-1"
    asyncio.run(cpu_controller.stop(d))
    assert env["online"].read_text().strip() == "0-3"


def test_agent_error_mapping() -> None:
    from symbiont.daemon import Conflict, Invalid, NotFound, Unavailable

    m = cpu_controller.agent_error
    assert isinstance(m("v", AgentOpError("NoSuchContainer: no container 'x'")), NotFound)
    assert isinstance(m("v", AgentOpError("InvalidSpec: cpu_weight: -1")), Invalid)
    assert isinstance(m("v", AgentOpError("Conflict: already running")), Conflict)
    assert isinstance(m("v", AgentOpError("v: agent does not support 'ct-list' (caps: ping)")), Conflict)
    assert isinstance(m("v", AgentOpError("OSError: boom")), Unavailable)
    assert str(m("v", AgentOpError("InvalidSpec: cpu_weight: -1"))) == "v: cpu_weight: -1"


def test_qemu_weights_report_why_not_on_this_host(env) -> None:
    ctl = cpu_controller.controller_for(env["daemon"])
    status = ctl.apply_qemu_weights()
    assert VM in status and status[VM] != ""
    assert env["client"].get("/v1/cpu/qemu").json()["vms"][VM] == status[VM]
