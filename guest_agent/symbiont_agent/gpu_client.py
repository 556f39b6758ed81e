"""GPU endpoint client for applications inside a guest (standard library only).

The daemon relays the VM's virtio-serial port ``org.symbiont.gpu.0`` to its GPU endpoint
service, bound to the client named like the VM. This is Flyt's remoting, carried over the
hypervisor's channel instead of the guest network. The frames are those of the endpoint
(``symbiont.gpu.endpoint``): ``u32 BE JSON length | u32 BE payload length | JSON | payload``;
a request is ``{"id", "op", "args"}``, a reply ``{"id", "ok", "result"|"error"}``.

    python3 -m symbiont_agent.gpu_client selftest --client VMNAME [--mib 4]

The self-test prints one JSON object: what a guest application sees (round-trip of a buffer
through device memory, a kernel's timing, and the refusals it must get).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Any

PORT = "/dev/virtio-ports/org.symbiont.gpu.0"
HEADER = struct.Struct(">II")
MAX_JSON = 64 * 1024
MAX_PAYLOAD = 16 * 2**20


class GpuEndpointError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class GpuClient:
    """One stream to the endpoint: requests are answered in order."""

    def __init__(self, path: str = PORT) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self._id = int.from_bytes(os.urandom(4), "big")  # ids unique across users of the port

    def close(self) -> None:
        os.close(self.fd)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.fd, n - len(buf))
            if not chunk:
                raise EOFError("the endpoint closed the stream")
            buf += chunk
        return bytes(buf)

    def request(self, op: str, args: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        self._id += 1
        body = json.dumps({"id": self._id, "op": op, "args": args}, separators=(",", ":")).encode()
        frame = HEADER.pack(len(body), len(payload)) + body + payload
        view = memoryview(frame)
        while view:
            view = view[os.write(self.fd, view) :]
        while True:  # replies to an earlier, abandoned user of the port may still be queued
            jlen, plen = HEADER.unpack(self._read(HEADER.size))
            if not 0 < jlen <= MAX_JSON or plen > MAX_PAYLOAD:
                raise GpuEndpointError("bad_frame", f"reply of {jlen}+{plen} bytes is out of bounds")
            reply = json.loads(self._read(jlen))
            data = self._read(plen) if plen else b""
            if reply.get("id") == self._id or reply.get("id") is None:
                return reply, data

    def call_data(self, name: str, args: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """``name``'s result and reply payload; an error reply raises :class:`GpuEndpointError`."""
        reply, data = self.request(name, args, payload)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise GpuEndpointError(str(err.get("code", "error")), str(err.get("message", "")))
        return reply["result"], data

    def call(self, name: str, payload: bytes = b"", /, **args: Any) -> dict[str, Any]:
        return self.call_data(name, args, payload)[0]

    def hello(self, client: str) -> dict[str, Any]:
        return self.call("hello", client=client)

    def alloc(self, nbytes: int) -> int:
        return int(self.call("alloc", nbytes=nbytes)["buf"])

    def h2d(self, buf: int, data: bytes) -> int:
        return int(self.call("h2d", data, buf=buf)["op"])

    def d2h(self, buf: int, nbytes: int | None = None) -> bytes:
        args: dict[str, Any] = {"buf": buf}
        if nbytes is not None:
            args["nbytes"] = nbytes
        return self.call_data("d2h", args)[1]

    def launch(self, blocks: int, flops_per_block: float) -> int:
        return int(self.call("launch", blocks=blocks, flops_per_block=flops_per_block)["op"])

    def sync(self) -> float:
        return float(self.call("sync")["now"])

    def timing(self, op: int) -> dict[str, Any]:
        return self.call("timing", op=op)


def _refusal(fn: Any) -> str | None:
    try:
        fn()
    except GpuEndpointError as exc:
        return exc.code
    return None


def selftest(client: str, mib: int, path: str = PORT) -> dict[str, Any]:
    c = GpuClient(path)
    try:
        out: dict[str, Any] = {"client": client}
        out["forbidden"] = _refusal(lambda: c.hello(client + "-other"))  # the channel is bound to us
        info = c.hello(client)["info"]
        out["sm_share"] = info.get("sm_share")
        n = mib << 20
        before = int(c.call("info")["mem_used"])
        data = bytes((i * 7 + 3) & 0xFF for i in range(256)) * (n // 256)
        buf = c.alloc(n)
        c.h2d(buf, data)
        out["roundtrip_ok"] = c.d2h(buf) == data
        out["mem_charged"] = int(c.call("info")["mem_used"]) - before
        op = c.launch(blocks=1024, flops_per_block=2e6)
        c.sync()
        t = c.timing(op)
        out["kernel_s"] = t["end"] - t["start"]
        quota = int(info.get("mem_quota", 0))
        out["over_quota"] = _refusal(lambda: c.alloc(quota + 1)) if quota else None
        out["unknown_buffer"] = _refusal(lambda: c.d2h(buf + 10**6))
        out["still_usable"] = c.d2h(buf, 256) == data[:256]
        c.call("free", buf=buf)
        out["mem_released"] = before - int(c.call("info")["mem_used"]) == 0
        return out
    finally:
        c.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m symbiont_agent.gpu_client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("selftest", help="allocate, copy, launch and check the refusals; print JSON")
    st.add_argument("--client", required=True, help="this VM's client name (its libvirt name)")
    st.add_argument("--mib", type=int, default=4, help="buffer size for the round trip")
    st.add_argument("--port", default=PORT)
    a = ap.parse_args(argv)
    try:
        print(json.dumps(selftest(a.client, a.mib, a.port)))
    except (OSError, EOFError, GpuEndpointError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
