"""End to end on real guests: two VMs booted from the golden image under libvirt, a real
``symbiontd``, the real guest agent. What the guest sees is also read over the serial
console, independently of the agent.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import httpx
import pytest
from click.testing import CliRunner

from symbiont.cli import cli
from symbiont.client import ApiError
from symbiont.config import load_config
from symbiont_research.lab import vms as lab_vms
from symbiont_research.lab.console import guest_exec
from symbiont_research.lab.session import LabSession

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]


@pytest.fixture(scope="module")
def lab(libvirtd, tmp_path_factory):
    # The work dir (daemon log, config, sqlite) is kept by pytest for post-mortems.
    # No fixed prefix: <lab.vm_prefix>test-<run id>-N, so two runs on one host never collide.
    with LabSession(count=2, tag="test", period_s=1.0, memory_mib=512, max_vcpus=4,
                    work_dir=tmp_path_factory.mktemp("lab"),
                    daemon_overrides={"control": {"agent_timeout_s": 3.0},
                                      "gpu": {"enabled": True, "backend": "simulated"}}) as s:
        yield s


def vm(lab: LabSession, name: str) -> dict:
    with lab.client() as c:
        return c.get(f"/v1/vms/{name}")


def samples(lab: LabSession, name: str | None = None) -> int:
    db = sqlite3.connect(lab.daemon.cfg.db_path)
    try:
        if name is None:
            return db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM samples WHERE vm = ? AND source = 'agent'", (name,)).fetchone()[0]
    finally:
        db.close()


def test_agent_handshake_and_stats_reach_sqlite(lab: LabSession) -> None:
    for name in lab.names:
        lab.wait_for(lambda n=name: vm(lab, n)["cooperative"], 60, f"{name} cooperative")
        v = vm(lab, name)
        assert v["agent"]["handshakes"] >= 1
        assert {"ping", "stats", "online-cpus"} <= set(v["agent"]["hello"]["caps"])
        lab.wait_for(lambda n=name: samples(lab, n) >= 2, 30, f"{name} samples in sqlite")
    db = sqlite3.connect(lab.daemon.cfg.db_path)
    (data,) = db.execute(
        "SELECT data FROM samples WHERE vm = ? AND source = 'agent' ORDER BY ts DESC LIMIT 1", (lab.names[0],)
    ).fetchone()
    stats = json.loads(data)
    assert 300 << 20 < stats["meminfo"]["MemTotal"] <= 512 << 20
    assert stats["cpus"]["count_online"] == 1


def test_balloon_target_changes_libvirt_actual_and_guest_memtotal(lab: LabSession) -> None:
    name = lab.names[0]
    before = lab.wait_for(lambda: vm(lab, name)["guest"]["mem_total_mib"], 30, "guest MemTotal")
    with lab.client() as c:
        r = c.put(f"/v1/vms/{name}/memory", {"target_mib": 256})
    assert r["target_mib"] == 256
    lab.wait_for(lambda: vm(lab, name)["balloon_actual_mib"] == 256, 60, "libvirt actual = 256 MiB")
    after = lab.wait_for(
        lambda: (m := vm(lab, name)["guest"]["mem_total_mib"]) and m < before - 200 and m, 60, "guest MemTotal drop"
    )
    assert after <= 256
    # The guest's own view, read over the serial console (not through the agent).
    out = guest_exec(lab.host, name, "grep MemTotal /proc/meminfo")
    kib = int(out.output.split()[1])
    assert kib // 1024 == after
    knobs = {k["knob"]: k for k in vm(lab, name)["knobs"]}
    assert knobs["balloon_mib"]["original"] == 512 and knobs["balloon_mib"]["current"] == 256


def test_vcpu_hotplug_raises_guest_online_cpus(lab: LabSession) -> None:
    name = lab.names[1]
    assert vm(lab, name)["guest"]["online_cpus"] == 1
    with lab.client() as c:
        r = c.put(f"/v1/vms/{name}/vcpus", {"count": 3})
    assert r["before"] == 1 and r["vcpus"] == 3
    lab.wait_for(lambda: vm(lab, name)["guest"]["online_cpus"] == 3, 60, "3 CPUs online in the guest")
    assert vm(lab, name)["vcpus"] == 3
    assert guest_exec(lab.host, name, "nproc").output.strip() == "3"
    # Scale down: the guest offlines (libvirt keeps the vCPU plugged; an offline vCPU halts).
    with lab.client() as c:
        r = c.put(f"/v1/vms/{name}/vcpus", {"count": 2})
    assert r["mechanism"] == "guest-offline" and r["guest"]["online"] == [0, 1]
    assert guest_exec(lab.host, name, "nproc").output.strip() == "2"
    lab.wait_for(lambda: vm(lab, name)["effective_vcpus"] == 2, 30, "effective vCPUs = 2")
    # ... and up again, onlining the offlined one.
    with lab.client() as c:
        c.put(f"/v1/vms/{name}/vcpus", {"count": 3})
    lab.wait_for(lambda: vm(lab, name)["guest"]["online_cpus"] == 3, 60, "3 CPUs online again")


def test_bad_input_is_4xx_with_a_reason_and_changes_nothing(lab: LabSession) -> None:
    name = lab.names[0]
    before = vm(lab, name)
    decisions_before = len(lab.client().get("/v1/decisions", limit=10000))
    sock = lab.daemon.cfg.socket
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://d") as h:
        r = h.put(f"/v1/vms/{name}/memory", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.text
        r = h.post("/v1/vms", json={"name": name, "memory": {"shares": -5}})
        assert r.status_code == 422 and "shares" in r.text
        r = h.post("/v1/vms", json={"name": "x", "surprise": 1})
        assert r.status_code == 422 and "surprise" in r.text
    with lab.client() as c:
        cases = [
            (lambda: c.put("/v1/vms/no-such-vm/memory", {"target_mib": 256}), 404, "not registered"),
            (lambda: c.put(f"/v1/vms/{name}/memory", {"target_mib": 100000}), 422, "outside this VM's range"),
            # Below the guest's floor (kernel reserve + used + margin, issue 16 item 12).
            (lambda: c.put(f"/v1/vms/{name}/memory", {"target_mib": 100}), 422, "below the safe floor"),
            (lambda: c.put(f"/v1/vms/{name}/vcpus", {"count": 64}), 422, "outside this VM's range"),
            (lambda: c.put(f"/v1/vms/{name}/vcpus", {"count": 0}), 422, "count"),
            (lambda: c.post("/v1/vms", {"name": "no-such-domain"}), 404, "no libvirt domain"),
            (lambda: c.post("/v1/vms", {"name": name}), 409, "already registered"),
            (lambda: c.post("/v1/vms", {"name": "../etc"}), 422, "name"),
            (lambda: c.delete("/v1/vms/no-such-vm"), 404, "not registered"),
            (lambda: c.get("/v1/vms/bad name"), 422, "name"),
        ]
        for call, status, reason in cases:
            with pytest.raises(ApiError) as ei:
                call()
            assert ei.value.status == status, (ei.value, status)
            assert reason in ei.value.detail, (ei.value.detail, reason)
        after = c.get(f"/v1/vms/{name}")
        assert [v["name"] for v in c.get("/v1/vms")] == lab.names
        assert len(c.get("/v1/decisions", limit=10000)) == decisions_before
    assert after["balloon_mib"] == before["balloon_mib"] and after["knobs"] == before["knobs"]
    assert after["policy"] == before["policy"]


def test_cli_tables_and_json(lab: LabSession) -> None:
    runner = CliRunner()
    sock = lab.daemon.cfg.socket
    r = runner.invoke(cli, ["--socket", sock, "vm", "list", "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(v["name"] for v in json.loads(r.output)) == lab.names
    r = runner.invoke(cli, ["--socket", sock, "status"])
    assert r.exit_code == 0 and lab.names[0] in r.output and "cooperative" in r.output
    r = runner.invoke(cli, ["--socket", sock, "vm", "memory", "no-such-vm", "300"])
    assert r.exit_code == 2 and "not registered" in r.output


def test_a_guest_application_uses_the_gpu_endpoint_over_its_channel(lab: LabSession) -> None:
    """Flyt from inside a VM: the daemon relays the VM's org.symbiont.gpu.0 port to its GPU
    endpoint, bound to the VM's client (simulated backend here)."""
    name, other = lab.names
    with lab.client() as c:
        c.put(f"/v1/gpu/clients/{name}", {"gpu": "sim0", "sm_share": 0.5, "mem_bytes": 64 << 20})
        c.put(f"/v1/gpu/clients/{other}", {"gpu": "sim0", "sm_share": 0.5, "mem_bytes": 64 << 20})

    def selftest() -> dict | None:
        r = guest_exec(lab.host, name, f"timeout 20 env PYTHONPATH=/opt/symbiont-agent python3 -m "
                                       f"symbiont_agent.gpu_client selftest --client {name} --mib 4")  # fmt: skip
        out = json.loads(r.output.strip().splitlines()[-1]) if r.output.strip() else {}
        return out if r.rc == 0 and "error" not in out else None

    out = lab.wait_for(selftest, 120, "the guest's GPU endpoint self-test", interval=3)
    assert out["roundtrip_ok"] is True and out["still_usable"] is True
    assert out["sm_share"] == 0.5 and out["kernel_s"] > 0
    assert out["forbidden"] == "forbidden"  # the channel speaks for this VM only
    assert out["over_quota"] and out["unknown_buffer"]  # refused, with a code
    assert out["mem_charged"] == 4 << 20 and out["mem_released"]  # counted against its own quota...
    with lab.client() as c:
        assert c.get(f"/v1/gpu/clients/{other}")["mem_used"] == 0  # ...not its neighbour's


