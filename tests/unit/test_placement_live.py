"""Live inventories: the daemon's stored samples mapped onto the placement model, and plans
(placement, Sandpiper hotspots, idle consolidation) computed from them."""

from __future__ import annotations

import json
import socket
import time
import warnings

import numpy as np
import pytest
from fastapi import FastAPI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from symbiont.config import ConfigError, load_config
from symbiont.memory.part import MemoryPart
from symbiont.placement import live
from symbiont.placement.api import router
from symbiont.placement.inventory import parse_requests
from symbiont.placement.part import PlacementPart
from tests.fakes import Env

MIB = 1 << 20


def lv(cpu_pct, rss_kib=262144, state="running", qemu_rss=None):
    d = {"state": state, "memory_mib": 256, "vcpus": 1, "memstats_kib": {"rss": rss_kib} if rss_kib else {}}
    if cpu_pct is not None:
        d["qemu_cpu_percent"] = cpu_pct
    if qemu_rss is not None:
        d["qemu_rss"] = qemu_rss
    return d


def ag(busy, idle, used_mib, total_mib=256, online=1):
    return {
        "meminfo": {"MemTotal": total_mib * MIB, "MemAvailable": (total_mib - used_mib) * MIB},
        "cpu_times": {"user": busy, "system": 0, "idle": idle, "iowait": 0},
        "cpus": {"count_online": online},
    }


def test_black_box_uses_qemu_cpu_and_rss_and_skips_what_it_cannot_see() -> None:
    s = [
        (1.0, lv(50.0)),  # half a core, 256 MiB resident
        (2.0, lv(None)),  # no QEMU PID known: skipped, not guessed
        (3.0, lv(10.0, state="shutoff")),
        (4.0, lv(150.0, rss_kib=0, qemu_rss=512 * MIB)),  # balloon rss missing: QEMU's RSS
        (5.0, lv(20.0, rss_kib=0)),  # no memory figure at all
    ]
    assert live.black_box(s) == [[0.5, 0.25], [1.5, 0.5]]


def test_gray_box_cpu_from_tick_deltas_and_memory_in_use() -> None:
    s = [
        (1.0, ag(100, 900, 64)),
        (2.0, ag(150, 1050, 64)),  # 50 busy of 200 ticks: 25%
        (3.0, ag(350, 1050, 128, online=2)),  # 200 busy of 200: 100% of 2 CPUs
        (4.0, ag(10, 20, 32)),  # counters went backwards (reboot): no pair
        (5.0, ag(20, 110, 32)),  # 10 of 100
    ]
    series, frac = live.gray_box(s)
    assert frac == pytest.approx([0.25, 1.0, 0.1])
    np.testing.assert_allclose(series, [[0.25, 64 / 1024], [2.0, 128 / 1024], [0.1, 32 / 1024]])


def test_build_inventory_maps_allocations_and_keeps_the_last_n() -> None:
    vms = [
        {
            "name": "a",
            "vcpus": 2,
            "memory_mib": 512,
            "libvirt": [(t, lv(10.0 * t)) for t in range(1, 8)],
            "agent": [(t, ag(10 * t, 100 * t, 40 + t)) for t in range(1, 8)],
        },
        {"name": "off", "vcpus": 0, "memory_mib": 0, "libvirt": [], "agent": []},
    ]
    inv = live.build_inventory("h1", {"cpu": 4.0, "mem": 16.0}, {"cpu": 2.0}, vms, n=3)
    assert inv["host"] == {
        "id": "h1",
        "capacity": {"cpu": 4.0, "mem": 16.0},
        "overcommit": {"cpu": 2.0},
        "vms": [{"id": "a", "demand": {"cpu": 2.0, "mem": 0.5}}],
    }
    assert [row[0] for row in inv["usage"]["black-box"]["a"]] == pytest.approx([0.5, 0.6, 0.7])
    assert len(inv["usage"]["gray-box"]["a"]) == 3
    assert inv["activity"]["a"]["wss_mib"] == pytest.approx(47.0)
    assert inv["activity"]["a"]["cpu"] == pytest.approx([10 / 110] * 3)
    assert "off" not in inv["activity"]


