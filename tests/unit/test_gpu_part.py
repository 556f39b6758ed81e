"""The GPU part against the shared fakes (tests/fakes.py): the endpoint server's lifecycle, the
relay of a VM's GPU channel found through the host port (observe), the relay ended when the VM
is unregistered, and the disabled part answering 503 through the API (its handlers reach the
part through ``app.state.parts``)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from symbiont.config import load_config
from symbiont.errors import DaemonError
from symbiont.gpu import api
from symbiont.gpu import backend as gb
from symbiont.gpu.endpoint import HEADER, encode_frame
from symbiont.gpu.part import GpuPart
from symbiont.host.fake import FakeDomain
from symbiont.host.port import HostError
from tests.fakes import Env


def _cfg(tmp_path: Path, enabled: bool = True):
    # a short socket directory: AF_UNIX paths are limited to 108 bytes
    return load_config(None, {"state_dir": str(tmp_path), "socket": str(tmp_path / "api.sock"),
                              "gpu": {"enabled": enabled, "backend": "simulated", "devices": [{"type": "A100"}]}})


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="gpup", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _call(conn: socket.socket, op: str, **args) -> dict:
    conn.sendall(encode_frame({"id": 1, "op": op, "args": args}, b""))
    buf = b""
    while len(buf) < HEADER.size:
        buf += conn.recv(HEADER.size - len(buf))
    jlen, _ = HEADER.unpack(buf)
    body = b""
    while len(body) < jlen:
        body += conn.recv(jlen - len(body))
    return json.loads(body)


def test_relays_a_vms_channel_bound_to_its_client_and_ends_it_on_removal(short_tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr(gb, "cupy_status", lambda: (False, "no cupy in this test"))
    chan = short_tmp / "vm1.gpu.sock"
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # QEMU's listening end of the channel
    qemu.bind(str(chan))
    qemu.listen(2)
    qemu.settimeout(5)
    env = Env(short_tmp, FakeDomain("vm1", channel=str(chan)), FakeDomain("vm2", channel=None),
              cfg=_cfg(short_tmp))
    env.register("vm1")
    env.register("vm2")  # no GPU channel: no relay
    part = env.add(GpuPart)

    async def run() -> None:
        await env.start()
        assert (short_tmp / "gpu-endpoint.sock").exists()
        assert part.require_manager().backend_name == "simulated"
        p = await env.period()
        assert p.observations["gpu"] == {"relays": ["vm1"]}
        conn, _ = await asyncio.to_thread(qemu.accept)
        conn.settimeout(5)
        r = await asyncio.to_thread(_call, conn, "hello", client="someone-else")
        assert r["ok"] is False and r["error"]["code"] == "forbidden"  # bound to vm1's client
        await env.period()  # a live relay is not opened twice
        assert list(part.relays) == ["vm1"]
        env.store.remove_vm("vm1")
        await part.vm_removed("vm1")
        assert part.relays == {}
        assert await asyncio.to_thread(conn.recv, 1) == b""  # the relay's stream closed
        conn.close()
        await part.stop()
        assert part.manager is None and not (short_tmp / "gpu-endpoint.sock").exists()

    try:
        asyncio.run(run())
        assert [d["action"] for d in env.store.query("SELECT action FROM decisions WHERE part = 'gpu'")] == [
            "endpoint-start"]
    finally:
        qemu.close()
        env.close()


def test_no_relay_when_the_host_cannot_name_the_channel(short_tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr(gb, "cupy_status", lambda: (False, "no cupy in this test"))
    env = Env(short_tmp, FakeDomain("vm1", channel=str(short_tmp / "nowhere.sock")), cfg=_cfg(short_tmp))
    env.register("vm1")
    part = env.add(GpuPart)

    async def run() -> None:
        await env.start()
        assert (await env.period()).observations["gpu"] == {"relays": []}  # no socket there
        env.host.fail["channel_path"] = HostError("libvirtd is down")
        assert (await env.period()).observations["gpu"] == {"relays": []}
        await part.stop()

    asyncio.run(run())
    env.close()


def test_a_disabled_part_serves_nothing_and_its_api_answers_503(short_tmp: Path) -> None:
    env = Env(short_tmp, FakeDomain("vm1", channel="/nonexistent"), cfg=_cfg(short_tmp, enabled=False))
    env.register("vm1")
    part = env.add(GpuPart)
    asyncio.run(env.start())
    assert part.manager is None and not (short_tmp / "gpu-endpoint.sock").exists()
    assert asyncio.run(env.period()).observations["gpu"] == {"relays": []}
    app = FastAPI()
    app.state.parts = env.parts

    @app.exception_handler(DaemonError)
    async def _err(_r: Request, exc: DaemonError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    app.include_router(api.router, prefix="/v1/gpu")
    with TestClient(app) as c:
        r = c.get("/v1/gpu/gpus")
        assert r.status_code == 503 and "gpu.enabled" in r.json()["detail"]
        assert c.get("/v1/gpu/backends").json()["enabled"] is False
    asyncio.run(part.stop())
    env.close()
