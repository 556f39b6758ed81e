"""The paging router on a small app with the paging part over the shared fakes: bad input is a 4xx with a
reason and changes nothing (no decision, no parked VM, no tier)."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from symbiont.config import load_config
from symbiont.errors import DaemonError
from symbiont.paging.api import router
from symbiont.paging.part import PagingPart
from tests.fakes import Env


@pytest.fixture
def daemon(tmp_path: Path):
    cfg = load_config(None, {"state_dir": str(tmp_path), "socket": str(tmp_path / "s.sock")})
    env = Env(tmp_path, cfg=cfg)
    env.add(PagingPart)
    asyncio.run(env.start())  # paging disabled: no tier is made
    env.register("vm1")
    yield env
    env.close()


@pytest.fixture
def client(daemon) -> TestClient:
    app = FastAPI()
    app.state.parts = daemon.parts

    @app.exception_handler(DaemonError)
    async def _err(_r: Request, exc: DaemonError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    app.include_router(router, prefix="/v1/paging")
    return TestClient(app)


def _nothing_changed(daemon) -> None:
    assert daemon.store.decisions() == []
    assert daemon.store.query("SELECT * FROM paging_parked") == []
    assert daemon.store.query("SELECT * FROM paging_tier") == []


@pytest.mark.parametrize("method,path,body,status,reason", [
    ("post", "/v1/paging/vms/nope/pageout", {}, 404, "not registered"),
    ("post", "/v1/paging/vms/vm1/pageout", {}, 409, "paging.enabled"),
    ("post", "/v1/paging/vms/vm1/pageout", {"mib": 0}, 422, "mib"),
    ("post", "/v1/paging/vms/vm1/pageout", {"mib": "64"}, 422, "mib"),
    ("post", "/v1/paging/vms/vm1/pageout", {"mib": 64, "x": 1}, 422, "x"),
    ("post", "/v1/paging/vms/bad%20name/pageout", {}, 422, "pattern"),
    ("post", "/v1/paging/vms/nope/park", None, 404, "not registered"),
    ("post", "/v1/paging/vms/vm1/park", None, 409, "no swap tier"),
    ("post", "/v1/paging/vms/vm1/wake", None, 409, "not parked"),
    ("post", "/v1/paging/vms/nope/wake", None, 404, "not registered"),
    ("post", "/v1/paging/vms/vm1/wake?prefetch=maybe", None, 422, "prefetch"),
])
def test_bad_input_is_a_4xx_with_a_reason(client, daemon, method, path, body, status, reason) -> None:
    r = getattr(client, method)(path, json=body) if body is not None else getattr(client, method)(path)
    assert r.status_code == status, r.text
    assert reason in r.text
    _nothing_changed(daemon)


def test_status_without_a_tier(client, daemon) -> None:
    r = client.get("/v1/paging")
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["tier"]["enabled"] is False and data["tier"]["device"] is None
    assert [v["name"] for v in data["vms"]] == ["vm1"] and data["vms"][0]["parked"] is False
