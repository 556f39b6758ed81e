"""The guest's stdlib GPU client against the real endpoint server, over a socket pair standing
in for the virtio-serial port the daemon relays (the VM test does it from inside a guest)."""

from __future__ import annotations

import asyncio
import socket
import threading

from symbiont.gpu.endpoint import EndpointServer, GpuEndpointService
from symbiont.gpu.simulated import DeviceConfig, SimulatedBackend
from symbiont_agent import gpu_client


def test_selftest_through_a_bound_relay(tmp_path, monkeypatch) -> None:
    svc = GpuEndpointService(SimulatedBackend([DeviceConfig("A100")]))
    svc.register_client("vm1", 0, 0.5, mem_bytes=64 << 20)
    svc.register_client("vm2", 0, 0.5, mem_bytes=64 << 20)
    guest, host = socket.socketpair()

    async def relay() -> None:
        srv = EndpointServer(svc, tmp_path / "ep.sock")
        r, w = await asyncio.open_unix_connection(sock=host)
        await srv.serve_connection(r, w, bound="vm1", max_payload=16 << 20)

    t = threading.Thread(target=lambda: asyncio.run(relay()), daemon=True)
    t.start()
    monkeypatch.setattr(gpu_client.os, "open", lambda path, flags: guest.detach())
    out = gpu_client.selftest("vm1", 4, path="/dev/virtio-ports/org.symbiont.gpu.0")
    t.join(timeout=10)
    assert out["roundtrip_ok"] and out["still_usable"] and out["mem_released"]
    assert out["mem_charged"] == 4 << 20 and out["sm_share"] == 0.5 and out["kernel_s"] > 0
    assert (out["forbidden"], out["over_quota"], out["unknown_buffer"]) == (
        "forbidden", "over_quota", "unknown_buffer",
    )
    assert svc.clients["vm2"].mem_used == 0 and svc.clients["vm1"].mem_used == 0
