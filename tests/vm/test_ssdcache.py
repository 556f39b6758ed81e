"""The elastic SSD end to end on one real guest: a real ``symbiontd``, its NBD server on a loop
device, the disk hot-plugged through libvirt (QEMU's NBD client), the real guest agent and its
cache in front of a slow (iotune-throttled) virtual disk. What the guest sees is read over the
serial console, independently of the agent.

One VM (the host is shared): "another VM" reading a reallocated block is a second elastic disk,
with its own export and QEMU NBD connection, hot-plugged into the same guest.
"""

from __future__ import annotations

import signal
import sqlite3
import time

import libvirt
import pytest

from symbiont.config import load_config
from symbiont.lab.console import guest_exec
from symbiont.lab.session import LabSession
from symbiont.lab.vms import lab_vm
from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.pool import loop_devices_of

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]

SLOW_LINES = 32
DEV = 'dev() { for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && echo /dev/${d##*/}; done; }; '


@pytest.fixture(scope="module")
def lab(libvirtd, tmp_path_factory):
    work = tmp_path_factory.mktemp("cachelab")
    with LabSession(count=1, prefix="symbiont-cache-", period_s=1.0, memory_mib=512, max_vcpus=2,
                    work_dir=work, daemon_overrides={"control": {"agent_timeout_s": 3.0}}) as s:
        name = s.names[0]
        pool_file = work / "pool.img"
        try:
            with s.client() as c:
                c.post("/v1/ssdcache/pool", {"file": str(pool_file), "size_mib": 48})
                c.post("/v1/ssdcache/caches", {"vm": name, "size_mib": 32, "current_mib": 8, "persist": True})
                c.post(f"/v1/ssdcache/caches/{name}/attach", {"target_dev": "vdb"})
            # The slow disk: an HDD stand-in, throttled by libvirt; line i holds byte i % 251 + 1.
            vmdir = lab_vm(load_config(None, {"lab": {"vm_prefix": s.prefix}}), name).dir
            slow = vmdir / "slow.img"
            with open(slow, "wb") as fh:
                for line in range(SLOW_LINES):
                    fh.write(bytes([line % 251 + 1]) * BLOCK_SIZE)
            xml = (f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
                   f"<source file='{slow}'/><target dev='vdc' bus='virtio'/><serial>symbiont-slow</serial>"
                   "<iotune><read_bytes_sec>8388608</read_bytes_sec><read_iops_sec>200</read_iops_sec></iotune>"
                   "</disk>")
            s.host.domain(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            yield s
        finally:
            if s.daemon is not None and s.daemon.proc is not None:
                with s.client() as c:
                    for v in c.get("/v1/ssdcache/caches"):
                        c.delete(f"/v1/ssdcache/caches/{v['vm']}")
                    c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})
    assert not pool_file.exists() or loop_devices_of(pool_file) == []


def cache(lab: LabSession, vm: str | None = None) -> dict:
    with lab.client() as c:
        return c.get(f"/v1/ssdcache/caches/{vm or lab.names[0]}")


def mapping(lab: LabSession, vm: str) -> dict[int, int]:
    db = sqlite3.connect(lab.daemon.cfg.db_path)
    try:
        return dict(db.execute("SELECT lbn, pbn FROM ssd_blocks WHERE vm = ?", (vm,)).fetchall())
    finally:
        db.close()


def vm_view(lab: LabSession) -> dict:
    with lab.client() as c:
        return c.get(f"/v1/vms/{lab.names[0]}")


def sh(lab: LabSession, cmd: str, timeout: float = 60) -> tuple[int, str]:
    r = guest_exec(lab.host, lab.names[0], DEV + cmd, timeout=timeout)
    return r.rc, r.output


def guest_ready(lab: LabSession) -> dict:
    """The agent acknowledged the latest config and found the disks."""
    v = cache(lab)
    st = v["guest"]["status"] or {}
    return v if v["guest"]["acked_epoch"] == v["epoch"] and st.get("device") and st.get("slow_device") else {}


