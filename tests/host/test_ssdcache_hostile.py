"""Hostile use of the elastic SSD cache's API (issue 16, items 3, 4, 5, 9, 16, 17), against a real
``symbiontd`` (subprocess), real loop devices, a real mounted ext4, a real swap area.

Each test is the attack of the issue's adversarial run, and checks that the host survives it:
a mounted (or partitioned-and-mounted, or swap) device is refused and its data intact; freeing
blocks punches holes instead of allocating the pool file; a pool file that vanished can still be
deleted; an adopted file reads as zeros; sizes and counts are bounded; an export opens only
with its VM's own secret name."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from symbiont.client import ApiError
from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.nbdclient import NbdClient
from tests.ssdcache_fixtures import ssdcache_daemon

pytestmark = [pytest.mark.root]

OLD = b"old tenant secret data!\n" * (4096 // 24) + b"X" * (4096 % 24)


def sh(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout.strip()


def du_kib(p: Path) -> int:
    return os.stat(p).st_blocks // 2


@pytest.fixture(scope="module")
def env(as_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssdhostile")
    pools = tmp / "pools"
    pools.mkdir()
    mnt = tmp / "mnt"
    mnt.mkdir()
    pmnt = tmp / "pmnt"
    pmnt.mkdir()
    loops: list[str] = []
    mounts: list[Path] = []
    swaps: list[str] = []

    def loop(name: str, size_mib: int, data: bytes | None = None) -> str:
        f = tmp / name
        with open(f, "wb") as fh:
            fh.truncate(size_mib << 20)
            if data:
                for off in range(0, size_mib << 20, BLOCK_SIZE):
                    fh.seek(off)
                    fh.write(data)
        dev = sh("losetup", "--find", "--show", str(f))
        loops.append(dev)
        return dev

    try:
        mounted = loop("fs.img", 64)
        sh("mkfs.ext4", "-q", "-F", mounted)
        sh("mount", mounted, str(mnt))
        mounts.append(mnt)
        (mnt / "precious.txt").write_bytes(b"precious" * 1000)
        os.sync()
        swap = loop("swap.img", 16)
        sh("mkswap", swap)
        sh("swapon", swap)
        swaps.append(swap)
        good = loop("good.img", 16, data=OLD)
        unlisted = loop("unlisted.img", 16, data=OLD)
        ssd = {"pool_dir": str(pools), "allowed_devices": [mounted, swap, good], "max_caches": 3,
               "size_overcommit": 2.0, "reserve_free_mib": 64}
        with ssdcache_daemon(tmp, ssd) as d:
            yield {"d": d, "tmp": tmp, "pools": pools, "mnt": mnt, "mounted": mounted,
                   "swap": swap, "good": good, "unlisted": unlisted}
    finally:
        for s in swaps:
            subprocess.run(["swapoff", s], check=False)
        for m in mounts:
            subprocess.run(["umount", str(m)], check=False)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], check=False)


def refused(c, method: str, path: str, body: dict | None = None, **params: str) -> ApiError:
    with pytest.raises(ApiError) as ei:
        c.call(method, path, body, params=params or None)
    assert 400 <= ei.value.status < 500, ei.value
    return ei.value


def test_a_mounted_held_or_swap_device_is_refused_and_its_data_survives(env) -> None:
    """Item 3: a block device pool never zeroes a device someone else uses, nor one the config
    does not list."""
    with env["d"].client() as c:
        e = refused(c, "POST", "/v1/ssdcache/pool", {"device": env["mounted"]})
        assert e.status == 409 and "mounted" in e.detail, e
        e = refused(c, "POST", "/v1/ssdcache/pool", {"device": env["swap"]})
        assert e.status == 409 and "swap" in e.detail, e
        e = refused(c, "POST", "/v1/ssdcache/pool", {"device": env["unlisted"]})
        assert e.status == 403 and "allowed_devices" in e.detail, e
        assert c.get("/v1/ssdcache/pool") == {"exists": False}
    assert (env["mnt"] / "precious.txt").read_bytes() == b"precious" * 1000
    sh("umount", str(env["mnt"]))
    try:
        sh("e2fsck", "-n", "-f", env["mounted"])  # the superblock and every inode are intact
    finally:
        sh("mount", env["mounted"], str(env["mnt"]))
    assert (env["mnt"] / "precious.txt").read_bytes() == b"precious" * 1000
    with open(env["unlisted"], "rb") as fh:
        assert fh.read(4096) == OLD


def test_an_unused_allowed_device_is_held_exclusively_and_zeroed_before_use(env) -> None:
    """Items 3 and 9: the device is claimed with O_EXCL (nobody can mount it meanwhile) and its
    old content never reaches a VM."""
    with env["d"].client() as c:
        p = c.post("/v1/ssdcache/pool", {"device": env["good"]})
        assert p["kind"] == "device" and p["blocks"]["free"] == 16
        with pytest.raises(OSError) as ei:  # what mount, swapon or device-mapper would need
            os.close(os.open(env["good"], os.O_RDONLY | os.O_EXCL))
        assert ei.value.errno == errno.EBUSY
        v = c.post("/v1/ssdcache/caches", {"vm": "d1", "size_mib": 16, "current_mib": 16})
        nbd = NbdClient(v["socket"], v["export"])
        try:
            for lbn in range(16):
                assert nbd.read(lbn * BLOCK_SIZE, 4096) == bytes(4096), lbn
        finally:
            nbd.close()
        c.delete("/v1/ssdcache/caches/d1")
        c.delete("/v1/ssdcache/pool")


def test_an_adopted_pool_file_is_zeroed_before_any_block_is_handed_out(env) -> None:
    """Item 9: an existing file full of an old tenant's data becomes a pool of holes."""
    f = env["pools"] / "old.img"
    with open(f, "wb") as fh:
        for _ in range(8):
            fh.write(OLD * (BLOCK_SIZE // 4096))
    with env["d"].client() as c:
        p = c.post("/v1/ssdcache/pool", {"file": "old.img", "size_mib": 8})
        assert p["path"] == str(f) and p["blocks"]["free"] == 8
        v = c.post("/v1/ssdcache/caches", {"vm": "new", "size_mib": 8, "current_mib": 8})
        nbd = NbdClient(v["socket"], v["export"])
        try:
            data = nbd.read(0, 8 * BLOCK_SIZE)
        finally:
            nbd.close()
        assert data == bytes(8 * BLOCK_SIZE)
        assert du_kib(f) == 0  # holes punched over the whole file, nothing written
        c.delete("/v1/ssdcache/caches/new")
        c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})
    assert not f.exists()