def test_killed_agent_marks_vm_uncooperative_and_recovers(lab: LabSession) -> None:
    victim, other = lab.names
    assert vm(lab, victim)["cooperative"]
    # Stop the agent inside the guest (systemd would restart a plain kill at once).
    guest_exec(lab.host, victim, "systemctl stop symbiont-agent && ! pgrep -f symbiont_agent")
    lab.wait_for(lambda: not vm(lab, victim)["cooperative"], 60, "victim uncooperative")
    # The daemon keeps serving the other VM: its stats keep arriving.
    n = samples(lab, other)
    lab.wait_for(lambda: samples(lab, other) >= n + 2, 30, "other VM's stats keep flowing")
    assert vm(lab, other)["cooperative"]
    with lab.client() as c:
        assert c.get("/v1/status")["cooperative"] == 1
    guest_exec(lab.host, victim, "systemctl start symbiont-agent")
    lab.wait_for(lambda: vm(lab, victim)["cooperative"], 60, "victim cooperative again")
    n = samples(lab, victim)
    lab.wait_for(lambda: samples(lab, victim) > n, 30, "victim's stats flow again")


def test_daemon_restart_keeps_registrations_and_history(lab: LabSession) -> None:
    n_before = samples(lab)
    policies = {v["name"]: v["policy"] for v in lab.client().get("/v1/vms")}
    lab.daemon.stop(signal.SIGKILL)  # a crash: nothing gets to clean up
    lab.daemon.start()
    with lab.client() as c:
        assert {v["name"]: v["policy"] for v in c.get("/v1/vms")} == policies
        assert c.get("/v1/status")["samples"] >= n_before
        # The knob saved before the crash is still known, so it can still be restored.
        knobs = {k["knob"]: k for k in c.get(f"/v1/vms/{lab.names[0]}")["knobs"]}
        assert knobs["balloon_mib"]["original"] == 512
    for name in lab.names:
        lab.wait_for(lambda n=name: vm(lab, n)["cooperative"], 60, f"{name} reconnected after restart")
    lab.wait_for(lambda: samples(lab) > n_before + 2, 30, "new samples after restart")


