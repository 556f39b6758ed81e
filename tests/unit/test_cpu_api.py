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

from symbiont.agentlink import _op_error
from symbiont.config import load_config
from symbiont.daemon import Daemon
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.host.port import HostError
from symbiont_agent import agent
from symbiont_agent import protocol as proto
from symbiont_agent.containers_cgroup import parse_cpu_list
from tests.unit.test_agent_containers import kernel, mgr, set_usage  # noqa: F401  (fixtures)

VM = "vm1"
MiB = 1 << 20


class Host(FakeHost):
    """The shared FakeHost whose vCPU unplug times out the way libvirt's does under TCG."""

    unplug_times_out = True

    def set_vcpus(self, vm: str, count: int) -> None:
        if count < self.domains[vm].vcpus and self.unplug_times_out:
            self.calls.append(("set_vcpus", vm, count))
            raise HostError(f"{vm}: setting {count} vCPUs failed: Timed out during operation: "
                            "vcpu unplug request timed out")
        super().set_vcpus(vm, count)


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
    lv = Host(FakeDomain(VM, memory_kib=512 * 1024, max_memory_kib=512 * 1024, vcpus=1, max_vcpus=4))
    dom = lv.domains[VM]

    def fake_online(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        pres = list(range(dom.vcpus))
        target = args.get("target") or len(pres)
        if not 1 <= target <= len(pres):
            raise ValueError(f"target {target} outside 1..{len(pres)} present CPUs")
        online.write_text(f"0-{target - 1}\n" if target > 1 else "0\n")
        return {"online": list(range(target)), "present": pres}

    def fake_stats(args: dict[str, Any], payload: bytes) -> dict[str, Any]:
        on = parse_cpu_list(online.read_text())
        return {"cpus": {"online": on, "present": list(range(dom.vcpus)), "count_online": len(on)},
                "meminfo": {"MemTotal": 480 * MiB, "MemAvailable": 400 * MiB}}

    monkeypatch.setattr(ops_containers, "_base_online_cpus", fake_online)
    for name in ("stats", "core.stats"):  # the old name and the canonical one
        if name in agent.OPS:
            monkeypatch.setitem(agent.OPS, name, fake_stats)
    online.write_text("0\n")
    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "d.sock")})
    d = Daemon(cfg, host=lv)
    d.store.add_vm(VM, "uuid-1", {"memory": {"min_mib": 128}, "cpu": {}})
    link = FakeLink()
    d.links[VM] = link  # type: ignore[assignment]
    from symbiont.api import create_app

    app = create_app(d)
    with TestClient(app) as client:
        yield {"client": client, "daemon": d, "libvirt": lv, "dom": dom, "link": link, "mgr": mgr, "online": online}
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
    assert up["step"]["direction"] == "up" and up["libvirt"] == "ok" and env["dom"].vcpus == 4
    assert up["after"]["guest_online"] == 4 and quota(env, "c3") == "266667 100000"
    assert up["containers"]["allocations"]["c3"]["dedicated"] == [2, 3]
    link.requests.clear()
    down = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 1}).json()
    # Guest first, libvirt not asked by default: its count stays, the record says so.
    assert [op for op, _ in link.requests][:2] == ["core.stats", "cpu.online"]
    assert lv.calls[-1] == ("set_vcpus", VM, 4) and down["libvirt"].startswith("skipped")
    assert down["after"] == {"guest_online": 1, "online": [0], "libvirt": 4, "qemu": None}
    assert [quota(env, n) for n in ("c1", "c2", "c3")] == ["16667 100000", "16667 100000", "66667 100000"]
    view = c.get(f"/v1/cpu/vms/{VM}/vcpus").json()
    assert view["effective"] == 1, view
    assert view["offlined_in_guest"] == 3 and view["record"]["requested"] == 1
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
    assert body["libvirt"] == "ok" and env["dom"].vcpus == 1