def test_freeing_blocks_punches_holes_and_a_pool_must_fit_the_disk(env) -> None:
    """Item 4: deflating must not allocate the pool file (BLKZEROOUT on a loop device over a
    sparse file does); a sparse pool larger than the free space is refused."""
    f = env["pools"] / "sparse.img"
    with env["d"].client() as c:
        vfs = os.statvfs(env["pools"])
        too_big = (vfs.f_bavail * vfs.f_frsize >> 20) + 16
        e = refused(c, "POST", "/v1/ssdcache/pool", {"file": "huge.img", "size_mib": too_big})
        assert e.status == 409 and "does not fit" in e.detail, e
        assert not (env["pools"] / "huge.img").exists()
        c.post("/v1/ssdcache/pool", {"file": "sparse.img", "size_mib": 64})
        v = c.post("/v1/ssdcache/caches", {"vm": "w", "size_mib": 32, "current_mib": 32})
        nbd = NbdClient(v["socket"], v["export"])
        try:
            nbd.write(0, b"\x77" * (4 * BLOCK_SIZE), fua=True)
        finally:
            nbd.close()
        written = du_kib(f)
        assert 4096 <= written <= 4096 + 1024, written
        r = c.put("/v1/ssdcache/caches/w/size", {"current_mib": 0})
        assert r["freed_blocks"] == 32
        assert du_kib(f) <= 64, du_kib(f)  # 32 blocks zeroed, none allocated; the written ones returned
        assert c.get("/v1/ssdcache/pool")["blocks"] == {"free": 64, "owned": 0, "dirty": 0, "total": 64}
        c.delete("/v1/ssdcache/caches/w")
        c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})


def test_a_vanished_pool_file_can_still_be_deleted(env) -> None:
    """Item 4: a way out when the pool file is gone: DELETE of a cache and of the pool succeed
    (before: 500 AssertionError, then 409 forever) and sqlite is clean."""
    d = env["d"]
    f = env["pools"] / "gone.img"
    with d.client() as c:
        c.post("/v1/ssdcache/pool", {"file": str(f), "size_mib": 16})
        c.post("/v1/ssdcache/caches", {"vm": "g1", "size_mib": 8, "current_mib": 4})
        c.post("/v1/ssdcache/caches", {"vm": "g2", "size_mib": 8, "current_mib": 2})
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    f.unlink()  # the loop device stays attached to the deleted inode
    d.start()
    with d.client() as c:
        assert "missing" in c.get("/v1/ssdcache/pool")["error"]
        assert c.delete("/v1/ssdcache/caches/g1")["unregistered"] == "g1"
        r = c.delete("/v1/ssdcache/pool")
        assert r["caches_dropped"] == ["g2"]
        assert c.get("/v1/ssdcache/pool") == {"exists": False} and c.get("/v1/ssdcache/caches") == []
    db = sqlite3.connect(d.cfg.db_path)
    try:
        for table in ("ssd_pool", "ssd_caches", "ssd_blocks"):
            assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    finally:
        db.close()
    backing = [p.read_text().strip() for p in Path("/sys/block").glob("loop*/loop/backing_file")]
    assert f"{f} (deleted)" not in backing  # the orphaned loop device was detached