def test_host_id_from_config() -> None:
    cfg = load_config(None, {"placement": {"host_id": "rack1"}})
    assert live.host_id(cfg) == "rack1"
    cfg = load_config(None, {"placement": {"hosts": [{"id": "A", "libvirt_uri": "qemu:///system"}]}})
    assert live.host_id(cfg) == "A"
    assert live.host_id(load_config(None)) == socket.gethostname()


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"placement.hosts\[0\].libvirt_uri: required"):
        load_config(None, {"placement": {"hosts": [{"id": "A"}]}})
    with pytest.raises(ConfigError, match=r"placement.hosts\[1\].id: host 'A' is listed twice"):
        load_config(None, {"placement": {"hosts": [{"id": "A", "libvirt_uri": "x"}] * 2}})
    with pytest.raises(ConfigError, match=r"placement.hosts\[0\].uri: unknown key"):
        load_config(None, {"placement": {"hosts": [{"id": "A", "libvirt_uri": "x", "uri": "y"}]}})
    with pytest.raises(ConfigError, match=r"placement.overcommit.cpu"):
        load_config(None, {"placement": {"overcommit": {"cpu": -1}}})


def inv(hid, vms, cap=(4.0, 8.0), gray=None, black=None, activity=None):
    return {
        "host": {"id": hid, "capacity": {"cpu": cap[0], "mem": cap[1]}, "overcommit": {}, "vms": vms},
        "usage": {"black-box": black or {}, "gray-box": gray or {}},
        "activity": activity or {},
    }


VM = lambda i, cpu=1.0, mem=1.0: {"id": i, "demand": {"cpu": cpu, "mem": mem}}  # noqa: E731


def test_plan_live_places_requests_on_live_hosts() -> None:
    a = inv("A", [VM("x", 4.0, 2.0)])
    b = inv("B", [])
    out = live.plan_live([a, b], parse_requests([{"id": "new", "demand": {"cpu": 2, "mem": 2}}]), "first-fit")
    assert out["hosts"] == ["A", "B"]
    assert [(d["vm"], d["host"]) for d in out["plan"]["decisions"]] == [("new", "B")]  # A's CPU is full
    assert out["moves"] == []
    with pytest.raises(ValueError, match="listed twice"):
        live.plan_live([a, inv("A", [])])


def test_plan_live_gray_box_hotspot_moves_a_vm_to_the_cold_host() -> None:
    hot = [[2.5, 1.0]] * 5  # with quiet's 0.7: 3.2 of A's 4 cores (threshold 3), 5 samples in a row
    a = inv("A", [VM("busy", 2.0), VM("quiet", 2.0)], gray={"busy": hot, "quiet": [[0.7, 0.5]] * 5})
    b = inv("B", [VM("other", 1.0)], gray={"other": [[0.2, 0.5]] * 5})
    out = live.plan_live([a, b], hotspots={"mode": "gray-box", "thresholds": {"cpu": 0.75}, "k": 3, "n": 5})
    assert [h["host"] for h in out["hotspots"]["hotspots"]] == ["A"]
    assert [(m["vm"], m["from"], m["to"]) for m in out["moves"]] == [("busy", "A", "B")]
    # Black-box needs the hypervisor's figures: without them the VMs are unobserved, not guessed.
    out = live.plan_live([a, b], hotspots={"mode": "black-box", "thresholds": {"cpu": 0.75}})
    assert out["moves"] == [] and sorted(out["hotspots"]["unobserved"]) == ["busy", "other", "quiet"]
    # With hypervisor figures below the threshold there is no hotspot.
    a2 = inv("A", [VM("busy", 2.0)], black={"busy": [[1.0, 1.0]] * 5}, gray={"busy": hot})
    out = live.plan_live([a2, b], hotspots={"mode": "black-box", "thresholds": {"cpu": 0.75}})
    assert out["hotspots"]["hotspots"] == [] and out["moves"] == []


def test_plan_live_idle_consolidation_from_activity() -> None:
    act = {
        "sleepy": {"mem_mib": 1024.0, "cpu": [0.01] * 12, "wss_mib": 30.0},
        "active": {"mem_mib": 1024.0, "cpu": [0.01] * 11 + [0.5], "wss_mib": 30.0},
        "fat": {"mem_mib": 1024.0, "cpu": [0.0] * 12, "wss_mib": 500.0},
    }
    a = inv("A", [VM("sleepy"), VM("active"), VM("fat")], activity=act)
    b = inv("B", [], cap=(4.0, 1.0))
    out = live.plan_live([a, b], idle={"idle_host": "B"})
    assert [(m["vm"], m["from"], m["to"]) for m in out["moves"]] == [("sleepy", "A", "B")]
    kinds = {(x["kind"], x["vm"]) for x in out["idle"]["actions"]}
    assert ("shrink", "sleepy") in kinds and not any(v in ("active", "fat") for _, v in kinds)
    assert out["idle"]["free_mib"] == 1024.0
    with pytest.raises(ValueError, match="idle_host 'C' is not one of the hosts"):
        live.plan_live([a, b], idle={"idle_host": "C"})


