"""The GPU HTTP API through FastAPI's test client over a real sqlite store (validation -> 422,
unknown ids -> 404, disabled part -> 503), and the manager's persistence across a restart."""

from __future__ import annotations

import importlib
import json
import sqlite3

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

# isort: split
from symbiont.errors import DaemonError
from symbiont.gpu import api, metrics
from symbiont.gpu import backend as gb
from symbiont.gpu.manager import GpuManager
from symbiont.state import StateStore


class FakePart:
    """What the GPU router needs of the part: its manager (None: the part is disabled)."""

    manager: GpuManager | None = None


def make_app(part: FakePart) -> FastAPI:
    app = FastAPI()
    app.state.parts = {"gpu": part}

    @app.exception_handler(DaemonError)
    async def _err(_r: Request, exc: DaemonError) -> JSONResponse:  # as symbiont.api.create_app does
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    app.include_router(api.router, prefix="/v1/gpu")
    return app


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setattr(gb, "cupy_status", lambda: (False, "no cupy in this test"))
    store = StateStore(tmp_path / "state.sqlite3")
    part = FakePart()

    def boot(devices=()) -> GpuManager:
        mgr = GpuManager(store, backend="simulated", devices=list(devices), default_mem_bytes=1 << 30)
        mgr.load()
        part.manager = mgr
        return mgr

    boot()
    with TestClient(make_app(part)) as c:
        yield {"c": c, "boot": boot, "store": store, "db": tmp_path / "state.sqlite3", "part": part}
    part.manager = None
    store.close()


@pytest.fixture
def client(env):
    return env["c"]


TRACE = "task,function,arrival_ms,deadline_ms,gflop,blocks\n" + "\n".join(
    f"t{i},f,{i * 0.5},{2 + i % 3},{5 + i},{108 * 8}" for i in range(12)
)


def rows(env, sql: str) -> list[tuple]:
    db = sqlite3.connect(env["db"])
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_types_and_backends(client):
    types = client.get("/v1/gpu/types").json()
    assert {t["name"] for t in types} >= {"A100", "V100", "T4"}
    b = client.get("/v1/gpu/backends").json()
    assert b["cupy"]["available"] is False and b["enabled"] is True and b["selected"] == "simulated"


def test_disabled_part_answers_503_with_the_reason(env):
    env["part"].manager = None
    r = env["c"].get("/v1/gpu/gpus")
    assert r.status_code == 503 and "gpu.enabled" in r.json()["detail"]
    assert env["c"].get("/v1/gpu/types").status_code == 200
    assert env["c"].get("/v1/gpu/backends").json()["enabled"] is False


def test_register_gpus_and_validation(client, env):
    r = client.post("/v1/gpu/gpus", json={"type": "a100", "server": "s0"})
    assert r.status_code == 201 and r.json()["type"] == "A100" and r.json()["id"] == "gpu0"
    assert client.post("/v1/gpu/gpus", json={"type": "T4", "sharing": "timeslice-best-effort"}).status_code == 201
    assert [g["type"] for g in client.get("/v1/gpu/gpus").json()] == ["A100", "T4"]
    bad = client.post("/v1/gpu/gpus", json={"type": "Z9000"})
    assert bad.status_code == 422 and "unknown GPU type 'Z9000'" in bad.text
    assert client.post("/v1/gpu/gpus", json={"kind": "simulated"}).status_code == 422
    assert "timeslice" in client.post("/v1/gpu/gpus", json={"type": "T4", "sharing": "whatever"}).text
    assert client.post("/v1/gpu/gpus", json={"type": "T4", "colour": "red"}).status_code == 422
    real = client.post("/v1/gpu/gpus", json={"kind": "cupy", "index": 0})
    assert real.status_code == 409 and "no real GPU" in real.json()["detail"]
    assert client.get("/v1/gpu/gpus/gpu9").status_code == 404
    # only the two accepted registrations are stored
    assert [r[0] for r in rows(env, "SELECT id FROM gpu_devices ORDER BY seq")] == ["gpu0", "gpu1"]