def test_sizes_and_counts_are_bounded_and_twolevel_is_checked_before_anything_is_built(env) -> None:
    """Items 16 and 5: caches' sizes total at most size_overcommit x the pool, at most
    max_caches caches; a 16 TiB SSD tier is refused at once, before any list is built."""
    with env["d"].client() as c:
        c.post("/v1/ssdcache/pool", {"file": "bounded.img", "size_mib": 32})
        c.post("/v1/ssdcache/caches", {"vm": "b1", "size_mib": 40})
        e = refused(c, "POST", "/v1/ssdcache/caches", {"vm": "b2", "size_mib": 30})  # 70 > 2 x 32
        assert e.status == 409 and "size_overcommit" in e.detail, e
        c.post("/v1/ssdcache/caches", {"vm": "b2", "size_mib": 8})
        c.post("/v1/ssdcache/caches", {"vm": "b3", "size_mib": 8})
        e = refused(c, "POST", "/v1/ssdcache/caches", {"vm": "b4", "size_mib": 1})
        assert e.status == 409 and "max_caches" in e.detail, e
        t0 = time.monotonic()
        e = refused(c, "PUT", "/v1/ssdcache/twolevel", {"mem_mib": 0, "ssd_mib": 16777215})
        assert e.status == 409 and "16777215 blocks requested" in e.detail, e
        assert time.monotonic() - t0 < 2.0
        assert c.get("/v1/ssdcache/pool")["blocks"]["free"] == 32
        for vm in ("b1", "b2", "b3"):
            c.delete(f"/v1/ssdcache/caches/{vm}")
        c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})


def test_an_export_opens_only_with_its_own_vms_secret_name(env) -> None:
    """Item 17: every QEMU runs as the same user; VM B's QEMU must not open VM A's export, and
    nobody may open it by its (public) VM name, the default name, or by listing."""
    with env["d"].client() as c:
        c.post("/v1/ssdcache/pool", {"file": "names.img", "size_mib": 8})
        a = c.post("/v1/ssdcache/caches", {"vm": "vma", "size_mib": 4, "current_mib": 2})
        b = c.post("/v1/ssdcache/caches", {"vm": "vmb", "size_mib": 4, "current_mib": 2})
        for name in ("vma", "", b["export"], a["export"][:-1]):
            with pytest.raises(ConnectionError, match="refused"):
                NbdClient(a["socket"], name)
        assert a["export"].startswith("vma-") and len(a["export"]) >= 36 and a["export"] != b["export"]
        assert a["export"] in a["nbd_uri"] and a["export"] in c.get("/v1/ssdcache/caches/vma/disk-xml")["xml"]
        ok = NbdClient(a["socket"], a["export"])
        try:
            assert ok.size == 4 * BLOCK_SIZE and ok.read(0, 4096) == bytes(4096)
        finally:
            ok.close()
        out = subprocess.run(["qemu-nbd", "--list", "-k", a["socket"]], capture_output=True, text=True, timeout=30)
        assert a["export"] not in out.stdout + out.stderr
        for vm in ("vma", "vmb"):
            c.delete(f"/v1/ssdcache/caches/{vm}")
        c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})


def test_a_failed_block_map_change_leaves_the_export_mapped(as_root, tmp_path, monkeypatch) -> None:
    """Item 5: sqlite first, memory second: when the block map refuses a release, the export
    still serves every block it had (before: unmapped in memory, 500, guest EIO)."""
    from symbiont.ssdcache.manager import CacheManager
    from symbiont.state import StateStore

    async def run() -> None:
        store = StateStore(tmp_path / "s.sqlite3")
        mgr = CacheManager(store, tmp_path / "run", pool_dir=tmp_path, reserve_free_mib=0)
        await mgr.start()
        try:
            await mgr.create_pool("pool.img", None, 16)
            await mgr.register("x", 8, 8, persist=True)

            def boom(vm: str, lbns: list[int]) -> dict[int, int]:
                raise sqlite3.OperationalError("too many SQL variables")

            monkeypatch.setattr(mgr.bmap, "release", boom)
            from symbiont.errors import DaemonError

            with pytest.raises(DaemonError) as ei:
                await mgr.resize("x", 0)
            assert 400 <= ei.value.status < 600 and ei.value.status != 500
            assert len(mgr.exports["x"].backed()) == 8
            monkeypatch.undo()
            assert (await mgr.resize("x", 0))["current_mib"] == 0
            await mgr.unregister("x")
            await mgr.delete_pool(remove_file=True)
        finally:
            await mgr.stop()
            store.close()

    asyncio.run(run())


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    for tool in ("mkfs.ext4", "e2fsck", "mkswap", "swapon", "qemu-nbd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed by these tests")
