"""The GPU HTTP API through FastAPI's test client (validation -> 422, unknown ids -> 404)."""

from __future__ import annotations

import importlib

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

# isort: split
from symbiont.gpu import api, metrics


@pytest.fixture
def client(monkeypatch):
    api.MANAGER.reset()
    monkeypatch.setattr(api, "cupy_status", lambda: (False, "no cupy in this test"))
    app = FastAPI()
    app.include_router(api.router, prefix="/v1/gpu")
    with TestClient(app) as c:
        yield c
    api.MANAGER.reset()


TRACE = "task,function,arrival_ms,deadline_ms,gflop,blocks\n" + "\n".join(
    f"t{i},f,{i * 0.5},{2 + i % 3},{5 + i},{108 * 8}" for i in range(12)
)


def test_types_and_backends(client):
    types = client.get("/v1/gpu/types").json()
    assert {t["name"] for t in types} >= {"A100", "V100", "T4"}
    assert client.get("/v1/gpu/backends").json()["cupy"]["available"] is False


def test_register_gpus_and_validation(client):
    r = client.post("/v1/gpu/gpus", json={"type": "a100", "server": "s0"})
    assert r.status_code == 201 and r.json()["type"] == "A100" and r.json()["id"] == "gpu0"
    assert client.post("/v1/gpu/gpus", json={"type": "T4", "sharing": "timeslice-best-effort"}).status_code == 201
    assert [g["type"] for g in client.get("/v1/gpu/gpus").json()] == ["A100", "T4"]
    bad = client.post("/v1/gpu/gpus", json={"type": "Z9000"})
    assert bad.status_code == 422 and "unknown GPU type 'Z9000'" in bad.text
    assert client.post("/v1/gpu/gpus", json={"kind": "simulated"}).status_code == 422
    assert "timeslice" in client.post("/v1/gpu/gpus", json={"type": "T4", "sharing": "whatever"}).text
    real = client.post("/v1/gpu/gpus", json={"kind": "cupy", "index": 0})
    assert real.status_code == 409 and "no real GPU" in real.json()["detail"]
    assert client.get("/v1/gpu/gpus/gpu9").status_code == 404


def test_client_quotas_scaling_and_migration(client):
    client.post("/v1/gpu/gpus", json={"type": "A100", "server": "s0"})
    client.post("/v1/gpu/gpus", json={"type": "A100", "server": "s1"})
    r = client.put("/v1/gpu/clients/vm1", json={"gpu": "gpu0", "sm_share": 0.5, "mem_bytes": 1 << 30,
                                                 "critical": True})  # fmt: skip
    assert r.status_code == 200 and r.json()["created"] is True
    r = client.put("/v1/gpu/clients/vm1", json={"sm_share": 0.75})
    scale = r.json()["scale"]
    assert scale["old_share"] == 0.5 and scale["new_share"] == 0.75 and scale["effect_s"] == 0.0
    assert client.put("/v1/gpu/clients/vm1", json={"sm_share": 1.5}).status_code == 422
    assert client.put("/v1/gpu/clients/vm2", json={"sm_share": 0.5}).status_code == 422  # new needs gpu
    over = client.put("/v1/gpu/clients/vm2", json={"gpu": "gpu0", "sm_share": 0.5, "critical": True})
    assert over.status_code == 409 and "over_capacity" in over.text
    assert client.put("/v1/gpu/clients/vm3", json={"gpu": "gpu7"}).status_code == 404
    assert client.get("/v1/gpu/clients/vm1").json()["effective_share"] == 0.75
    assert client.get("/v1/gpu/clients/ghost").status_code == 404
    assert client.get("/v1/gpu/gpus/gpu0").json()["clients"][0]["client"] == "vm1"
    m = client.post("/v1/gpu/clients/vm1/migrate", json={"gpu": "gpu1"})
    assert m.status_code == 200 and m.json()["dst_device"] == 1
    assert client.get("/v1/gpu/clients/vm1").json()["gpu"] == "gpu1"
    assert client.post("/v1/gpu/clients/vm1/migrate", json={"gpu": "nope"}).status_code == 404
    assert client.delete("/v1/gpu/clients/vm1").status_code == 204
    assert client.get("/v1/gpu/clients").json() == []


def test_workloads(client):
    client.post("/v1/gpu/gpus", json={"type": "A100", "sharing": "timeslice-best-effort"})
    r = client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "scheduler": "edf-slice", "trace_csv": TRACE,
                                               "background_vms": 1})  # fmt: skip
    assert r.status_code == 201, r.text
    wid = r.json()["id"]
    got = client.get(f"/v1/gpu/workloads/{wid}").json()
    assert got["summary"]["tasks"] == 12 and len(got["tasks"]) == 12
    assert got["summary"]["met"] + got["summary"]["missed"] + got["summary"]["dropped"] == 12
    tasks = [{"arrival_ms": 0, "deadline_ms": 5, "gflop": 10}, {"arrival_ms": 1, "deadline_ms": 5, "gflop": 1}]
    r2 = client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "scheduler": "fcfs", "tasks": tasks})
    assert r2.status_code == 201 and r2.json()["summary"]["tasks"] == 2
    assert len(client.get("/v1/gpu/workloads").json()) == 2
    both = client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "trace_csv": TRACE, "tasks": tasks})
    assert both.status_code == 422 and "exactly one" in both.text
    assert client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "scheduler": "sjf", "tasks": tasks}).status_code == 422
    bad = client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "trace_csv": "arrival_ms,gflop\n1,2\n"})
    assert bad.status_code == 422 and "lacks column" in bad.text
    assert client.post("/v1/gpu/workloads", json={"gpu": "gpuX", "tasks": tasks}).status_code == 404
    assert client.get("/v1/gpu/workloads/w99").status_code == 404


def test_metrics_are_on_the_default_registry(client):
    client.post("/v1/gpu/gpus", json={"type": "T4"})
    client.put("/v1/gpu/clients/m1", json={"gpu": "gpu0", "sm_share": 0.5})
    text = generate_latest(REGISTRY).decode()
    assert 'symbiont_gpu_client_sm_share{client="m1"} 0.5' in text
    assert "symbiont_gpu_devices" in text
    importlib.reload(metrics)  # idempotent: no duplicate-registration error
