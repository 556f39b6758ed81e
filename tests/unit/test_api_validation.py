"""The core API refuses hostile or sloppy bodies with a 422 naming the field, before anything is
stored, and no stored row can break a list (issue 16 items 8 and 14).

A real Daemon and its sqlite store behind the real FastAPI app; only libvirt is faked."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from symbiont.config import load_config
from symbiont.daemon import Daemon
from symbiont.host.libvirt_host import DomainInfo, LibvirtError


class FakeLibvirt:
    """Domains vm1..vm9 exist (512 MiB, 4 vCPUs at most); nothing is ever changed."""

    def __init__(self) -> None:
        self.conn = self

    def isAlive(self) -> bool:  # noqa: N802 (libvirt's name)
        return True

    def close(self) -> None:
        pass

    def info(self, name: str) -> DomainInfo:
        if not (name.startswith("vm") and name[2:].isdigit()):
            raise LibvirtError(f"no domain {name}")
        return DomainInfo(name, f"uuid-{name}", "shut off", 512 * 1024, 512 * 1024, 1, 4, "qemu")

    def channel_path(self, name: str, target: str) -> None:
        return None


@pytest.fixture
def env(tmp_path):
    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "api.sock")})
    d = Daemon(cfg)
    d.host._libvirt = FakeLibvirt()  # type: ignore[attr-defined]  # the real SystemHost over a fake connection
    from symbiont.api import create_app

    with TestClient(create_app(d), raise_server_exceptions=False) as client:
        yield client, d
        for rec in d.store.list_vms():
            client.delete(f"/v1/vms/{rec.name}")
    d.store.close()


def nested(depth: int) -> Any:
    return json.loads("[" * depth + "]" * depth)


def post_raw(client: TestClient, path: str, text: str) -> Any:
    return client.post(path, content=text, headers={"content-type": "application/json"})


def test_deep_extra_is_refused_and_nothing_registered(env) -> None:
    client, d = env
    r = client.post("/v1/vms", json={"name": "vm1", "extra": {"x": nested(300)}})
    assert r.status_code == 422, r.text
    assert "extra" in r.text and "nested deeper" in r.text
    assert d.store.get_vm("vm1") is None
    assert client.get("/v1/vms").status_code == 200
    assert client.get("/v1/decisions").status_code == 200
    # Within the bounds, extra is stored and served back as sent.
    ok = {"part": {"a": [1, 2.5, {"b": None}], "s": "x"}}
    r = client.post("/v1/vms", json={"name": "vm2", "extra": ok})
    assert r.status_code == 201, r.text
    assert client.get("/v1/vms/vm2").json()["policy"]["extra"] == ok
    # Too many values in all, a huge string: refused too.
    assert client.post("/v1/vms", json={"name": "vm3", "extra": {"x": list(range(20_000))}}).status_code == 422
    assert client.post("/v1/vms", json={"name": "vm3", "extra": {"x": "a" * (1 << 17)}}).status_code == 422
    assert d.store.get_vm("vm3") is None


def test_rows_stored_before_the_bounds_do_not_break_lists(env) -> None:
    """A deep policy or decision already in sqlite (written by an older daemon) is served cut."""
    client, d = env
    deep = json.dumps({"memory": {}, "cpu": {}, "extra": {"x": nested(300)}})
    with d.store.transaction() as db:
        db.execute("INSERT INTO vms (name, uuid, policy, registered_at) VALUES ('vm4', 'u', ?, ?)",
                   (deep, time.time()))
        db.execute("INSERT INTO decisions (ts, vm, part, action, inputs, outcome) VALUES (?, 'vm4', 'core', "
                   "'register', ?, '{}')", (time.time(), deep))
        db.execute("INSERT INTO decisions (ts, vm, part, action, inputs, outcome) VALUES (?, 'vm4', 'core', "
                   "'x', 'not json', '{}')", (time.time(),))
    r = client.get("/v1/vms")
    assert r.status_code == 200, r.text
    assert [v["name"] for v in r.json()] == ["vm4"]
    assert "truncated" in r.text
    assert client.get("/v1/vms/vm4").status_code == 200
    r = client.get("/v1/decisions")
    assert r.status_code == 200, r.text
    assert [x["action"] for x in r.json()] == ["register", "x"]
    assert "unreadable" in r.json()[1]["inputs"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "vm1", "cpu": {"min_vcpus": 4, "max_vcpus": 2}}, "min_vcpus"),
        ({"name": "vm1", "memory": {"min_mib": 512, "max_mib": 256}}, "min_mib"),
        ({"name": "vm1", "memory": {"shares": True}}, "shares"),
        ({"name": "vm1", "memory": {"shares": "1000"}}, "shares"),
        ({"name": "vm1", "memory": {"shares": 1000.0}}, "shares"),
        ({"name": "vm1", "cpu": {"weight": "100"}}, "weight"),
        ({"name": "vm1", "memory": {"tax_rate": "0.5"}}, "tax_rate"),
        ({"name": ["vm1"]}, "name"),
        ({"name": "vm1", "extra": {"x": {"y": float("inf")}}}, "extra"),
    ],
)
def test_sloppy_registrations_are_422(env, body: dict[str, Any], field: str) -> None:
    client, d = env
    text = json.dumps(body)  # json.dumps writes inf as Infinity, which json.loads reads back
    r = post_raw(client, "/v1/vms", text)
    assert r.status_code == 422, r.text
    assert field in r.text
    assert d.store.get_vm("vm1") is None


def test_nan_and_infinity_are_422_not_500(env) -> None:
    client, d = env
    for text in ('{"name": "vm1", "memory": {"tax_rate": NaN}}', '{"name": "vm1", "memory": {"tax_rate": Infinity}}',
                 '{"name": "vm1", "memory": {"tax_rate": -Infinity}}'):
        r = post_raw(client, "/v1/vms", text)
        assert r.status_code == 422, (text, r.status_code, r.text)
        assert "tax_rate" in r.text
    assert d.store.get_vm("vm1") is None
    # A part's body the same way (memory part: host policy).
    r = client.put("/v1/memory/policy", content='{"tax_rate": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_booleans_are_not_numbers_in_knob_bodies(env) -> None:
    client, _ = env
    assert client.post("/v1/vms", json={"name": "vm1"}).status_code == 201
    # Lax models turned these into 256 and 2 and went on to the (shut off) VM: 409.
    for path, body in (("memory", {"target_mib": "256"}), ("vcpus", {"count": "2"}), ("vcpus", {"count": True})):
        r = client.put(f"/v1/vms/vm1/{path}", json=body)
        assert r.status_code == 422 and list(body)[0] in r.text, (path, body, r.text)
    # current_mib false used to be a deflate to 0: refused before the part sees it.
    r = client.put("/v1/ssdcache/caches/vm1/size", json={"current_mib": False})
    assert r.status_code == 422 and "current_mib" in r.text, r.text


def test_min_vcpus_above_the_domain_maximum_is_422(env) -> None:
    client, d = env
    r = client.post("/v1/vms", json={"name": "vm1", "cpu": {"min_vcpus": 8}})
    assert r.status_code == 422 and "min_vcpus" in r.text, r.text
    r = client.post("/v1/vms", json={"name": "vm1", "memory": {"min_mib": 1024}})
    assert r.status_code == 422 and "min_mib" in r.text, r.text
    assert d.store.get_vm("vm1") is None
    r = client.post("/v1/vms", json={"name": "vm1", "cpu": {"min_vcpus": 2, "max_vcpus": 4}, "memory": {"min_mib": 256}})
    assert r.status_code == 201, r.text


def test_deep_invalid_input_is_echoed_safely(env) -> None:
    """The 422 echoes the bad input: a NaN in it, or deep nesting, must not make the 422 itself fail."""
    client, _ = env
    for text in ('{"name": {"a": [NaN, Infinity, 1]}}', json.dumps({"name": nested(400)})):
        r = post_raw(client, "/v1/vms", text)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "name"]


def test_an_unexpected_error_is_500_with_a_reason(env, monkeypatch) -> None:
    client, d = env

    def broken() -> dict[str, Any]:
        raise RuntimeError("status exploded")

    monkeypatch.setattr(d, "status", broken)
    r = client.get("/v1/status")
    assert r.status_code == 500
    assert "RuntimeError: status exploded" in r.json()["detail"]


def test_one_broken_view_does_not_break_the_list(env, monkeypatch) -> None:
    client, d = env
    for name in ("vm1", "vm2"):
        assert client.post("/v1/vms", json={"name": name}).status_code == 201
    real = d.vm_view

    def view(name: str) -> dict[str, Any]:
        if name == "vm1":
            raise TypeError("unsupported operand type(s) for //: 'str' and 'int'")
        return real(name)

    monkeypatch.setattr(d, "vm_view", view)
    r = client.get("/v1/vms")
    assert r.status_code == 200, r.text
    got = {v["name"]: v for v in r.json()}
    assert "TypeError" in got["vm1"]["error"] and got["vm2"]["uuid"] == "uuid-vm2" and "error" not in got["vm2"]