def test_scale_validation(env) -> None:
    c = env["client"]
    for body, status, reason in (({"count": 9}, 422, "outside"), ({"count": 0}, 422, "count"),
                                 ({"count": 2, "x": 1}, 422, "x")):
        r = c.put(f"/v1/cpu/vms/{VM}/vcpus", json=body)
        assert r.status_code == status and reason in r.text
    assert env["libvirt"].calls == []
    # Without a cooperative agent only a hot-plug is possible (the guest's udev onlines it).
    env["link"].cooperative = False
    r = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 2})
    assert r.status_code == 200 and r.json()["mechanism"] == "hotplug", r.text
    r = c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 1})
    assert r.status_code == 409 and "no cooperative agent" in r.text
    assert env["libvirt"].calls == [("set_vcpus", VM, 2)]


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
    assert lv.calls[-1] == ("set_balloon", VM, 432 << 10) and body["balloon"]["target_mib"] == 432
    assert Path(m.slice.path, "a", "memory.high").read_text() == str(30 * MiB)
    body = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 512}).json()
    assert body["release"]["restored_memory_high"] == {"a": None, "b": None}
    # The stock baseline: the balloon only, no agent request.
    env["link"].requests.clear()
    body = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 300, "nesting_aware": False}).json()
    assert "reclaim" not in body and body["balloon"]["target_mib"] == 300
    assert not any(op in ("ct-reclaim", "cpu.container-reclaim") for op, _ in env["link"].requests)
    r = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 10})
    assert r.status_code == 422
    env["link"].requests.clear()
    r = c.put(f"/v1/cpu/vms/{VM}/memory", json={"target_mib": 100})  # below the VM's min_mib 128
    assert r.status_code == 422 and "outside this VM's range" in r.text
    assert env["link"].requests == [] and lv.calls[-1] == ("set_balloon", VM, 300 << 10)  # nothing moved


def test_stop_onlines_what_scaling_offlined_and_lifts_holds(env) -> None:
    c, d = env["client"], env["daemon"]
    c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 4})
    c.put(f"/v1/cpu/vms/{VM}/vcpus", json={"count": 2})
    assert env["online"].read_text().strip() == "0-1"
    asyncio.run(d.parts["cpu"].stop())
    assert env["online"].read_text().strip() == "0-3"


def test_core_vcpus_endpoint_is_an_alias_of_the_cpu_parts_scaling(env) -> None:
    """One vCPU implementation: PUT /v1/vms/{n}/vcpus scales through the cpu part (its record,
    its decision) and answers in the core's shape."""
    c = env["client"]
    r = c.put(f"/v1/vms/{VM}/vcpus", json={"count": 3})
    assert r.status_code == 200, r.text
    assert r.json()["before"] == 1 and r.json()["vcpus"] == 3 and r.json()["mechanism"] == "hotplug"
    r = c.put(f"/v1/vms/{VM}/vcpus", json={"count": 2})
    assert r.json()["mechanism"] == "guest-offline" and r.json()["guest"]["online"] == [0, 1]
    assert c.get(f"/v1/cpu/vms/{VM}/vcpus").json()["record"]["requested"] == 2
    assert [d["action"] for d in env["daemon"].store.decisions(VM) if d["part"] == "cpu"] == ["scale", "scale"]


def test_qemu_shares_through_libvirt_schedinfo_restored_by_the_ledger(env) -> None:
    d, c = env["daemon"], env["client"]
    d.store.update_vm_policy(VM, {"memory": {"min_mib": 128}, "cpu": {"weight": 200}})
    d.latest[VM] = {"libvirt": {"state": "running"}}
    cpu = d.parts["cpu"]
    asyncio.run(cpu.act(asyncio.run(cpu.observe(None))))  # type: ignore[arg-type]
    assert env["dom"].schedinfo["cpu_shares"] == 2048
    q = c.get("/v1/cpu/qemu").json()
    assert q["vms"][VM].startswith("cpu_shares 2048") and q["saved"][0]["original"] == 1024
    asyncio.run(d.knobs.restore(vm=VM, reason="test"))
    assert env["dom"].schedinfo["cpu_shares"] == 1024
