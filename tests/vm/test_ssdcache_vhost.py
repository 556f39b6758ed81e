"""The elastic SSD over vhost-user-blk on a real guest: a real ``symbiontd`` serving the export
from its C backend (``native/vhostblk.c``), the disk hot-plugged over QMP (``chardev-add`` with
``reconnect``, ``device_add vhost-user-blk-pci``: libvirt 9.0 drops a hot-plugged vhostuser
disk's ``<reconnect>``) into a VM whose RAM is a shared memfd, the real guest agent finding it by
the serial our backend answers (libvirt takes no ``<serial>`` for such disks).

Checked from inside the guest (serial console) and on the host: data lands where the block map
says; an unbacked block is an I/O error in the guest; a deflate chosen by the guest commits
under the same lock as NBD; after kill -9 of the daemon, the restarted one serves the disk
again from sqlite, QEMU reconnects by itself, and the requests that were in flight are
resubmitted: the guest's read/write loop across the kill sees no error and no wrong byte.
"""

from __future__ import annotations

import signal

import pytest

from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.pool import loop_devices_of
from symbiont_research.lab.session import LabSession
from tests.vm.ssdlab import cache, drop_caches_and_pool, mapping, pool_path, sh

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]



@pytest.fixture(scope="module")
def lab(libvirtd, tmp_path_factory):
    work = tmp_path_factory.mktemp("vhostlab")
    with LabSession(count=1, prefix="symbiont-vhost-", period_s=1.0, memory_mib=384, max_vcpus=1,
                    shared_memory=True, work_dir=work) as s:  # fmt: skip
        name = s.names[0]
        try:
            with s.client() as c:
                c.post("/v1/ssdcache/pool", {"file": "pool.img", "size_mib": 24})
                c.post("/v1/ssdcache/caches", {"vm": name, "size_mib": 16, "current_mib": 8, "persist": True})
                r = c.post(f"/v1/ssdcache/caches/{name}/attach", {"target_dev": "vdb", "transport": "vhost-user"})
                assert r["transport"] == "vhost-user" and r["qmp_node"] == "symbiont-vhu-vdb", r
            yield s
        finally:
            drop_caches_and_pool(s)


def test_the_guest_writes_and_reads_through_vhost_user(lab: LabSession) -> None:
    v = lab.wait_for(lambda: (c := cache(lab))["guest"]["acked_epoch"] == c["epoch"]
                     and (c["guest"]["status"] or {}).get("device") and c, 90,
                     "the agent found its disk by the serial the backend answers")  # fmt: skip
    lbn = v["backed"][0][0]
    rc, out = sh(lab, f"D=$(dev symbiont-cache); yes VHOSTUSER | head -c 1048576 > /tmp/p; "
                      f"dd if=/tmp/p of=$D bs=1M seek={lbn} count=1 oflag=direct conv=fsync status=none && "
                      f"dd if=$D bs=1M skip={lbn} count=1 iflag=direct status=none | cmp - /tmp/p && echo SAME")  # fmt: skip
    assert rc == 0 and "SAME" in out, out
    dev = loop_devices_of(pool_path(lab))[0]
    with open(dev, "rb") as fh:
        fh.seek(mapping(lab, lab.names[0])[lbn] * BLOCK_SIZE)
        assert fh.read(4096) == (b"VHOSTUSER\n" * 500)[:4096]
    io = cache(lab)["io"]
    assert io["writes"] >= 1 and io["reads"] >= 1, io


def test_unbacked_block_is_an_io_error_and_a_deflate_commits(lab: LabSession) -> None:
    unbacked = next(i for i in range(16) if i not in mapping(lab, lab.names[0]))
    before = cache(lab)["io"]["unbacked_errors"]
    rc, out = sh(lab, f"dd if=$(dev symbiont-cache) of=/dev/null bs=1M skip={unbacked} count=1 iflag=direct")
    assert rc != 0 and "Input/output error" in out, out
    assert cache(lab)["io"]["unbacked_errors"] > before
    with lab.client() as c:
        r = c.put(f"/v1/ssdcache/caches/{lab.names[0]}/size", {"current_mib": 4})
    assert r["current_mib"] == 4 and len(r["lbns"]) == 4, r
    gone = r["lbns"][0]
    rc, out = sh(lab, f"dd if=$(dev symbiont-cache) of=/dev/null bs=1M skip={gone} count=1 iflag=direct")
    assert rc != 0 and "Input/output error" in out, out


def test_kill_9_of_the_daemon_under_guest_io_loses_no_request(lab: LabSession) -> None:
    """The guest writes and reads its disk in a loop while the daemon is killed with -9 and
    started again: QEMU reconnects, the new backend resubmits what was in flight (the inflight
    region QEMU kept), and the guest sees neither an error nor a wrong byte."""
    lbn = min(mapping(lab, lab.names[0]))
    loop = (f"D=$(dev symbiont-cache); head -c 1048576 /dev/urandom > /tmp/r; ( for i in $(seq 60); do "
            f"dd if=/tmp/r of=$D bs=64k seek={lbn * 16} count=16 oflag=direct status=none || echo FAIL; "
            f"dd if=$D of=/tmp/b bs=64k skip={lbn * 16} count=16 iflag=direct status=none || echo FAIL; "
            "cmp -s /tmp/r /tmp/b || echo DIFF; done; echo DONE ) > /tmp/loop.log 2>&1 &")  # fmt: skip
    assert sh(lab, loop)[0] == 0
    lab.wait_for(lambda: cache(lab)["io"]["writes"] > 20, 30, "the guest's loop under way")
    assert lab.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    lab.daemon.start()

    def finished() -> str:
        out = sh(lab, "cat /tmp/loop.log")[1]
        return out if "DONE" in out else ""

    out = lab.wait_for(finished, 120, "the guest's loop to finish")
    assert "FAIL" not in out and "DIFF" not in out, out
    io = cache(lab)["io"]
    assert io["writes"] >= 1 and io["io_errors"] == 0, io  # the new daemon's backend served the rest
