"""The daemon owns its swap tier: created at start, removed at stop; after ``kill -9`` a
restarted daemon adopts its own device (same config) or removes it (paging now off) — and a
process whose pages were in the tier gets every byte back."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from symbiont.config import load_config
from symbiont.host import pageout as po
from symbiont.host import zram
from symbiont.paging.part import tier_label
from symbiont_research.lab.session import DaemonProcess
from tests.host.test_paging_mechanism import Helper

pytestmark = [pytest.mark.root]


def _daemon(tmp: Path, enabled: bool = True, size: int = 256, limit: int = 0) -> DaemonProcess:
    cfg = {"state_dir": str(tmp / "state"), "socket": str(tmp / "symbiontd.sock"), "control": {"period_s": 0.5},
           "paging": {"enabled": enabled, "zram_size_mib": size, "zram_mem_limit_mib": limit}}
    path = tmp / "symbiontd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return DaemonProcess(path, load_config(path), tmp / "symbiontd.log")


def _ours(tmp: Path) -> list[int]:
    """zram devices whose swap label is this test daemon's."""
    label = tier_label(str(tmp / "state"))
    nums = [int(p.name[4:]) for p in Path("/sys/block").glob("zram*")]
    return sorted(n for n in nums if zram.swap_label(n) == label)


@pytest.fixture
def cleanup(tmp_path: Path, as_root: None):
    yield
    for n in _ours(tmp_path):  # never leave a tier behind, even when a test fails
        zram.remove(n)


def _tier(d: DaemonProcess) -> dict:
    with d.client() as c:
        return c.get("/v1/paging")["tier"]


def test_tier_created_at_start_and_removed_at_stop(tmp_path: Path, cleanup) -> None:
    d = _daemon(tmp_path, size=1024, limit=64)  # slots and RAM apart (docs/paging.md)
    d.start()
    try:
        t = _tier(d)
        assert t["device"] and t["size_mib"] >= 1000 and t["used_mib"] == 0 and t["mem_limit_mib"] == 64
        num = int(t["device"].removeprefix("/dev/zram"))
        assert _ours(tmp_path) == [num] and zram.is_swap(num)
        assert zram.disksize(num) == 1024 << 20 and zram.stats(num).mem_limit == 64 << 20
        assert t["slots_free_mib"] >= 1000 and 60 <= t["ram_free_mib"] <= 64
    finally:
        assert d.stop() == 0
    assert not zram.exists(num) and _ours(tmp_path) == []


def test_kill_9_then_restart_adopts_the_tier_and_keeps_its_pages(tmp_path: Path, cleanup) -> None:
    d = _daemon(tmp_path)
    d.start()
    num = int(_tier(d)["device"].removeprefix("/dev/zram"))
    helper = Helper()
    try:
        d.stop(signal.SIGKILL)
        assert zram.is_swap(num)  # a dead daemon cannot clean up: the record in sqlite must
        # Pages of a live process in the orphaned tier: they must not be lost.
        po.pageout(helper.pid, [(helper.region.start, helper.region.size)])
        used = zram.swaps()[zram.dev_path(num)]["used_kib"]
        assert used >= 250 * 1024 or po.status_kib(helper.pid)["VmSwap"] >= 250 * 1024
        d.start()
        t = _tier(d)
        assert t["device"] == zram.dev_path(num)  # adopted, not a second tier
        assert _ours(tmp_path) == [num] and t["used_mib"] > 0
        with d.client() as c:
            dec = [x for x in c.get("/v1/decisions", limit=100) if x["part"] == "paging"]
        assert any(x["action"] == "tier-recover" and x["outcome"]["action"] == "adopted" for x in dec)
        assert d.stop() == 0
        assert not zram.exists(num)  # stop: swapoff brought the pages home, then the device went
        assert po.status_kib(helper.pid)["VmSwap"] == 0
        assert helper.checksum() == helper.first
    finally:
        helper.close()


def test_kill_9_then_restart_without_paging_removes_the_stale_tier(tmp_path: Path, cleanup) -> None:
    d = _daemon(tmp_path)
    d.start()
    num = int(_tier(d)["device"].removeprefix("/dev/zram"))
    helper = Helper()
    try:
        d.stop(signal.SIGKILL)
        po.pageout(helper.pid, [(helper.region.start, helper.region.size)])
        assert po.status_kib(helper.pid)["VmSwap"] >= 250 * 1024
        d2 = _daemon(tmp_path, enabled=False)
        d2.start()
        try:
            assert _tier(d2)["device"] is None
            assert not zram.exists(num) and _ours(tmp_path) == []
            assert po.status_kib(helper.pid)["VmSwap"] == 0  # swapoff returned every page
            assert helper.checksum() == helper.first
            with d2.client() as c:
                dec = [x for x in c.get("/v1/decisions", limit=100) if x["action"] == "tier-recover"]
            assert dec and dec[-1]["outcome"]["action"] == "removed"
        finally:
            d2.stop()
    finally:
        helper.close()


def test_a_tier_larger_than_the_host_allows_is_refused_naming_the_key(tmp_path: Path) -> None:
    import psutil

    from symbiont.config import ConfigError

    total = psutil.virtual_memory().total // (1 << 20)
    state = tmp_path / "state"
    with pytest.raises(ConfigError, match=r"^paging\.zram_size_mib: .*twice this host's memory"):
        load_config(None, {"state_dir": str(state), "paging": {"enabled": True, "zram_size_mib": 2 * total + 16}})
    with pytest.raises(ConfigError, match=r"^paging\.zram_mem_limit_mib: .*half of this host's memory"):
        load_config(None, {"state_dir": str(state), "paging": {"enabled": True, "zram_size_mib": total,
                                                              "zram_mem_limit_mib": total}})
    assert _ours(tmp_path) == [] and not state.exists()  # nothing changed: no tier, no state
    with pytest.raises(ConfigError, match=r"^paging\.compressor: "):
        load_config(None, {"paging": {"compressor": "gzip9"}})
