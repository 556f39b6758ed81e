"""The ssdcache HTTP router on a small FastAPI app, with a real manager on an in-memory sqlite
store and no pool (no root needed): input validation, clear refusals, policy settings, and the
DoubleDecker memory tier configured through the API."""

from __future__ import annotations

import asyncio
import warnings
from types import SimpleNamespace

import pytest
from fastapi import FastAPI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from symbiont.ssdcache.api import router
from symbiont.ssdcache.manager import CacheManager
from symbiont.state import StateStore


class Store:
    """Every VM is registered (the routes that need a registered VM answer 404 otherwise)."""

    def get_vm(self, name: str) -> dict:
        return {"name": name}


class Part:
    """Just enough of SsdCachePart for the router (app.state.parts["ssdcache"])."""

    def __init__(self, mgr: CacheManager) -> None:
        self.manager = mgr
        self.ctx = SimpleNamespace(store=Store())

    def require_manager(self) -> CacheManager:
        return self.manager


@pytest.fixture
def client(tmp_path):
    mgr = CacheManager(StateStore(":memory:"), tmp_path / "run", pool_dir=tmp_path / "pools")
    app = FastAPI()
    app.state.parts = {"ssdcache": Part(mgr)}
    app.include_router(router, prefix="/v1/ssdcache")
    yield TestClient(app)
    asyncio.run(mgr.stop())


def test_no_pool_is_a_clear_503_and_bad_bodies_are_422(client: TestClient) -> None:
    assert client.get("/v1/ssdcache/pool").json() == {"exists": False}
    r = client.post("/v1/ssdcache/caches", json={"vm": "a", "size_mib": 8})
    assert r.status_code == 503 and "no pool" in r.json()["detail"]
    for body in ({"vm": "a"}, {"vm": "a b", "size_mib": 1}, {"vm": "a", "size_mib": 1, "x": 1},
                 {"vm": "a", "size_mib": 1 << 30}, {"vm": "a", "size_mib": 4, "weight": 0}):
        assert client.post("/v1/ssdcache/caches", json=body).status_code == 422, body
    for body in ({}, {"file": "/x"}, {"file": "/x", "device": "/dev/sda", "size_mib": 1}, {"size_mib": 4}):
        assert client.post("/v1/ssdcache/pool", json=body).status_code == 422, body
    assert client.get("/v1/ssdcache/caches/nope").status_code == 404
    assert client.put("/v1/ssdcache/caches/nope/size", json={"current_mib": -1}).status_code == 422
    assert client.put("/v1/ssdcache/caches/nope/size", json={"current_mib": 1}).status_code == 503


def test_pool_paths_and_devices_are_only_what_the_config_allows(client: TestClient, tmp_path) -> None:
    """The API is not root-equivalent (issue 16, item 17): files only inside pool_dir, no
    symlink escape, no block device unless ssdcache.allowed_devices lists it."""
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "escape.img").symlink_to("/etc/passwd")
    (tmp_path / "pools" / "sub").symlink_to("/etc")
    for body in ({"file": "/etc/x.img", "size_mib": 4}, {"file": "../x.img", "size_mib": 4},
                 {"file": str(tmp_path / "pools" / ".." / "x.img"), "size_mib": 4},
                 {"file": "escape.img", "size_mib": 4}, {"file": "sub/x.img", "size_mib": 4},
                 {"device": "/dev/vda"}, {"device": "/dev/loop0"}):
        r = client.post("/v1/ssdcache/pool", json=body)
        assert r.status_code == 403, (body, r.text)
        assert "pool_dir" in r.json()["detail"] or "allowed_devices" in r.json()["detail"] \
            or "symbolic link" in r.json()["detail"], r.text
    assert not (tmp_path / "x.img").exists() and not (tmp_path / "pools" / "sub" / "x.img").exists()
    assert client.get("/v1/ssdcache/pool").json() == {"exists": False}


def test_policy_settings(client: TestClient) -> None:
    assert client.get("/v1/ssdcache/policy").json()["mode"] == "manual"
    r = client.put("/v1/ssdcache/policy", json={"mode": "throughput", "target_ratio": {"a": 2, "b": 1}, "gain": 0.3})
    assert r.status_code == 200 and r.json()["target_ratio"] == {"a": 2, "b": 1}
    assert client.get("/v1/ssdcache/policy").json()["gain"] == 0.3
    assert client.put("/v1/ssdcache/policy", json={"mode": "random"}).status_code == 422
    assert client.put("/v1/ssdcache/policy", json={"target_ratio": {"a": -1}}).status_code == 422
    assert client.get("/v1/ssdcache/policy/plan").status_code == 503  # no pool to plan over


def test_doubledecker_memory_tier_through_the_api(client: TestClient) -> None:
    assert client.get("/v1/ssdcache/twolevel").json() == {"exists": False}
    assert client.put("/v1/ssdcache/twolevel/vms/vm1", json={"mem": 1}).status_code == 503
    v = client.put("/v1/ssdcache/twolevel", json={"mem_mib": 4}).json()
    assert v["capacity_pages"] == {"mem": 1024, "ssd": 0}
    client.put("/v1/ssdcache/twolevel/vms/vm1", json={"type": "mem", "weight": 3})
    client.put("/v1/ssdcache/twolevel/vms/vm2", json={"type": "mem", "weight": 1})
    v = client.put("/v1/ssdcache/twolevel/vms/vm1/containers/web", json={"type": "mem", "weight": 1}).json()
    assert v["partitions"]["vm1/web"]["quota"] == {"mem": 768, "ssd": 0}
    assert v["partitions"]["vm2/-"]["quota"] == {"mem": 256, "ssd": 0}
    v = client.delete("/v1/ssdcache/twolevel/vms/vm2").json()
    assert v["partitions"] == {"vm1/web": v["partitions"]["vm1/web"]} and v["partitions"]["vm1/web"]["quota"]["mem"] == 1024
    r = client.put("/v1/ssdcache/twolevel/vms/vm1/containers/web", json={"type": "mem"})
    assert r.status_code == 422
    r = client.put("/v1/ssdcache/twolevel", json={"mem_mib": 4, "ssd_mib": 1})
    assert r.status_code == 503 and "no pool" in r.json()["detail"]


def test_guest_doubledecker_status_needs_an_agent_and_is_sanitized(client: TestClient) -> None:
    from symbiont.ssdcache.manager import _sanitize_dd_status

    r = client.get("/v1/ssdcache/twolevel/vms/vm1/guest")
    assert r.status_code == 503 and "ssdcache.twolevel-status" in r.json()["detail"]
    hostile = {"share": {"mem": -5, "ssd": 2**70}, "ssd_capacity": "lots", "clients": True,
               "containers": {"C1": {"quota": {"mem": 3}, "used": {"mem": 2, "ssd": 1.5}, "puts": 7, "x": 1},
                              "": {}, "C2": "nope", **{f"c{i}": {} for i in range(400)}}}  # fmt: skip
    st = _sanitize_dd_status(hostile)
    assert st["share"] == {"mem": 0, "ssd": 0} and st["ssd_capacity"] == 0 and st["clients"] == 0
    assert st["containers"]["C1"] == {"quota": {"mem": 3, "ssd": 0}, "used": {"mem": 2, "ssd": 0}, "puts": 7,
                                      "gets": 0, "hits": 0, "demoted": 0, "evicted": 0, "dropped": 0}
    assert "" not in st["containers"] and "C2" not in st["containers"] and len(st["containers"]) <= 256