def test_client_quotas_scaling_and_migration(client, env):
    client.post("/v1/gpu/gpus", json={"type": "A100", "server": "s0"})
    client.post("/v1/gpu/gpus", json={"type": "A100", "server": "s1"})
    r = client.put("/v1/gpu/clients/vm1", json={"gpu": "gpu0", "sm_share": 0.5, "mem_bytes": 1 << 30,
                                                 "critical": True})  # fmt: skip
    assert r.status_code == 200 and r.json()["created"] is True
    r = client.put("/v1/gpu/clients/vm1", json={"sm_share": 0.75})
    scale = r.json()["scale"]
    assert scale["old_share"] == 0.5 and scale["new_share"] == 0.75 and scale["effect_s"] == 0.0
    assert rows(env, "SELECT gpu, sm_share, critical FROM gpu_clients") == [("gpu0", 0.75, 1)]
    assert client.put("/v1/gpu/clients/vm1", json={"sm_share": 1.5}).status_code == 422
    assert client.put("/v1/gpu/clients/vm2", json={"sm_share": 0.5}).status_code == 422  # new needs gpu
    over = client.put("/v1/gpu/clients/vm2", json={"gpu": "gpu0", "sm_share": 0.5, "critical": True})
    assert over.status_code == 409 and "over_capacity" in over.text
    assert client.put("/v1/gpu/clients/vm3", json={"gpu": "gpu7"}).status_code == 404
    assert client.put("/v1/gpu/clients/bad%20name", json={"gpu": "gpu0"}).status_code == 422
    assert client.get("/v1/gpu/clients/vm1").json()["effective_share"] == 0.75
    assert client.get("/v1/gpu/clients/ghost").status_code == 404
    assert client.get("/v1/gpu/gpus/gpu0").json()["clients"][0]["client"] == "vm1"
    # refused requests changed nothing, neither in sqlite nor in the service
    assert rows(env, "SELECT name, sm_share FROM gpu_clients") == [("vm1", 0.75)]
    m = client.post("/v1/gpu/clients/vm1/migrate", json={"gpu": "gpu1"})
    assert m.status_code == 200 and m.json()["dst_device"] == 1 and m.json()["dst_gpu"] == "gpu1"
    assert client.get("/v1/gpu/clients/vm1").json()["gpu"] == "gpu1"
    assert rows(env, "SELECT gpu FROM gpu_clients") == [("gpu1",)]
    assert client.post("/v1/gpu/clients/vm1/migrate", json={"gpu": "nope"}).status_code == 404
    assert client.delete("/v1/gpu/clients/vm1").json() == {"deleted": "vm1"}
    assert client.get("/v1/gpu/clients").json() == []
    assert rows(env, "SELECT * FROM gpu_clients") == []


def test_a_refused_quota_change_changes_nothing(client, env):
    """Memory quota and an over-capacity critical flag in one request: the refusal must not
    leave the new memory quota behind (it used to be applied before the check)."""
    client.post("/v1/gpu/gpus", json={"type": "A100"})
    client.put("/v1/gpu/clients/crit", json={"gpu": "gpu0", "sm_share": 0.7, "critical": True})
    client.put("/v1/gpu/clients/other", json={"gpu": "gpu0", "sm_share": 0.5, "mem_bytes": 1000})
    r = client.put("/v1/gpu/clients/other", json={"mem_bytes": 5000, "critical": True})
    assert r.status_code == 409 and "over_capacity" in r.text
    got = client.get("/v1/gpu/clients/other").json()
    assert got["mem_quota"] == 1000 and got["critical"] is False
    assert rows(env, "SELECT mem_bytes, critical FROM gpu_clients WHERE name = 'other'") == [(1000, 0)]


def test_workloads(client, env):
    client.post("/v1/gpu/gpus", json={"type": "A100", "sharing": "timeslice-best-effort"})
    r = client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "scheduler": "edf-slice", "trace_csv": TRACE,
                                               "background_vms": 1})  # fmt: skip
    assert r.status_code == 201, r.text
    wid = r.json()["id"]
    got = client.get(f"/v1/gpu/workloads/{wid}").json()
    assert got["status"] == "done" and got["params"]["n_tasks"] == 12
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
    assert [r[0] for r in rows(env, "SELECT id FROM gpu_workloads ORDER BY seq")] == [wid, r2.json()["id"]]


