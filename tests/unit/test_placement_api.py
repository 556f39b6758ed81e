"""The placement HTTP router, mounted on a small FastAPI app as the daemon would."""

from __future__ import annotations

import warnings

import pytest
from fastapi import FastAPI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from symbiont.placement.api import router


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router, prefix="/v1/placement")
    return TestClient(app)


HOSTS = [
    {
        "id": "h0",
        "capacity": {"cpu": 8, "mem": 32},
        "vms": [{"id": "db1", "demand": {"cpu": 2, "mem": 8}, "anti_affinity": "db"}],
    },
    {"id": "h1", "capacity": {"cpu": 8, "mem": 32}, "overcommit": {"cpu": 2}},
]


def test_plan(client: TestClient) -> None:
    body = {
        "hosts": HOSTS,
        "requests": [
            {"id": "db2", "demand": {"cpu": 2, "mem": 8}, "anti_affinity": "db"},
            {"id": "big", "demand": {"cpu": 1, "mem": 64}},
        ],
        "heuristic": "first-fit",
        "bound": True,
    }
    r = client.post("/v1/placement/plan", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    by_vm = {d["vm"]: d for d in out["decisions"]}
    assert by_vm["db2"]["host"] == "h1"  # anti-affinity with db1 on h0
    assert by_vm["big"]["host"] is None
    # batch mode decides the bigger request first, while h1 is still empty (32 GiB free)
    assert by_vm["big"]["reason"] == "mem: needs 64, largest free 32 after overcommit 1"
    assert (out["placed"], out["rejected"], out["hosts_used_before"], out["hosts_used"]) == (1, 1, 1, 2)
    assert out["utilisation_after"]["h1"] == {"cpu": 0.25, "mem": 0.25}
    # both VMs would fit one host if free to move: bound 1, ratio 2
    assert out["lower_bound"]["value"] == 1 and out["lower_bound"]["ratio"] == 2.0


def test_heuristics_listing(client: TestClient) -> None:
    names = [h["name"] for h in client.get("/v1/placement/heuristics").json()]
    assert names[:3] == ["first-fit", "best-fit", "worst-fit"] and "cosine" in names and len(names) == 8


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"heuristic": "nope"}, "unknown heuristic 'nope'"),
        ({"mode": "later"}, "unknown mode 'later'"),
        ({"requests": [{"id": "a", "demand": {"cpu": -1}}]}, "demand cpu: -1.0 must be finite and >= 0"),
        ({"requests": [{"id": "a", "demand": {"cpu": "lots"}}]}, "valid number"),
        ({"requests": [{"id": "a", "demand": {"gpu": 1}}]}, "request a: demand: unknown resource 'gpu'"),
        ({"requests": [{"id": "a", "demand": {}, "colour": "red"}]}, "Extra inputs are not permitted"),
        ({"hosts": []}, "at least one host"),
        (
            {"hosts": [{"id": "h0", "capacity": {"cpu": 1}, "overcommit": {"cpu": 0}}]},
            "overcommit cpu: 0.0 must be finite and > 0",
        ),
        ({"requests": [{"id": "db1", "demand": {"cpu": 1}}]}, "request 'db1' is listed twice"),
    ],
)
def test_bad_input_is_422_with_reason(client: TestClient, patch: dict, needle: str) -> None:
    body = {"hosts": HOSTS, "requests": [{"id": "ok", "demand": {"cpu": 1}}]}
    body.update(patch)
    r = client.post("/v1/placement/plan", json=body)
    assert r.status_code == 422
    assert needle in r.text


def test_bound_leaves_out_a_running_vm_larger_than_every_host(client: TestClient) -> None:
    """An overcommitted VM already running that no host could take alone has no bound; the bound
    of the others still holds (as ``place --bound`` does): 200 with the VM named, never a 500."""
    hosts = [
        {"id": "h0", "capacity": {"cpu": 4, "mem": 8}, "overcommit": {"cpu": 4},
         "vms": [{"id": "huge", "demand": {"cpu": 2, "mem": 16}}, {"id": "a", "demand": {"cpu": 1, "mem": 2}}]},
        {"id": "h1", "capacity": {"cpu": 4, "mem": 8}},
    ]
    body = {"hosts": hosts, "requests": [{"id": "n", "demand": {"cpu": 1, "mem": 2}}], "bound": True}
    r = client.post("/v1/placement/plan", json=body)
    assert r.status_code == 200, r.text
    lb = r.json()["lower_bound"]
    assert lb["left_out"] == ["huge"] and "huge" in lb["detail"]
    assert lb["value"] == 1 and lb["optimal"] is False  # a and n fit one host; huge is not counted