def test_guest_reads_back_what_it_wrote(lab: LabSession) -> None:
    lab.wait_for(lambda: guest_ready(lab), 90, "the agent configured with both disks")
    rc, out = sh(lab, "D=$(dev symbiont-cache); yes SYMBIONT | head -c 2097152 > /tmp/p; "
                      "dd if=/tmp/p of=$D bs=1M seek=4 count=2 oflag=direct conv=fsync status=none && "
                      "dd if=$D bs=1M skip=4 count=2 iflag=direct status=none | cmp - /tmp/p && echo SAME")
    assert rc == 0 and "SAME" in out, out
    # On the host: lbn 4 is where the map says, on the loop device.
    pbn = mapping(lab, lab.names[0])[4]
    dev = loop_devices_of(lab.work_dir / "pool.img")[0]
    with open(dev, "rb") as fh:
        fh.seek(pbn * BLOCK_SIZE)
        assert fh.read(4096) == (b"SYMBIONT\n" * 500)[:4096]


def test_unbacked_block_is_an_io_error_in_the_guest(lab: LabSession) -> None:
    before = cache(lab)["io"]["unbacked_errors"]
    rc, out = sh(lab, "dd if=$(dev symbiont-cache) of=/dev/null bs=1M skip=20 count=1 iflag=direct")
    assert rc != 0 and "Input/output error" in out, out
    assert cache(lab)["io"]["unbacked_errors"] > before


def test_a_reallocated_block_reads_as_zeros_for_another_disk(lab: LabSession) -> None:
    name = lab.names[0]
    other = f"{name}-other"
    own_before = mapping(lab, name)
    with lab.client() as c:
        c.post("/v1/ssdcache/caches", {"vm": other, "size_mib": 8, "current_mib": 0})
        xml = c.get(f"/v1/ssdcache/caches/{other}/disk-xml", target_dev="vdd", serial="symbiont-other")["xml"]
        lab.host.domain(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        r = c.put(f"/v1/ssdcache/caches/{name}/size", {"current_mib": 0})
        assert r["current_mib"] == 0 and r["chosen_by"] == "guest", r
        c.put(f"/v1/ssdcache/caches/{other}/size", {"current_mib": 8})
    got = mapping(lab, other)
    assert own_before[4] in got.values() and own_before[5] in got.values()  # the blocks with our data
    rc, out = sh(lab, "O=$(dev symbiont-other); sleep 1; dd if=$O bs=1M count=8 iflag=direct status=none "
                      "| tr -d '\\000' | wc -c")
    assert rc == 0 and out.strip().splitlines()[-1] == "0", out
    with lab.client() as c:
        c.put(f"/v1/ssdcache/caches/{other}/size", {"current_mib": 0})
        r = c.put(f"/v1/ssdcache/caches/{name}/size", {"current_mib": 8})
    assert r["current_mib"] == 8


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


def test_persistent_cache_survives_kill_9_of_the_daemon(lab: LabSession) -> None:
    name = lab.names[0]
    lbn = cache(lab)["backed"][0][0]
    # libvirt 9.0 cannot give QEMU's NBD client a reconnect delay: it reconnects on the guest's
    # next requests, and the first ones after the restart may fail; the guest retries.
    cmd = (f"for i in $(seq 10); do dd if=$(dev symbiont-cache) of=/tmp/h bs=1M skip={lbn} count=1 "
           "iflag=direct status=none && break; sleep 1; done; sha256sum /tmp/h")
    rc, before = sh(lab, cmd)
    assert rc == 0
    m = mapping(lab, name)
    assert lab.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    lab.daemon.start()
    assert mapping(lab, name) == m
    rc, after = sh(lab, "rm -f /tmp/h; " + cmd)
    assert rc == 0 and after.strip().splitlines()[-1].split()[0] == before.strip().splitlines()[-1].split()[0], (
        before, after)
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