def test_daemon_reconnects_after_a_vm_reboot(lab: LabSession) -> None:
    name = lab.names[1]
    before = vm(lab, name)["agent"]
    lab.host.domain(name).reset(0)  # the guest reboots at once; QEMU and the channel stay
    lab.wait_for(
        lambda: (a := vm(lab, name)["agent"])["hello"] and a["hello"]["boot_id"] != before["hello"]["boot_id"],
        180, "agent hello from the new boot",
    )
    after = vm(lab, name)
    assert after["agent"]["handshakes"] == before["handshakes"] + 1
    lab.wait_for(lambda: vm(lab, name)["cooperative"], 30, "cooperative after reboot")
    n = samples(lab, name)
    lab.wait_for(lambda: samples(lab, name) > n, 30, "stats after reboot")


def test_unregister_restores_the_balloon(lab: LabSession) -> None:
    name = lab.names[0]
    # still at the 256 MiB the balloon test set (libvirt's 'actual' may lag a moment under load)
    lab.wait_for(lambda: vm(lab, name)["balloon_mib"] == 256, 60, "the balloon at 256 MiB")
    with lab.client() as c:
        c.delete(f"/v1/vms/{name}")
        assert name not in [v["name"] for v in c.get("/v1/vms")]
    # The balloon deflates over the next moments; libvirt's 'actual' follows it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = lab.host.memory_stats(name)
        if stats.get("actual", 0) // 1024 == 512:
            break
        time.sleep(1)
    else:
        pytest.fail(f"balloon not restored: {lab.host.memory_stats(name)}")
    assert lab.host.info(name).memory_kib // 1024 == 512
    with lab.client() as c:
        c.post("/v1/vms", {"name": name, "memory": {"min_mib": 128}})