def test_plan_live_wakes_busy_vms_on_the_idle_host() -> None:
    """A VM parked (shrunk) on the idle host that shows activity goes back to the regular host with
    the tightest room for its full size (the balloon original its daemon saved) and grows to it;
    an idle VM elsewhere is still consolidated in the same plan, into the room the woken one left."""
    parked = {"mem_mib": 128.0, "cpu": [0.01, 0.02, 0.9], "wss_mib": 60.0, "full_mem_mib": 1024.0}
    snoozing = {"mem_mib": 128.0, "cpu": [0.01] * 3, "wss_mib": 40.0, "full_mem_mib": 512.0}
    b = inv("B", [VM("parked", 1.0, 0.125), VM("snoozing", 1.0, 0.125)], cap=(4.0, 0.3125),
            activity={"parked": parked, "snoozing": snoozing})  # fmt: skip
    a = inv("A", [VM("big", 1.0, 6.0)])  # 2 GiB free
    c = inv("C", [VM("x", 1.0, 6.5)])  # 1.5 GiB free: the tighter fit for 1 GiB
    sleepy = {"mem_mib": 256.0, "cpu": [0.0] * 3, "wss_mib": 30.0, "min_mib": 128.0}
    a["activity"] = {"big": {"mem_mib": 6144.0, "cpu": [0.9] * 3, "wss_mib": 4000.0}, "sleepy": sleepy}
    a["host"]["vms"].append(VM("sleepy", 1.0, 0.25))
    idle = {"idle_host": "B", "window": 3, "wss_max_mib": 64}
    out = live.plan_live([a, b, c], idle=idle)
    acts = [(x["kind"], x["vm"], x.get("src"), x.get("dst"), x.get("mem_to")) for x in out["idle"]["actions"]]
    assert acts == [
        ("move", "parked", "B", "C", None),
        ("grow", "parked", "C", None, 1024.0),
        # snoozing (128 MiB, 40 used) is idle on the idle host but already at its guest floor
        ("shrink", "sleepy", "A", None, 128.0),  # its guest floor and min_mib, not 30 * 1.25
        ("move", "sleepy", "A", "B", 128.0),  # fits only because parked leaves B
    ]
    assert [(m["vm"], m["from"], m["to"]) for m in out["moves"]] == [
        ("parked", "B", "C"),
        ("sleepy", "A", "B"),
    ]
    assert out["idle"]["regular_free_mib"] == {"A": 1792.0, "C": 1536.0}
    # Home first when it has room, whatever fits tighter; an unknown home falls back to best fit.
    b_home = json.loads(json.dumps(b))
    b_home["activity"]["parked"]["home"] = "A"
    out = live.plan_live([a, b_home, c], idle=idle)
    assert out["moves"][0] == {"vm": "parked", "from": "B", "to": "A", "reason": out["moves"][0]["reason"]}
    b_home["activity"]["parked"]["home"] = "gone"
    assert live.plan_live([a, b_home, c], idle=idle)["moves"][0]["to"] == "C"
    # Below wake_cpu nothing wakes; a higher wake_cpu than the newest sample keeps it parked.
    out = live.plan_live([a, b, c], idle={**idle, "wake_cpu": 0.95})
    assert not any(x["vm"] == "parked" for x in out["idle"]["actions"])
    # No regular host has room for its full size: it grows where it is.
    a2, c2 = inv("A", [VM("big", 1.0, 7.5)]), inv("C", [VM("x", 1.0, 7.5)])
    out = live.plan_live([a2, b, c2], idle=idle)
    assert [(x["kind"], x["vm"], x["src"]) for x in out["idle"]["actions"]][0] == ("grow", "parked", "B")
    assert out["moves"] == []  # no regular host has 1024 MiB free
    # Never shrunk (no saved original): its current size is its full size, so it only moves back.
    b3 = inv("B", [VM("parked", 1.0, 0.125)], activity={"parked": {**parked, "full_mem_mib": None}})
    out = live.plan_live([a, b3], idle=idle)
    assert [(x["kind"], x["vm"]) for x in out["idle"]["actions"]][0] == ("move", "parked")
    assert "grow" not in [x["kind"] for x in out["idle"]["actions"]]


class FakeDaemon:
    """The placement part over the shared fakes (tests/fakes.py: FakeHost, a real StateStore and
    ledger), with the memory part it requires; ``latest`` is the core's snapshots."""

    def __init__(self, tmp_path) -> None:
        self.env = Env(tmp_path, cfg=load_config(None, {"state_dir": str(tmp_path), "placement": {"host_id": "me"}}))
        self.env.add(MemoryPart)
        self.part = self.env.add(PlacementPart)
        self.store = self.env.store
        self.latest = self.env.core.snapshots
        self.latest["vm1"] = {"libvirt": {"state": "running", "vcpus": 1, "memory_mib": 1024}}


