"""DoubleDecker's SSD tier on a real loop device: pages go to and come back from the pool's
blocks, demotion Mem → SSD under a quota, reconfiguration frees slots."""

from __future__ import annotations

import pytest

from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont.ssdcache.pool import Pool, loop_devices_of
from symbiont.ssdcache.twolevel import PAGE, SsdTier, TwoLevelCache

pytestmark = [pytest.mark.root]


@pytest.fixture
def pool(as_root, tmp_path):
    p = Pool.create_file(tmp_path / "pool.img", 4)
    yield p
    p.close(detach=True)
    assert loop_devices_of(tmp_path / "pool.img") == []


def test_ssd_tier_stores_pages_in_pool_blocks(pool: Pool) -> None:
    ssd = SsdTier(pool, [3, 1])  # 2 blocks, deliberately out of order
    c = TwoLevelCache(mem_pages=8, ssd=ssd)
    c.configure_vm("vm", {"mem": 1, "ssd": 1}, {"a": {"mem": 1, "ssd": 1}})
    for i in range(300):
        c.put("vm", "a", i, bytes([i % 256]) * PAGE)
    occ = c.occupancy()["vm/a"]
    assert occ["used"] == {"mem": 8, "ssd": 292} and occ["demotions"] == 292
    # The demoted pages really are on the pool: slot 0 is pbn 3's first page.
    assert pool.pread(3 * BLOCK_SIZE, PAGE) == bytes([0]) * PAGE
    assert pool.pread(1 * BLOCK_SIZE, PAGE) == bytes([256 % 256]) * PAGE  # slot 256: pbn 1
    for i in (0, 150, 299):
        assert c.get("vm", "a", i) == bytes([i % 256]) * PAGE
    c.configure_vm("vm", {"mem": 1}, {"a": {"mem": 1}})  # the SSD tier taken away: slots freed
    assert len(ssd.free) == ssd.capacity and c.occupancy()["vm/a"]["used"]["ssd"] == 0
