"""API request latency of symbiontd over its unix socket, against a bare-socket baseline.

Baseline, measured in the same run with the same HTTP client (httpx, keep-alive): a minimal
asyncio server on a unix socket that answers every request with a fixed JSON body, i.e. the
cost of the transport and the client alone. The ratio says what FastAPI, validation and the
daemon's own work add. No root needed (the daemon runs without VMs unless --fake-vms is
given, which needs root and libvirtd):

    .venv/bin/python benchmarks/bench_api.py --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import _common
import httpx
import yaml

from symbiont.config import load_config
from symbiont_research.lab.session import DaemonProcess

BODY = b'{"ok":true}'
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)) + BODY


def bare_server(path: str) -> threading.Thread:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                if n:
                    await reader.readexactly(n)
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> None:
        srv = await asyncio.start_unix_server(handle, path)
        async with srv:
            await srv.serve_forever()

    t = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    t.start()
    while not Path(path).exists():
        time.sleep(0.01)
    return t


def measure(sock: str, method: str, url: str, n: int, body: dict | None = None) -> list[float]:
    lat = []
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://x") as c:
        for _ in range(min(50, n)):  # warm-up
            c.request(method, url, json=body)
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.request(method, url, json=body)
            lat.append(time.perf_counter() - t0)
            assert r.status_code < 500, r.text
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        bare = str(t / "bare.sock")
        bare_server(bare)
        cfgd = {"state_dir": str(t / "state"), "socket": str(t / "api.sock"), "control": {"period_s": 5}}
        (t / "d.yaml").write_text(yaml.safe_dump(cfgd))
        d = DaemonProcess(t / "d.yaml", load_config(t / "d.yaml"), t / "d.log")
        d.start()
        try:
            base = measure(bare, "GET", "/v1/health", args.requests)
            print(f"baseline (bare asyncio unix-socket HTTP): {_common.summary_ms(base)}")
            b50 = sorted(base)[len(base) // 2]
            for method, url, body, expect in (
                ("GET", "/v1/health", None, "200"),
                ("GET", "/v1/status", None, "200"),
                ("GET", "/v1/vms", None, "200"),
                ("PUT", "/v1/vms/nope/memory", {"target_mib": 300}, "404 (validation + lookup)"),
                ("POST", "/v1/vms", {"name": "x", "memory": {"shares": -1}}, "422 (pydantic)"),
                ("GET", "/metrics", None, "200"),
            ):
                lat = measure(d.cfg.socket, method, url, args.requests, body)
                p50 = sorted(lat)[len(lat) // 2]
                print(f"{method:6} {url:24} {expect:28} {_common.summary_ms(lat)}  p50 ratio vs baseline {p50 / b50:.1f}x")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
