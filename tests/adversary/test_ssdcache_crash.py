"""The SSD cache's crash loop (issue 16, "keep an adversary in the suite"): a real ``symbiontd``
over a scratch pool file on a real loop device; three VMs' exports written through NBD with a
per-VM byte pattern while their caches are resized at random, and ``kill -9`` of the daemon at
random moments (5 kills, fixed seed). After each restart the invariants must hold:

* no physical block owned twice, every owned block inside its cache's size, no block left dirty;
* free + owned = pool;
* every owned block holds its owner's pattern or zeros (4 KiB granularity), every free block
  reads as zeros (zeroed on free, or again at start after a crash);
* freeing never allocates: the pool file's allocated space stays within what the owned blocks
  can hold (``BLKZEROOUT`` on a sparse file allocated every freed block);
* each export still opens under the same secret name (kept in sqlite).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from symbiont.client import ApiError, Client
from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.nbdclient import NbdClient
from symbiont.ssdcache.pool import loop_devices_of
from symbiont_research.lab.session import DaemonProcess
from tests.ssdcache_fixtures import ssdcache_daemon

pytestmark = [pytest.mark.root]

POOL_MIB = 64
SIZE_MIB = 32
VMS = {"crash-a": 0xA1, "crash-b": 0xB2, "crash-c": 0xC3}
KILLS = 5
CHUNK = 4096


class Load:
    """Resizes and NBD writes from threads until stopped; failures while the daemon is down
    are expected and only counted."""

    def __init__(self, sock: Path, exports: dict[str, tuple[str, str]], rng: random.Random) -> None:
        self.sock = sock
        self.exports = exports
        self.seeds = [rng.randrange(1 << 30) for _ in range(len(exports) + 1)]
        self.stop = threading.Event()
        self.resizes = 0
        self.writes = 0
        self.failures = 0
        self.threads = [threading.Thread(target=self._resizer, daemon=True)]
        self.threads += [threading.Thread(target=self._writer, args=(vm, i), daemon=True)
                         for i, vm in enumerate(exports)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _resizer(self) -> None:
        rng = random.Random(self.seeds[-1])
        while not self.stop.is_set():
            vm = rng.choice(list(self.exports))
            try:
                with Client(str(self.sock), timeout=5) as c:
                    c.put(f"/v1/ssdcache/caches/{vm}/size", {"current_mib": rng.randint(0, SIZE_MIB)})
                self.resizes += 1
            except (ApiError, OSError):
                self.failures += 1
                time.sleep(0.05)

    def _writer(self, vm: str, i: int) -> None:
        rng = random.Random(self.seeds[i])
        socket_path, export = self.exports[vm]
        data = bytes([VMS[vm]]) * (64 * 1024)
        nbd = None
        while not self.stop.is_set():
            try:
                if nbd is None:
                    nbd = NbdClient(socket_path, export, timeout=5)
                off = rng.randrange(SIZE_MIB) * BLOCK_SIZE + rng.randrange(BLOCK_SIZE // len(data)) * len(data)
                nbd.write(off, data)
                self.writes += 1
            except Exception as exc:
                self.failures += 1
                if type(exc) is OSError and exc.errno == errno.EIO:
                    continue  # an unbacked block: refused, the connection stays
                if nbd is not None:
                    nbd.sock.close()
                nbd = None
                time.sleep(0.05)
        if nbd is not None:
            nbd.sock.close()


@pytest.fixture
def bench(as_root, tmp_path):
    pools = tmp_path / "pools"
    with ssdcache_daemon(tmp_path, {"pool_dir": str(pools), "reserve_free_mib": 0, "release_timeout_s": 0.5}) as d:
        yield d, pools / "crash.img"


def check_invariants(d: DaemonProcess, pool_file: Path) -> dict[str, int]:
    db = sqlite3.connect(d.cfg.db_path)
    try:
        (nblocks,) = db.execute("SELECT nblocks FROM ssd_pool").fetchone()
        counts = dict(db.execute("SELECT state, COUNT(*) FROM ssd_blocks GROUP BY state").fetchall())
        rows = db.execute("SELECT pbn, state, vm, lbn FROM ssd_blocks ORDER BY pbn").fetchall()
        sizes = dict(db.execute("SELECT vm, size_blocks FROM ssd_caches").fetchall())
    finally:
        db.close()
    assert counts.get("dirty", 0) == 0, counts
    assert counts.get("free", 0) + counts.get("owned", 0) == nblocks == POOL_MIB, counts
    assert [r[0] for r in rows] == list(range(nblocks))  # every pbn once: none owned twice
    owners = [(vm, lbn) for _, state, vm, lbn in rows if state == "owned"]
    assert len(owners) == len(set(owners))
    for vm, lbn in owners:
        assert vm in sizes and 0 <= lbn < sizes[vm], (vm, lbn)
    zero = bytes(CHUNK)
    (dev,) = loop_devices_of(pool_file)
    with open(dev, "rb", buffering=0) as fh:
        for pbn, state, vm, _lbn in rows:
            fh.seek(pbn * BLOCK_SIZE)
            block = fh.read(BLOCK_SIZE)
            if state == "free":
                assert block == bytes(BLOCK_SIZE), f"free block {pbn} is not zeroed"
                continue
            mine = bytes([VMS[vm]]) * CHUNK
            for off in range(0, BLOCK_SIZE, CHUNK):
                chunk = block[off : off + CHUNK]
                assert chunk in (zero, mine), f"block {pbn} of {vm} holds {chunk[:4]!r} at {off}"
    allocated = os.stat(pool_file).st_blocks * 512
    assert allocated <= counts.get("owned", 0) * BLOCK_SIZE + (1 << 20), (allocated, counts)
    return counts


def test_random_kill_9_during_resizes_and_writes_keeps_the_invariants(bench) -> None:
    d, pool_file = bench
    rng = random.Random(16)
    t_start = time.monotonic()
    with d.client() as c:
        c.post("/v1/ssdcache/pool", {"file": pool_file.name, "size_mib": POOL_MIB})
        exports = {}
        for vm in VMS:
            v = c.post("/v1/ssdcache/caches", {"vm": vm, "size_mib": SIZE_MIB, "current_mib": 8, "persist": True})
            exports[vm] = (v["socket"], v["export"])
    totals = {"resizes": 0, "writes": 0}
    for _ in range(KILLS):
        with Load(Path(d.cfg.socket), exports, rng) as load:
            time.sleep(rng.uniform(0.8, 2.5))
            assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        totals["resizes"] += load.resizes
        totals["writes"] += load.writes
        d.start()
        check_invariants(d, pool_file)
        with d.client() as c:
            for vm in VMS:
                v = c.get(f"/v1/ssdcache/caches/{vm}")
                assert (v["socket"], v["export"]) == exports[vm]  # the secret name survived the crash
    print(f"crash loop: {KILLS} kill -9, {totals['resizes']} resizes, {totals['writes']} NBD writes of 64 KiB")
    assert totals["resizes"] >= KILLS and totals["writes"] >= KILLS, totals
    assert time.monotonic() - t_start < 90, "the crash loop must stay short"