def test_lab_down_removes_only_lab_domains(lab: LabSession, tmp_path) -> None:
    import libvirt

    bystander = "symbiont-test-bystander"
    xml = f"""<domain type='qemu'><name>{bystander}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os></domain>"""
    dom = lab.host.conn.defineXML(xml)
    cfg = lab.daemon.cfg
    # A lab VM of another lab (another prefix) is not ours to remove either.
    other_cfg = load_config(None, {"lab": {"vm_prefix": "symbiont-otherlab-"}})
    other = lab_vms.create_vm(lab.host, other_cfg, lab.image, "symbiont-otherlab-1", start=False)
    # Nor is a domain of another run that uses the same prefix (issue 16 item 19).
    stranger = lab_vms.LabOwner.new_run()
    same_prefix = lab_vms.create_vm(lab.host, cfg, lab.image, lab.prefix + "9", start=False, owner=stranger)
    try:
        with pytest.raises(lab_vms.LabError, match="not created by"):
            lab_vms.remove_vm(lab.host, cfg, bystander, lab.owner)
        removed, kept = lab_vms.lab_down(lab.host, cfg, owner=lab.owner)
        assert set(lab.names) == set(removed)
        assert bystander not in removed and lab.host.exists(bystander)
        assert other.name not in removed and lab.host.exists(other.name)
        assert lab.host.exists(same_prefix.name) and any(f"belongs to run '{stranger.run}'" in k for k in kept)
        for name in lab.names:
            assert not lab.host.exists(name)
            assert not lab_vms.lab_vm(cfg, name).dir.exists()
    finally:
        lab_vms.remove_vm(lab.host, other_cfg, other.name)
        lab_vms.remove_vm(lab.host, cfg, same_prefix.name, stranger)
        try:
            dom.undefine()
        except libvirt.libvirtError:
            pass