def test_collect_reports_full_size_and_floor_from_sqlite(tmp_path) -> None:
    """The full size to wake a VM to is the balloon original the daemon saved before shrinking it."""
    d = FakeDaemon(tmp_path)
    d.store.add_vm("vm1", "u", {"memory": {"min_mib": 128}})
    d.store.add_samples([(time.time() + t, "vm1", "agent", ag(10 * t, 90 * t, 100)) for t in range(3)])
    d.store.save_knob("vm1", "balloon_mib", 2048, 512)
    d.store.save_knob("vm1", "balloon_mib", 1536, 300)  # a later change keeps the first original
    a = d.part.inventory(3)["activity"]["vm1"]
    assert (a["full_mem_mib"], a["min_mib"], a["mem_mib"], a["home"]) == (2048.0, 128.0, 1024.0, None)
    # Parked here by a plan: its registration says where from and how big it was.
    d.store.add_vm("vm2", "u", {"extra": {"placement": {"home": "A", "full_mem_mib": 4096}}})
    d.latest["vm2"] = d.latest["vm1"]
    a = d.part.inventory(3)["activity"]["vm2"]
    assert (a["full_mem_mib"], a["home"]) == (4096.0, "A")


def test_collect_reads_stored_samples(tmp_path) -> None:
    d = FakeDaemon(tmp_path)
    d.store.add_vm("vm1", "u", {})
    d.store.add_samples([(time.time() + t, "vm1", "libvirt", lv(20.0)) for t in range(5)])
    d.store.add_samples([(time.time() + t, "vm1", "agent", ag(10 * t, 90 * t, 100)) for t in range(5)])
    out = d.part.inventory(3)
    assert out["host"]["id"] == "me" and out["capacity_source"].startswith("psutil")
    assert out["host"]["capacity"]["cpu"] >= 1
    assert out["host"]["vms"] == [{"id": "vm1", "demand": {"cpu": 1.0, "mem": 1.0}}]
    assert out["usage"]["black-box"]["vm1"] == [[0.2, 0.25]] * 3
    # Never ballooned: no full size on record; the registration sets no floor.
    assert out["activity"]["vm1"]["full_mem_mib"] is None and out["activity"]["vm1"]["min_mib"] is None
    np.testing.assert_allclose(out["usage"]["gray-box"]["vm1"], [[0.1, 100 / 1024]] * 3)
    # The same through the API, as the daemon mounts it.
    app = FastAPI()
    app.state.parts = d.env.parts
    app.include_router(router, prefix="/v1/placement")
    c = TestClient(app)
    r = c.get("/v1/placement/inventory", params={"n": 2})
    assert r.status_code == 200 and len(r.json()["usage"]["gray-box"]["vm1"]) == 2
    r = c.post("/v1/placement/plan", json={"live": True, "requests": [{"id": "n", "demand": {"cpu": 1}}]})
    assert r.status_code == 200, r.text
    assert [(d["vm"], d["host"]) for d in r.json()["plan"]["decisions"]] == [("n", "me")]
    r = c.post("/v1/placement/plan", json={"idle": {"idle_host": "elsewhere"}})
    assert r.status_code == 422 and "elsewhere" in r.json()["detail"]
    r = c.post("/v1/placement/plan", json={"requests": []})
    assert r.status_code == 422 and "hosts" in r.json()["detail"]


def test_inventory_cli_shows_what_the_daemon_feeds_the_planner(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from symbiont.cli import _add_part_groups, cli

    d = FakeDaemon(tmp_path)
    d.store.add_vm("vm1", "u", {})
    d.store.add_samples([(time.time() + t, "vm1", "libvirt", lv(20.0)) for t in range(3)])
    d.store.add_samples([(time.time() + t, "vm1", "agent", ag(10 * t, 90 * t, 100)) for t in range(3)])
    app = FastAPI()
    app.state.parts = d.env.parts
    app.include_router(router, prefix="/v1/placement")
    api = TestClient(app)

    class Client:  # the CLI's API client, pointed at the test app
        def __init__(self, *a, **k) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a) -> None:
            pass

        def get(self, path, **params):
            return api.get(path, params=params).json()

    monkeypatch.setattr("symbiont.cli.Client", Client)
    _add_part_groups()
    res = CliRunner().invoke(cli, ["place", "inventory"])
    assert res.exit_code == 0, res.output
    assert "vm1" in res.output and "0.200 / 0.250" in res.output and "100.0" in res.output
    res = CliRunner().invoke(cli, ["place", "inventory", "--json"])
    assert json.loads(res.output)["host"]["vms"][0]["id"] == "vm1"
