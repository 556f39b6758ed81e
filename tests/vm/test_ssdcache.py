"""The elastic SSD end to end on real guests: a real ``symbiontd``, its NBD server on a loop
device, the disk hot-plugged through libvirt (QEMU's NBD client), the real guest agent and its
cache in front of a slow (iotune-throttled) virtual disk. What the guest sees is read over the
serial console, independently of the agent.

Two VMs share one pool: A has the cache in front of its slow disk; B has only an elastic disk,
so that a block A gives up can be handed to B and read by B's guest (zeroing across VMs). B also
runs DoubleDecker's VM level with producers in containers, and a second, QMP-attached view of
its elastic disk with QEMU's NBD reconnect-delay (daemon kill -9 transparent to the guest).
"""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import libvirt
import pytest

from symbiont.config import load_config
from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.pool import loop_devices_of
from symbiont_research.lab.session import LabSession
from symbiont_research.lab.vms import lab_vm
from tests.vm.ssdlab import DEV, cache, drop_caches_and_pool, mapping, pool_path, sh

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]

SLOW_LINES = 32


@pytest.fixture(scope="module")
def lab(libvirtd, tmp_path_factory):
    work = tmp_path_factory.mktemp("cachelab")
    with LabSession(
        count=2,
        prefix="symbiont-cache-",
        period_s=1.0,
        memory_mib=384,
        max_vcpus=2,
        work_dir=work,
        daemon_overrides={"control": {"agent_timeout_s": 3.0}},
    ) as s:
        name, other = s.names
        pool_file = work / "state" / "ssdcache-pools" / "pool.img"  # the default ssdcache.pool_dir
        try:
            with s.client() as c:
                pool_file = Path(c.post("/v1/ssdcache/pool", {"file": "pool.img", "size_mib": 48})["path"])
                c.post("/v1/ssdcache/caches", {"vm": name, "size_mib": 32, "current_mib": 8, "persist": True})
                c.post(f"/v1/ssdcache/caches/{name}/attach", {"target_dev": "vdb"})
                # VM B: an elastic disk with nothing backed yet (it receives blocks A gives up).
                c.post("/v1/ssdcache/caches", {"vm": other, "size_mib": 8, "current_mib": 0, "persist": True})
                c.post(f"/v1/ssdcache/caches/{other}/attach", {"target_dev": "vdb"})
            # The slow disk: an HDD stand-in, throttled by libvirt; line i holds byte i % 251 + 1.
            vmdir = lab_vm(load_config(None, {"lab": {"vm_prefix": s.prefix}}), name).dir
            slow = vmdir / "slow.img"
            with open(slow, "wb") as fh:
                for line in range(SLOW_LINES):
                    fh.write(bytes([line % 251 + 1]) * BLOCK_SIZE)
            xml = (
                f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
                f"<source file='{slow}'/><target dev='vdc' bus='virtio'/><serial>symbiont-slow</serial>"
                "<iotune><read_bytes_sec>8388608</read_bytes_sec><read_iops_sec>200</read_iops_sec></iotune>"
                "</disk>"
            )
            s.host.domain(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            yield s
        finally:
            drop_caches_and_pool(s)
    assert not pool_file.exists() or loop_devices_of(pool_file) == []


def vm_view(lab: LabSession) -> dict:
    with lab.client() as c:
        return c.get(f"/v1/vms/{lab.names[0]}")


def guest_ready(lab: LabSession) -> dict:
    """The agent acknowledged the latest config and found the disks."""
    v = cache(lab)
    st = v["guest"]["status"] or {}
    return v if v["guest"]["acked_epoch"] == v["epoch"] and st.get("device") and st.get("slow_device") else {}


def test_guest_reads_back_what_it_wrote(lab: LabSession) -> None:
    lab.wait_for(lambda: guest_ready(lab), 90, "the agent configured with both disks")
    rc, out = sh(
        lab,
        "D=$(dev symbiont-cache); yes SYMBIONT | head -c 2097152 > /tmp/p; "
        "dd if=/tmp/p of=$D bs=1M seek=4 count=2 oflag=direct conv=fsync status=none && "
        "dd if=$D bs=1M skip=4 count=2 iflag=direct status=none | cmp - /tmp/p && echo SAME",
    )
    assert rc == 0 and "SAME" in out, out
    # On the host: lbn 4 is where the map says, on the loop device.
    pbn = mapping(lab, lab.names[0])[4]
    dev = loop_devices_of(pool_path(lab))[0]
    with open(dev, "rb") as fh:
        fh.seek(pbn * BLOCK_SIZE)
        assert fh.read(4096) == (b"SYMBIONT\n" * 500)[:4096]


def test_unbacked_block_is_an_io_error_in_the_guest(lab: LabSession) -> None:
    before = cache(lab)["io"]["unbacked_errors"]
    rc, out = sh(lab, "dd if=$(dev symbiont-cache) of=/dev/null bs=1M skip=20 count=1 iflag=direct")
    assert rc != 0 and "Input/output error" in out, out
    io = cache(lab)["io"]
    assert io["unbacked_errors"] > before
    # The guest's QEMU is served by the C data path (nbdfast), which refused the request.
    assert io["native_clients"] >= 1, io


def pool_block(lab: LabSession, pbn: int) -> bytes:
    """Physical block ``pbn`` as it is on the loop device (the host's view)."""
    dev = loop_devices_of(pool_path(lab))[0]
    with open(dev, "rb") as fh:
        fh.seek(pbn * BLOCK_SIZE)
        return fh.read(BLOCK_SIZE)


def test_a_block_freed_by_one_vm_reads_as_zeros_in_another_vm(lab: LabSession) -> None:
    a, b = lab.names
    lab.wait_for(lambda: guest_ready(lab), 90, "VM A's agent configured")
    # VM A writes a pattern into its logical block 6, through its elastic disk.
    rc, out = sh(
        lab,
        "yes SYMBIONT-VM-A | head -c 1048576 > /tmp/a; dd if=/tmp/a of=$(dev symbiont-cache) "
        "bs=1M seek=6 count=1 oflag=direct conv=fsync status=none && echo WROTE",
    )
    assert rc == 0 and "WROTE" in out, out
    pbn = mapping(lab, a)[6]
    assert pool_block(lab, pbn).startswith(b"SYMBIONT-VM-A\n" * 8)  # A's data is on that physical block
    with lab.client() as c:
        r = c.put(f"/v1/ssdcache/caches/{a}/size", {"current_mib": 0})  # A's cache deflates
        assert r["current_mib"] == 0 and r["chosen_by"] == "guest", r
        assert pbn not in mapping(lab, a).values()
        r = c.put(f"/v1/ssdcache/caches/{b}/size", {"current_mib": 8})  # B's cache inflates
        assert r["current_mib"] == 8, r
    got = {p: lbn for lbn, p in mapping(lab, b).items()}
    assert pbn in got, f"B did not receive A's block {pbn}: {got}"
    # B's guest reads that block through its own elastic disk (its own QEMU NBD connection):
    # zeros, never A's pattern; and nowhere on B's disk is there a trace of A's data.
    rc, out = sh(
        lab,
        f"D=$(dev symbiont-cache); dd if=$D bs=1M skip={got[pbn]} count=1 iflag=direct "
        "status=none > /tmp/blk && echo READ $(tr -d '\\000' < /tmp/blk | wc -c) "
        "$(dd if=$D bs=1M count=8 iflag=direct status=none | grep -c SYMBIONT-VM-A)",
        vm=b,
    )
    assert rc == 0, out
    assert out.strip().splitlines()[-1] == "READ 0 0", out
    with lab.client() as c:
        assert c.put(f"/v1/ssdcache/caches/{b}/size", {"current_mib": 0})["current_mib"] == 0
        assert c.put(f"/v1/ssdcache/caches/{a}/size", {"current_mib": 8})["current_mib"] == 8


def producer(seed: int) -> list[str]:
    return ["/usr/bin/env", "PYTHONPATH=/opt/symbiont-agent", "/usr/bin/python3", "-m", "symbiont_agent.ops_ssdcache",
            "dd-producer", "--pages", "2048", "--local", "64", "--rate", "40", "--seed", str(seed)]  # fmt: skip


def test_containers_in_a_guest_fill_their_doubledecker_partitions(lab: LabSession) -> None:
    """DoubleDecker's VM level for real: producers in three containers of VM B put their evicted
    pages into B's share (memory tier in guest RAM, SSD tier on B's elastic SSD) and get them back;
    the agent accounts occupancy per container by cgroup and keeps each within its quota."""
    b = lab.names[1]
    with lab.client() as c:
        c.put(f"/v1/ssdcache/caches/{b}/size", {"current_mib": 2})  # room for the SSD tier's 512 pages
        c.put("/v1/ssdcache/twolevel", {"mem_mib": 2, "ssd_mib": 2})
        c.put(f"/v1/ssdcache/twolevel/vms/{b}", {"mem": 100, "ssd": 100})
        for ct, tier, w in (("C1", "mem", 60), ("C2", "mem", 40), ("C3", "ssd", 100)):
            c.put(f"/v1/ssdcache/twolevel/vms/{b}/containers/{ct}", {"type": tier, "weight": w})
        for i, ct in enumerate(("C1", "C2", "C3")):
            c.post(f"/v1/cpu/vms/{b}/containers", {"name": ct, "command": producer(i + 1)})

    def guest() -> dict:
        with lab.client() as c:
            return c.get(f"/v1/ssdcache/twolevel/vms/{b}/guest")

    def full() -> dict:
        g = guest()
        cs = g["containers"]
        ok = all(cs.get(ct, {}).get("used", {}).get(t) == cs.get(ct, {}).get("quota", {}).get(t)
                 for ct, t in (("C1", "mem"), ("C2", "mem"), ("C3", "ssd")))  # fmt: skip
        return g if ok and all(cs[ct]["hits"] > 0 for ct in cs) else {}

    try:
        g = lab.wait_for(full, 150, "every container's partition full, with hits")
        cs = g["containers"]
        assert g["share"] == {"mem": 512, "ssd": 512} and g["ssd_capacity"] >= 512
        assert cs["C1"]["quota"] == {"mem": 307, "ssd": 0} and cs["C2"]["quota"] == {"mem": 205, "ssd": 0}
        assert cs["C3"]["quota"] == {"mem": 0, "ssd": 512} and cs["C3"]["used"]["mem"] == 0
        assert g["clients"] == 3 and g["ssd_errors"] == 0
        # A process outside any container is refused (the store knows callers by their cgroup).
        rc, out = sh(
            lab,
            'python3 -c "import socket; s=socket.socket(socket.AF_UNIX); '
            "s.connect('/run/symbiont-agent/doubledecker.sock'); "
            "print('GOT', len(s.recv(8)))\"",
            vm=b,
        )  # closed at once: recv gets nothing
        assert "GOT 0" in out, out
        assert guest()["refused"] >= 1
        # Run-time change: C3 moves to the memory tier; its SSD pages go at once.
        with lab.client() as c:
            c.put(f"/v1/ssdcache/twolevel/vms/{b}/containers/C3", {"type": "mem", "weight": 100})
        cs = lab.wait_for(
            lambda: (g := guest()["containers"])["C3"]["quota"]["mem"] > 0 and g, 30, "C3 moved"
        )
        assert cs["C3"]["quota"]["ssd"] == 0 and cs["C3"]["used"]["ssd"] == 0
        assert cs["C1"]["quota"]["mem"] + cs["C2"]["quota"]["mem"] + cs["C3"]["quota"]["mem"] == 512

        # The producers check every page they get back against what they put.
        def reports() -> dict:
            with lab.client() as c:
                t = {ct: c.get(f"/v1/cpu/vms/{b}/containers/{ct}/logs")["tail"] for ct in ("C1", "C2", "C3")}
            return t if all("mismatches" in v for v in t.values()) else {}

        for ct, t in lab.wait_for(reports, 30, "the producers' reports").items():
            assert "mismatches 0" in t.strip().splitlines()[-1], (ct, t)
    finally:
        with lab.client() as c:
            for ct in ("C1", "C2", "C3"):
                c.call("DELETE", f"/v1/cpu/vms/{b}/containers/{ct}")
            c.put("/v1/ssdcache/twolevel", {"mem_mib": 0, "ssd_mib": 0})  # the SSD tier's pool blocks back
            c.put(f"/v1/ssdcache/caches/{b}/size", {"current_mib": 0})


def workload(lab: LabSession, action: str, **kw) -> dict:
    with lab.client() as c:
        return c.post(f"/v1/ssdcache/caches/{lab.names[0]}/guest-workload", {"action": action, **kw})


def status(lab: LabSession) -> dict:
    return cache(lab)["guest"]["status"] or {}


def test_deflate_with_a_cooperative_guest_keeps_its_cache_correct(lab: LabSession) -> None:
    lab.wait_for(lambda: guest_ready(lab), 30, "the agent acknowledged the re-inflation")
    workload(lab, "start", working_set_mib=12, seconds=600, verify=True)
    lab.wait_for(lambda: status(lab).get("cached_blocks", 0) >= 8, 60, "the guest cache filled its 8 blocks")
    with lab.client() as c:
        r = c.put(f"/v1/ssdcache/caches/{lab.names[0]}/size", {"current_mib": 4})
    assert r["chosen_by"] == "guest" and r["current_mib"] == 4 and len(r["lbns"]) == 4, r
    ops = status(lab)["workload_ops"]
    lab.wait_for(lambda: status(lab).get("workload_ops", 0) > ops + 20, 60, "the workload going on")
    st = status(lab)
    assert st["backed_blocks"] == 4 and st["cached_blocks"] <= 4
    assert st["workload_mismatches"] == 0 and st["workload_errors"] == 0 and st["eio"] == 0, st
    assert st["hits"] > 0


def test_deflate_with_a_silent_guest_host_chooses_and_tells_it_later(lab: LabSession) -> None:
    name = lab.names[0]
    rc, out = sh(lab, "systemctl stop symbiont-agent && ! pgrep -f symbiont_agent && echo STOPPED")
    assert "STOPPED" in out, out
    lab.wait_for(lambda: not vm_view(lab)["cooperative"], 30, "agent seen gone")
    with lab.client() as c:
        r = c.put(f"/v1/ssdcache/caches/{name}/size", {"current_mib": 2})
    assert r["chosen_by"] == "host" and r["current_mib"] == 2 and not r["guest_told"], r
    assert cache(lab)["revoked"], "the host's picks await the guest's acknowledgement"
    sh(lab, "systemctl start symbiont-agent")
    lab.wait_for(lambda: guest_ready(lab) and not cache(lab)["revoked"], 60, "the guest acknowledged")
    with lab.client() as c:
        assert c.put(f"/v1/ssdcache/caches/{name}/size", {"current_mib": 8})["current_mib"] == 8
    lab.wait_for(lambda: guest_ready(lab), 30, "the guest knows about the new blocks")
    workload(lab, "start", working_set_mib=12, seconds=600, verify=True)
    lab.wait_for(lambda: status(lab).get("workload_ops", 0) > 50, 60, "the workload after the restart")
    st = status(lab)
    assert st["workload_mismatches"] == 0 and st["workload_errors"] == 0, st
    workload(lab, "stop")


def test_kill_9_of_the_daemon_is_transparent_with_reconnect_delay(lab: LabSession) -> None:
    """libvirt 9.0 drops an NBD <reconnect delay>; attached over QMP with QEMU's reconnect-delay,
    B's elastic disk rides out a kill -9 + restart of the daemon: the guest's reads just wait.
    The same reads through B's libvirt-attached disk (no delay) fail meanwhile, which shows that
    the loop really ran across the daemon's absence."""
    b = lab.names[1]
    with lab.client() as c:
        c.put(f"/v1/ssdcache/caches/{b}/size", {"current_mib": 1})
        r = c.post(f"/v1/ssdcache/caches/{b}/attach", {"target_dev": "vdd", "serial": "symbiont-rc",
                                                       "reconnect_delay_s": 30})  # fmt: skip
    assert r["qmp_node"] == "symbiont-nbd-vdd", r
    # The plain disk first: while the daemon is down it fails at once, the other one waits.
    script = DEV + (
        'for i in $(seq 30); do R=$(dev symbiont-rc); [ -n "$R" ] && break; sleep 1; done\n'
        'P=$(dev symbiont-cache); [ -b "$R" ] && [ -b "$P" ] || { echo NODISK; exit 3; }\n'
        "end=$(($(date +%s)+40)); while [ $(date +%s) -lt $end ]; do\n"
        "  if dd if=$P of=/dev/null bs=4k count=1 iflag=direct status=none; then echo p-ok; else echo p-err; fi\n"
        "  if dd if=$R of=/dev/null bs=4k count=1 iflag=direct status=none; then echo rc-ok; else echo rc-err; fi\n"
        "  sleep 0.2\ndone\necho DONE\n"
    )
    b64 = base64.b64encode(script.encode()).decode()
    rc, out = sh(
        lab,
        f"echo {b64} | base64 -d > /tmp/rc.sh; : > /tmp/rc.log; "
        "setsid bash /tmp/rc.sh >> /tmp/rc.log 2>/dev/null < /dev/null & echo STARTED",
        vm=b,
    )
    assert "STARTED" in out, out

    def log() -> str:
        return sh(lab, "cat /tmp/rc.log", vm=b)[1]

    lab.wait_for(lambda: log().count("rc-ok") >= 3, 60, "reads going on")
    assert lab.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(2)
    lab.daemon.start()

    def done() -> str:
        t = log()
        return t if "DONE" in t else ""

    out = lab.wait_for(done, 60, "the guest loop's end")
    n_ok, n_err, p_err = out.count("rc-ok"), out.count("rc-err"), out.count("p-err")
    print(f"reconnect-delay disk: {n_ok} reads ok, {n_err} failed; libvirt disk: {p_err} failed")
    assert p_err >= 1, out  # the daemon was down while the loop ran
    assert n_err == 0 and n_ok >= 10, (n_ok, n_err, out)
    with lab.client() as c:
        assert c.post(f"/v1/ssdcache/caches/{b}/detach", {"target_dev": "vdd", "reconnect_delay_s": 30})
        c.put(f"/v1/ssdcache/caches/{b}/size", {"current_mib": 0})
    lab.wait_for(lambda: vm_view(lab)["cooperative"], 60, "A's agent link back")


def test_persistent_cache_survives_kill_9_of_the_daemon(lab: LabSession) -> None:
    name = lab.names[0]
    lbn = cache(lab)["backed"][0][0]
    # libvirt 9.0 cannot give QEMU's NBD client a reconnect delay: it reconnects on the guest's
    # next requests, and the first ones after the restart may fail; the guest retries.
    cmd = (
        f"for i in $(seq 10); do dd if=$(dev symbiont-cache) of=/tmp/h bs=1M skip={lbn} count=1 "
        "iflag=direct status=none && break; sleep 1; done; sha256sum /tmp/h"
    )
    rc, before = sh(lab, cmd)
    assert rc == 0
    m = mapping(lab, name)
    assert lab.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    lab.daemon.start()
    assert mapping(lab, name) == m
    rc, after = sh(lab, "rm -f /tmp/h; " + cmd)
    assert (
        rc == 0 and after.strip().splitlines()[-1].split()[0] == before.strip().splitlines()[-1].split()[0]
    ), (before, after)
    lab.wait_for(lambda: vm_view(lab)["cooperative"], 60, "agent link back")
    lab.wait_for(lambda: guest_ready(lab), 60, "the guest re-configured by the new daemon")


def test_non_persistent_cache_is_freed_when_its_vm_stops(lab: LabSession) -> None:
    name = lab.names[0]
    with lab.client() as c:
        c.call("PATCH", f"/v1/ssdcache/caches/{name}", json={"persist": False})
        free_before = c.get("/v1/ssdcache/pool")["blocks"]["free"]
    time.sleep(2.5)  # a period or two with the VM running, so the daemon has seen it run
    lab.host.domain(name).destroy()
    lab.wait_for(lambda: cache(lab)["current_mib"] == 0, 30, "blocks freed on VM stop")
    with lab.client() as c:
        assert c.get("/v1/ssdcache/pool")["blocks"]["free"] == free_before + 8
        actions = [d["action"] for d in c.get("/v1/decisions", vm=name, limit=50)]
    assert "free-on-stop" in actions
