"""The GPU part inside a real ``symbiontd`` (subprocess) with ``gpu.enabled`` and the simulated
backend: the daemon serves the endpoint socket, GPUs and clients are registered through the
API, an endpoint client allocates/copies/launches over the socket, a quota change through the
API reaches the live endpoint (vertical scaling: the client's kernels speed up), a trace
workload runs and its results are read back; bad input is refused with a reason and changes
nothing; after ``kill -9`` and a restart, GPUs, quotas (re-applied) and results are still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import uuid

import pytest
import yaml
from click.testing import CliRunner

from symbiont.cli import _add_part_groups, cli
from symbiont.client import ApiError
from symbiont.config import load_config
from symbiont.gpu import backend as gb
from symbiont.gpu.calibration import get_calibration
from symbiont.gpu.endpoint import HEADER, EndpointClient, EndpointError, encode_frame
from symbiont.gpu.simulated import GPU_TYPES
from symbiont.host.libvirt_host import LibvirtHost
from symbiont_research.lab.image import Image
from symbiont_research.lab.session import DaemonProcess
from symbiont_research.lab.vms import domain_xml, lab_vm, remove_vm

pytestmark = [pytest.mark.root]

A100 = GPU_TYPES["A100"]
TRACE = "task,function,arrival_ms,deadline_ms,gflop,blocks\n" + "\n".join(
    f"t{i},f,{i * 0.5},{2 + i % 3},{5 + i},{108 * 8}" for i in range(16)
)
# one kernel: 8 waves on a whole A100, 1 ms of work per wave
KERNEL = {"blocks": 8 * A100.sm_count, "flops_per_block": 1e-3 * A100.sm_flops, "name": "k"}


@pytest.fixture(scope="module")
def env(as_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpud")
    cfg = {
        "state_dir": str(tmp / "state"),
        "socket": str(tmp / "api.sock"),
        "control": {"period_s": 0.5},
        "gpu": {
            "enabled": True,
            "backend": "simulated",
            # sim0 is partitioned (MIG-like): a client gets exactly its share of the SMs, so
            # its kernels' duration shows the share; sim1 is another A100 in another server
            "devices": [
                {"type": "A100", "server": "s0", "sharing": "spatial-strict"},
                {"type": "A100", "server": "s1"},
            ],  # fmt: skip
            "default_mem_mib": 1,
        },
    }
    (tmp / "d.yaml").write_text(yaml.safe_dump(cfg))
    d = DaemonProcess(tmp / "d.yaml", load_config(tmp / "d.yaml"), tmp / "d.log")
    d.start()
    yield {"d": d, "tmp": tmp, "ep": tmp / "gpu-endpoint.sock"}
    d.stop()


def db_rows(env, sql: str) -> list[tuple]:
    db = sqlite3.connect(env["d"].cfg.db_path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def kernel_seconds(c: EndpointClient) -> float:
    """Launch one KERNEL and return its duration on the device clock."""
    op = await c.launch(**KERNEL)
    await c.sync()
    t = await c.timing(op)
    return t["end"] - t["start"]


def test_the_daemon_serves_the_endpoint_socket(env) -> None:
    st = env["ep"].stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    with env["d"].client() as c:
        b = c.get("/v1/gpu/backends")
        assert b["enabled"] and b["selected"] == "simulated" and b["endpoint_socket"] == str(env["ep"])
        gpus = c.get("/v1/gpu/gpus")
    assert [(g["id"], g["type"], g["server"], g["sched"]) for g in gpus] == [
        ("sim0", "A100", "s0", "spatial-strict"), ("sim1", "A100", "s1", "spatial")]  # fmt: skip


def test_clients_use_the_endpoint_and_a_quota_change_reaches_it(env) -> None:
    with env["d"].client() as c:
        g = c.post("/v1/gpu/gpus", {"type": "T4", "server": "s2"})
        assert g["id"] == "gpu0" and g["type"] == "T4"
        app = c.put(
            "/v1/gpu/clients/app", {"gpu": "sim0", "sm_share": 0.25, "mem_bytes": 1 << 20, "critical": True}
        )
        assert app["created"] and app["client"]["effective_share"] == 0.25
        c.put("/v1/gpu/clients/noisy", {"gpu": "sim0", "sm_share": 0.5})

    async def go() -> dict:
        a = await EndpointClient.connect(env["ep"], "app")
        n = await EndpointClient.connect(env["ep"], "noisy")
        try:
            buf = await a.alloc(4096)
            await a.h2d(buf, b"symbiont" * 512)
            data = await a.d2h(buf)
            slow = await kernel_seconds(a)
            with env["d"].client() as c:  # vertical scaling through the daemon's API
                r = c.put("/v1/gpu/clients/app", {"sm_share": 0.75})
            info = await a.call("info")
            fast = await kernel_seconds(a)
            with pytest.raises(EndpointError) as over:
                await a.alloc(1 << 20)  # 4096 + 1 MiB > the 1 MiB quota
            nb = await n.alloc(1000)  # the other client is unaffected
            again = await a.d2h(buf, 8)
            return {"data": data, "slow": slow, "fast": fast, "scale": r["scale"], "info": info, "over": over.value,
                    "nb": nb, "again": again, "default_quota": (await n.call("info"))["mem_quota"]}  # fmt: skip
        finally:
            await a.close()
            await n.close()

    res = asyncio.run(go())
    assert res["data"] == b"symbiont" * 512 and res["again"] == b"symbiont"
    assert res["scale"]["old_share"] == 0.25 and res["scale"]["new_share"] == 0.75
    assert res["info"]["sm_share"] == 0.75 and res["info"]["effective_share"] == 0.75
    # 864 blocks on 27 SMs = 32 waves; on 81 SMs = 11 waves (2 % jitter per wave)
    assert 2.6 < res["slow"] / res["fast"] < 3.2, res
    assert res["over"].code == "over_quota" and "quota" in res["over"].message
    assert res["nb"] >= 1 and res["default_quota"] == 1 << 20  # gpu.default_mem_mib
    assert db_rows(env, "SELECT name, gpu, sm_share, mem_bytes, critical FROM gpu_clients ORDER BY name") == [
        ("app", "sim0", 0.75, 1 << 20, 1), ("noisy", "sim0", 0.5, 1 << 20, 0)]  # fmt: skip
    with env["d"].client() as c:
        text = c.call("GET", "/metrics")
        dec = [
            d
            for d in c.get("/v1/decisions", limit=200)
            if d["part"] == "gpu" and d["action"] == "client-quota"
        ]
    text = text if isinstance(text, str) else str(text)
    assert 'symbiont_gpu_client_sm_share{client="app"} 0.75' in text
    assert 'symbiont_gpu_devices{backend="simulated",type="A100"} 2.0' in text
    assert "symbiont_gpu_endpoint_connections" in text
    assert dec[-1]["inputs"]["before"]["sm_share"] == 0.25 and dec[-1]["outcome"]["effective_share"] == 0.75


def test_bad_input_is_refused_and_changes_nothing(env) -> None:
    with env["d"].client() as c:
        before = (c.get("/v1/gpu/clients"), c.get("/v1/gpu/gpus"), c.get("/v1/gpu/workloads"))
        cases = [
            ("PUT", "/v1/gpu/clients/new", {"gpu": "nope", "sm_share": 0.1}, 404, "unknown GPU 'nope'"),
            ("PUT", "/v1/gpu/clients/new", {"sm_share": 0.1}, 422, "needs 'gpu'"),
            ("PUT", "/v1/gpu/clients/app", {"sm_share": 0}, 422, "sm_share"),
            ("PUT", "/v1/gpu/clients/app", {"mem_bytes": 10}, 422, "below what 'app' already holds"),
            ("PUT", "/v1/gpu/clients/noisy", {"critical": True}, 409, "over_capacity"),
            ("PUT", "/v1/gpu/clients/app", {"gpu": "sim1"}, 422, "migrate"),
            ("POST", "/v1/gpu/gpus", {"type": "Z9"}, 422, "unknown GPU type"),
            ("POST", "/v1/gpu/gpus", {"kind": "cupy", "index": 0}, 409, "no real GPU"),
            ("POST", "/v1/gpu/clients/ghost/migrate", {"gpu": "sim1"}, 404, "unknown client"),
            ("POST", "/v1/gpu/clients/app/migrate", {"gpu": "nope"}, 404, "unknown GPU"),
            (
                "POST",
                "/v1/gpu/workloads",
                {"gpu": "sim0", "trace_csv": "arrival_ms,gflop\n1,2\n"},
                422,
                "lacks column",
            ),
            (
                "POST",
                "/v1/gpu/workloads",
                {"gpu": "sim0", "trace_csv": "arrival_ms,deadline_ms,gflop\n1,x,2\n"},
                422,
                "bad trace",
            ),
            ("POST", "/v1/gpu/workloads", {"gpu": "nope", "trace_csv": TRACE}, 404, "unknown GPU"),
            ("DELETE", "/v1/gpu/clients/ghost", None, 404, "unknown client"),
        ]
        if gb.cupy_status()[0]:  # on a GPU machine a real device registers: drop that case
            cases = [x for x in cases if "cupy" not in str(x[2])]
        for method, path, body, status, reason in cases:
            with pytest.raises(ApiError) as ei:
                c.call(method, path, json=body)
            assert ei.value.status == status and reason in ei.value.detail, (method, path, body, ei.value)
        assert (c.get("/v1/gpu/clients"), c.get("/v1/gpu/gpus"), c.get("/v1/gpu/workloads")) == before

    async def still_works() -> bytes:
        a = await EndpointClient.connect(env["ep"], "app")
        try:
            with pytest.raises(EndpointError) as e:
                await a.d2h(999)
            assert e.value.code == "unknown_buffer"
            return await a.d2h(1, 8)  # the buffer allocated by the previous test
        finally:
            await a.close()

    assert asyncio.run(still_works()) == b"symbiont"


def test_a_trace_workload_runs_and_its_results_are_kept(env) -> None:
    with env["d"].client() as c:
        w = c.post("/v1/gpu/workloads", {"gpu": "gpu0", "scheduler": "edf-slice", "trace_csv": TRACE,
                                         "background_vms": 1})  # fmt: skip
        got = c.get(f"/v1/gpu/workloads/{w['id']}")
    assert w["status"] == "done" and got["summary"] == w["summary"]
    s = got["summary"]
    assert s["tasks"] == 16 and s["met"] + s["missed"] + s["dropped"] == 16
    assert len(got["tasks"]) == 16 and {t["task"] for t in got["tasks"]} == {f"t{i}" for i in range(16)}
    assert db_rows(env, "SELECT id, status FROM gpu_workloads") == [(w["id"], "done")]
    env["workload"] = w


def test_the_cli_drives_the_daemon(env) -> None:
    _add_part_groups()
    run = CliRunner().invoke
    sock = str(env["d"].cfg.socket)
    r = run(
        cli, ["--socket", sock, "gpu", "quota", "cli1", "--gpu", "gpu0", "--share", "0.5", "--mem-mib", "2"]
    )
    assert r.exit_code == 0 and "created cli1 on gpu0: share 0.5" in r.output, r.output
    r = run(cli, ["--socket", sock, "gpu", "quota", "cli1", "--share", "0.25"])
    assert r.exit_code == 0 and "scaled 0.5 -> 0.25" in r.output, r.output
    r = run(cli, ["--socket", sock, "gpu", "clients", "--json"])
    got = {c["client"]: c for c in json.loads(r.output)}
    assert got["cli1"]["sm_share"] == 0.25 and got["cli1"]["mem_quota"] == 2 << 20
    r = run(cli, ["--socket", sock, "gpu", "quota", "cli1", "--gpu", "nope"])
    assert r.exit_code == 2 and "422" in r.output and "migrate" in r.output
    r = run(cli, ["--socket", sock, "gpu", "delete", "cli1"])
    assert r.exit_code == 0, r.output
    trace = env["tmp"] / "t.csv"
    trace.write_text(TRACE)
    r = run(
        cli, ["--socket", sock, "gpu", "submit", str(trace), "--gpu", "gpu0", "--scheduler", "fcfs", "--json"]
    )
    w = json.loads(r.output)
    assert w["summary"]["scheduler"] == "fcfs" and w["summary"]["tasks"] == 16
    r = run(cli, ["--socket", sock, "gpu", "workloads"])
    assert r.exit_code == 0 and w["id"] in r.output and "fcfs" in r.output
    r = run(cli, ["--socket", sock, "gpu", "gpus"])
    assert r.exit_code == 0 and "sim0" in r.output and "T4" in r.output
    env["cli_workload"] = w["id"]


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("stream ended")
        buf += chunk
    return buf


def channel_call(conn: socket.socket, op: str, payload: bytes = b"", **args) -> tuple[dict, bytes]:
    """One endpoint request as a guest application writes it into its virtio-serial port."""
    conn.sendall(encode_frame({"id": 1, "op": op, "args": args}, payload))
    jlen, plen = HEADER.unpack(_recv_exact(conn, HEADER.size))
    return json.loads(_recv_exact(conn, jlen)), _recv_exact(conn, plen) if plen else b""


@pytest.mark.libvirt
def test_a_guest_reaches_the_endpoint_over_its_gpu_channel(env, libvirtd) -> None:
    """The daemon relays a VM's ``org.symbiont.gpu.0`` channel to the endpoint, bound to the
    VM's client. The domain is defined, not booted: the test plays QEMU's end of the channel
    socket and the guest application behind it."""
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    tmp = env["tmp"]
    chans = tmp / "channels"
    chans.mkdir(exist_ok=True)
    lcfg = load_config(None, {"lab": {"channels_dir": str(chans), "vms_dir": str(tmp / "vms")}})
    name = f"symbiont-p10gpu-{uuid.uuid4().hex[:6]}"
    gpu_sock = chans / f"{name}.gpu.sock"
    img = Image(tmp, tmp / "none.qcow2", tmp / "vmlinuz", tmp / "initrd", "fake", info={})
    xml = domain_xml(lcfg, lab_vm(lcfg, name), img).replace("</devices>", (
        f"<channel type='unix'><source mode='bind' path='{gpu_sock}'/>"
        "<target type='virtio' name='org.symbiont.gpu.0'/></channel></devices>"))  # fmt: skip
    host = LibvirtHost()
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # QEMU's listening end of the channel
    qemu.bind(str(gpu_sock))
    qemu.listen(2)
    qemu.settimeout(20)
    try:
        host.conn.defineXML(xml)
        with env["d"].client() as c:
            c.post("/v1/vms", {"name": name})
            c.put(f"/v1/gpu/clients/{name}", {"gpu": "sim1", "sm_share": 0.5, "mem_bytes": 1 << 20})
        conn, _ = qemu.accept()  # the daemon connects within a control period
        conn.settimeout(20)
        r, _ = channel_call(conn, "hello", client="app")  # another client's quotas: refused
        assert r["ok"] is False and r["error"]["code"] == "forbidden" and name in r["error"]["message"]
        r, _ = channel_call(conn, "hello", admin=True)
        assert r["ok"] is False and r["error"]["code"] == "forbidden"
        r, _ = channel_call(conn, "hello", client=name)
        assert r["ok"] and r["result"]["info"]["sm_share"] == 0.5
        r, _ = channel_call(conn, "alloc", nbytes=4096)
        buf = r["result"]["buf"]
        r, _ = channel_call(conn, "h2d", b"from the guest", buf=buf)
        assert r["ok"], r
        r, data = channel_call(conn, "d2h", buf=buf, nbytes=14)
        assert r["ok"] and data == b"from the guest"
        r, _ = channel_call(conn, "alloc", nbytes=1 << 20)
        assert r["error"]["code"] == "over_quota"
        # a frame announcing more payload than a guest may send: refused, that stream closed
        conn.sendall(HEADER.pack(2, 16 * 2**20 + 1) + b"{}")
        jlen, plen = HEADER.unpack(_recv_exact(conn, HEADER.size))
        assert json.loads(_recv_exact(conn, jlen))["error"]["code"] == "bad_frame"
        assert conn.recv(1) == b""  # closed by the daemon
        conn.close()
        conn2, _ = qemu.accept()  # and reconnected in a later period
        conn2.settimeout(20)
        r, _ = channel_call(conn2, "hello", client=name)
        assert r["ok"] and r["result"]["info"]["buffers"] == 1  # same client, same buffer
        conn2.close()
        with env["d"].client() as c:
            assert c.get("/v1/health")["ok"]
            assert c.get("/v1/gpu/clients/app")["effective_share"] == 0.75  # others unaffected
    finally:
        with env["d"].client() as c:
            with contextlib.suppress(ApiError):
                c.delete(f"/v1/gpu/clients/{name}")
            with contextlib.suppress(ApiError):
                c.delete(f"/v1/vms/{name}")
        qemu.close()
        remove_vm(host, lcfg, name)
        host.close()


def test_state_survives_kill_9_and_quotas_are_reapplied(env) -> None:
    d = env["d"]
    with d.client() as c:
        m = c.post("/v1/gpu/clients/noisy/migrate", {"gpu": "sim1"})
        assert m["dst_gpu"] == "sim1" and m["downtime_s"] >= 0
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    d.start()
    with d.client() as c:
        assert [g["id"] for g in c.get("/v1/gpu/gpus")] == ["sim0", "sim1", "gpu0"]
        app = c.get("/v1/gpu/clients/app")
        noisy = c.get("/v1/gpu/clients/noisy")
        w = c.get(f"/v1/gpu/workloads/{env['workload']['id']}")
        text = c.call("GET", "/metrics")
    assert (app["gpu"], app["sm_share"], app["effective_share"], app["mem_quota"], app["critical"]) == (
        "sim0", 0.75, 0.75, 1 << 20, True)  # fmt: skip
    assert app["mem_used"] == 0 and app["buffers"] == 0  # device memory does not survive a restart
    assert noisy["gpu"] == "sim1"
    assert w["summary"] == env["workload"]["summary"] and len(w["tasks"]) == 16
    assert 'symbiont_gpu_client_sm_share{client="app"} 0.75' in str(text)

    async def go() -> tuple[float, str]:
        a = await EndpointClient.connect(env["ep"], "app")
        try:
            t = await kernel_seconds(a)  # runs at the re-applied 0.75 share
            await a.alloc(1 << 20)
            with pytest.raises(EndpointError) as e:
                await a.alloc(1)  # the re-applied memory quota holds
            return t, e.value.code
        finally:
            await a.close()

    t, code = asyncio.run(go())
    assert code == "over_quota"
    waves = -(-KERNEL["blocks"] // 81)  # 81 SMs = floor(0.75 * 108)
    eff = get_calibration(None).flops_efficiency  # the simulator's default: the H100 fit
    assert t == pytest.approx(waves * 1e-3 / eff, rel=0.05)


def test_sigterm_removes_the_socket_and_a_forced_cupy_backend_needs_a_gpu(env) -> None:
    d = env["d"]
    assert d.stop() == 0
    assert not env["ep"].exists()
    d.start()
    assert env["ep"].exists()
    tmp = env["tmp"]
    bad = {
        "state_dir": str(tmp / "state2"),
        "socket": str(tmp / "api2.sock"),
        "gpu": {"enabled": True, "backend": "cupy"},
    }
    (tmp / "cupy.yaml").write_text(yaml.safe_dump(bad))
    ok, why = gb.cupy_status()
    if ok:  # a GPU machine: the daemon selects the real backend
        d2 = DaemonProcess(tmp / "cupy.yaml", load_config(tmp / "cupy.yaml"), tmp / "d2.log")
        d2.start()
        try:
            with d2.client() as c:
                assert c.get("/v1/gpu/backends")["selected"] == "cupy"
        finally:
            d2.stop()
    else:
        r = subprocess.run([sys.executable, "-m", "symbiont.daemon", "--config", str(tmp / "cupy.yaml")],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode != 0 and "gpu.backend is cupy but no CUDA device is usable" in r.stderr
    (tmp / "typo.yaml").write_text(yaml.safe_dump({"gpu": {"enabled": True, "devices": [{"type": "A1OO"}]}}))
    r = subprocess.run([sys.executable, "-m", "symbiont.daemon", "--config", str(tmp / "typo.yaml"), "--check-config"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "gpu.devices[0].type: unknown GPU type 'A1OO'" in r.stderr