def test_state_survives_a_restart_and_quotas_are_reapplied(client, env):
    env["boot"]([{"type": "A100"}])  # configured device sim0
    client.post("/v1/gpu/gpus", json={"type": "T4", "server": "s1"})
    client.put("/v1/gpu/clients/a", json={"gpu": "sim0", "sm_share": 0.4, "mem_bytes": 4096, "critical": True})
    client.put("/v1/gpu/clients/b", json={"gpu": "gpu0", "sm_share": 0.3})
    client.put("/v1/gpu/clients/a", json={"sm_share": 0.6})
    w = client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "trace_csv": TRACE}).json()
    # a workload a crash interrupted: left 'running' in sqlite
    with env["store"].transaction() as db:
        db.execute("INSERT INTO gpu_workloads (id, seq, gpu, params, status, submitted_at) "
                   "VALUES ('w7', 7, 'gpu0', '{}', 'running', 0)")  # fmt: skip
    mgr = env["boot"]([{"type": "A100"}])  # a new manager on the same sqlite: the daemon restarted
    assert sorted(mgr.gpus) == ["gpu0", "sim0"]
    a = client.get("/v1/gpu/clients/a").json()
    assert (a["gpu"], a["sm_share"], a["effective_share"], a["mem_quota"], a["critical"]) == ("sim0", 0.6, 0.6, 4096,
                                                                                            True)  # fmt: skip
    assert client.get("/v1/gpu/clients/b").json()["effective_share"] == 0.3
    # the re-applied quotas are live: the endpoint enforces the memory quota
    svc = mgr.resolve("a")
    svc.alloc("a", 4096)
    with pytest.raises(Exception, match="over_quota|exceeds memory quota"):
        svc.alloc("a", 1)
    assert client.get(f"/v1/gpu/workloads/{w['id']}").json()["summary"] == w["summary"]
    w7 = client.get("/v1/gpu/workloads/w7").json()
    assert w7["status"] == "interrupted" and "stopped" in w7["error"]
    # new ids continue after the stored ones
    assert client.post("/v1/gpu/gpus", json={"type": "V100"}).json()["id"] == "gpu1"


def test_a_client_whose_gpu_is_gone_is_kept_as_orphan(client, env):
    env["boot"]([{"type": "A100"}])
    client.put("/v1/gpu/clients/x", json={"gpu": "sim0", "sm_share": 0.5})
    env["boot"]([])  # restarted with no configured devices: sim0 is gone
    listed = client.get("/v1/gpu/clients").json()
    assert listed == [{"client": "x", "state": "orphaned", "gpu": "sim0", "sm_share": 0.5, "mem_bytes": 1 << 30,
                       "critical": False, "reason": "its GPU 'sim0' is not registered any more"}]  # fmt: skip
    r = client.put("/v1/gpu/clients/x", json={"sm_share": 0.2})
    assert r.status_code == 422  # needs a GPU again
    client.post("/v1/gpu/gpus", json={"type": "A100"})
    assert client.put("/v1/gpu/clients/x", json={"gpu": "gpu0", "sm_share": 0.2}).json()["created"] is True
    assert client.get("/v1/gpu/clients/x").json()["gpu"] == "gpu0"


def test_metrics_are_on_the_default_registry(client, env):
    client.post("/v1/gpu/gpus", json={"type": "T4"})
    client.put("/v1/gpu/clients/m1", json={"gpu": "gpu0", "sm_share": 0.5})
    client.post("/v1/gpu/workloads", json={"gpu": "gpu0", "trace_csv": TRACE})
    text = generate_latest(REGISTRY).decode()
    assert 'symbiont_gpu_client_sm_share{client="m1"} 0.5' in text
    assert 'symbiont_gpu_devices{backend="simulated",type="T4"} 1.0' in text
    assert 'symbiont_gpu_clients{gpu="gpu0"} 1.0' in text
    assert 'symbiont_gpu_workloads{status="done"} 1.0' in text
    importlib.reload(metrics)  # idempotent: no duplicate-registration error


def test_decisions_are_logged_with_inputs(client, env):
    client.post("/v1/gpu/gpus", json={"type": "T4"})
    client.put("/v1/gpu/clients/d1", json={"gpu": "gpu0", "sm_share": 0.5})
    client.put("/v1/gpu/clients/d1", json={"sm_share": 0.25})
    got = [(d["action"], d["inputs"]) for d in env["store"].decisions() if d["part"] == "gpu"]
    acts = [a for a, _ in got]
    assert acts[-3:] == ["register-gpu", "client-create", "client-quota"]
    q = got[-1][1]
    assert q["before"]["sm_share"] == 0.5 and q["request"]["sm_share"] == 0.25
    assert json.dumps(q)  # serialisable inputs
