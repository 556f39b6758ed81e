"""An untrusted guest on a channel socket: malformed, truncated and oversized frames drop
that connection only; the daemon stays healthy and keeps serving the other VMs.

Real daemon (subprocess), real libvirt domains (defined, not booted: their channel sockets
are played by :class:`FakeGuest`).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml

from symbiont.config import load_config
from symbiont.host.libvirt_host import LibvirtHost
from symbiont_agent import protocol as proto
from symbiont_research.lab.image import Image
from symbiont_research.lab.session import DaemonProcess
from symbiont_research.lab.vms import domain_xml, lab_vm, remove_vm

from .fakeguest import FakeGuest, raw_frame

pytestmark = [pytest.mark.root, pytest.mark.libvirt]

FRAME_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def env(libvirtd, tmp_path_factory):
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    tmp = tmp_path_factory.mktemp("fake")
    chans = tmp / "channels"
    chans.mkdir()
    cfg = load_config(None, {"lab": {"channels_dir": str(chans), "vms_dir": str(tmp / "vms")}})
    host = LibvirtHost()
    tag = uuid.uuid4().hex[:6]
    img = Image(tmp, tmp / "none.qcow2", tmp / "vmlinuz", tmp / "initrd", "fake", info={})
    names = {"good": f"symbiont-fake-good-{tag}", "bad": f"symbiont-fake-bad-{tag}"}
    for name in names.values():
        host.conn.defineXML(domain_xml(cfg, lab_vm(cfg, name), img))
    guests = {k: FakeGuest(lab_vm(cfg, n).channel) for k, n in names.items()}
    dcfg = {
        "state_dir": str(tmp / "state"),
        "socket": str(tmp / "api.sock"),
        "control": {"period_s": 0.5, "agent_timeout_s": 1.0},
        "agent": {"frame_timeout_s": FRAME_TIMEOUT, "reconnect_max_s": 0.5},
    }
    (tmp / "d.yaml").write_text(yaml.safe_dump(dcfg))
    daemon = DaemonProcess(tmp / "d.yaml", load_config(tmp / "d.yaml"), tmp / "d.log")
    daemon.start()
    guests["good"].behave()
    with daemon.client() as c:
        for name in names.values():
            c.post("/v1/vms", {"name": name})
    yield {"names": names, "guests": guests, "daemon": daemon, "host": host, "cfg": cfg}
    daemon.stop()
    for g in guests.values():
        g.close()
    for name in names.values():
        remove_vm(host, cfg, name)
    host.close()


def vm(env, key: str) -> dict:
    with env["daemon"].client() as c:
        return c.get(f"/v1/vms/{env['names'][key]}")


def wait(pred, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = pred()
        if r:
            return r
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def bad_session(env):
    """Accept the daemon's (re)connection on the bad VM's channel and complete a handshake."""
    g = env["guests"]["bad"]
    conn = g.accept()
    g.handshake(conn)
    wait(lambda: vm(env, "bad")["cooperative"])
    return g, conn


def assert_others_unaffected(env) -> None:
    with env["daemon"].client() as c:
        assert c.get("/v1/health")["ok"]
    good = env["guests"]["good"]
    before = good.stats_answered
    wait(lambda: good.stats_answered > before)
    assert vm(env, "good")["cooperative"]


def test_good_guest_is_cooperative_and_its_stats_are_stored(env) -> None:
    wait(lambda: vm(env, "good")["guest"]["mem_total_mib"] == 512)
    db = Path(env["daemon"].cfg.db_path)
    import sqlite3

    rows = sqlite3.connect(db).execute(
        "SELECT data FROM samples WHERE vm = ? AND source = 'agent'", (env["names"]["good"],)
    ).fetchall()
    assert rows and json.loads(rows[-1][0])["meminfo"]["MemTotal"] == 512 << 20


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(lambda: raw_frame(8, 0, b"not json"), id="malformed-json"),
        pytest.param(lambda: raw_frame(proto.MAX_JSON + 1, 0), id="oversized-json"),
        pytest.param(lambda: raw_frame(10, proto.MAX_BINARY + 1), id="oversized-binary"),
        pytest.param(lambda: b"\xde\xad\xbe\xef" * 8, id="bad-magic"),
        pytest.param(lambda: proto.encode({"type": "resp", "id": "x", "ok": True}), id="invalid-resp-id"),
        pytest.param(lambda: proto.encode(proto.hello("host", "x", [])), id="hello-with-wrong-role"),
    ],
)
def test_bad_frames_drop_that_connection_only(env, attack) -> None:
    g, conn = bad_session(env)
    errors_before = vm(env, "bad")["agent"]["protocol_errors"]
    conn.sendall(attack())
    assert g.is_closed_by_peer(conn, timeout=5), "daemon kept a connection that sent a bad frame"
    wait(lambda: not vm(env, "bad")["cooperative"])
    assert vm(env, "bad")["agent"]["protocol_errors"] == errors_before + 1
    assert_others_unaffected(env)


def test_truncated_frame_times_out_and_drops(env) -> None:
    g, conn = bad_session(env)
    frame = proto.encode(proto.response_ok(1, {"x": 1}))
    conn.sendall(frame[: len(frame) // 2])
    t0 = time.monotonic()
    assert g.is_closed_by_peer(conn, timeout=FRAME_TIMEOUT + 5)
    assert time.monotonic() - t0 >= FRAME_TIMEOUT * 0.9
    assert "truncated frame" in vm(env, "bad")["agent"]["last_error"]
    assert_others_unaffected(env)


def test_wrong_protocol_version_is_refused(env) -> None:
    g = env["guests"]["bad"]
    conn = g.accept()
    g.handshake(conn, proto_version=99)
    assert g.is_closed_by_peer(conn, timeout=5)
    assert not vm(env, "bad")["cooperative"]
    assert_others_unaffected(env)


def test_silent_agent_is_marked_uncooperative_then_recovers(env) -> None:
    g, conn = bad_session(env)
    # Say nothing to the daemon's stats requests: it must give up on this VM only.
    wait(lambda: not vm(env, "bad")["cooperative"], timeout=10)
    assert vm(env, "bad")["agent"]["timeouts"] >= 2
    assert_others_unaffected(env)
    # A new hello (the agent restarted) makes it cooperative again.
    conn.sendall(proto.encode(proto.hello("agent", "fake", ["stats"], boot_id="fake", pid=99)))
    wait(lambda: vm(env, "bad")["cooperative"])
    conn.close()


def test_daemon_survived_everything(env) -> None:
    with env["daemon"].client() as c:
        st = c.get("/v1/status")
    assert st["vms"] == 2
    assert env["daemon"].proc.poll() is None
    assert "Traceback" not in env["daemon"].log_tail(500)
