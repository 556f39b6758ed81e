"""The guest agent's side of the elastic SSD: membership messages (validated: the host is
trusted less than nothing here either), coldest-first release, the read cache on real files
standing in for the two disks, its persistent index, and DoubleDecker's VM-level split."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from symbiont_agent import agent
from symbiont_agent.ops_ssdcache import (
    BLOCK,
    DDStore,
    GuestCache,
    container_of_pid,
    find_disk,
    page_of,
    parse_runs,
    split_share,
    to_runs,
)


@pytest.fixture
def disks(tmp_path: Path) -> tuple[str, str]:
    ssd, slow = tmp_path / "ssd.img", tmp_path / "slow.img"
    with open(ssd, "wb") as fh:
        fh.truncate(8 * BLOCK)
    with open(slow, "wb") as fh:
        for line in range(16):
            fh.write(bytes([line + 1]) * BLOCK)  # line i is filled with byte i+1
    return str(ssd), str(slow)


def cache(tmp_path: Path, disks: tuple[str, str]) -> GuestCache:
    return GuestCache(str(tmp_path / "state.json"), cache_dev=disks[0], slow_dev=disks[1])


def test_ops_are_registered_with_the_agent() -> None:
    agent.load_op_modules()
    for name in ("ssdcache-config", "ssdcache-release", "ssdcache-grant", "ssdcache-revoke", "ssdcache-status",
                 "ssdcache-coldest", "ssdcache-workload-start", "ssdcache-workload-stop", "doubledecker-split",
                 "doubledecker-status"):
        assert name in agent.OPS


def test_runs_are_validated() -> None:
    assert parse_runs([[0, 2], [5, 1]], 8) == [0, 1, 5]
    assert to_runs([5, 0, 1]) == [[0, 2], [5, 1]]
    for bad in ([[7, 2]], [[-1, 1]], [[0, 0]], [["a", 1]], "x", [[0, 1, 2]], [[True, 1]]):
        with pytest.raises(ValueError):
            parse_runs(bad, 8)


def test_read_cache_hits_after_a_miss_and_evicts_lru(tmp_path: Path, disks: tuple[str, str]) -> None:
    c = cache(tmp_path, disks)
    c.configure({"vm": "vm1", "size_blocks": 8, "backed": [[0, 2]], "epoch": 1})
    assert c.read(3 * BLOCK + 8192) == bytes([4]) * 4096 and c.misses == 1
    assert c.read(3 * BLOCK) == bytes([4]) * 4096 and c.hits == 1
    # The line really is on the SSD, in block 0.
    with open(disks[0], "rb") as fh:
        assert fh.read(16) == bytes([4]) * 16
    c.read(5 * BLOCK)  # fills block 1
    c.read(3 * BLOCK)  # line 3 is now the most recent
    c.read(7 * BLOCK)  # evicts line 5 (LRU), reusing block 1
    assert c.evictions == 1 and set(c.index) == {3, 7}
    st = c.status()
    assert st["cached_blocks"] == 2 and st["backed_blocks"] == 2 and st["hits"] == 2


def test_release_gives_back_free_blocks_then_the_coldest(tmp_path: Path, disks: tuple[str, str]) -> None:
    c = cache(tmp_path, disks)
    c.configure({"vm": "vm1", "size_blocks": 8, "backed": [[0, 5]], "epoch": 1})
    for line in (1, 2, 3):
        c.read(line * BLOCK)  # blocks 0, 1, 2
    c.read(1 * BLOCK)  # line 1 (block 0) is the hottest; line 2 (block 1) the coldest
    assert c.coldest(5) == [3, 4, 1, 2, 0]
    r = c.release({"count": 3, "epoch": 2})
    assert r["lbns"] == [[1, 1], [3, 2]] and r["epoch"] == 2 and r["backed_blocks"] == 2
    assert 2 not in c.index and c.read(2 * BLOCK) == bytes([3]) * 4096  # a miss again, served right
    assert c.status()["backed_blocks"] == 2


def test_config_is_the_whole_truth_and_the_index_survives_a_restart(tmp_path: Path, disks: tuple[str, str]) -> None:
    c = cache(tmp_path, disks)
    c.configure({"vm": "vm1", "size_blocks": 8, "backed": [[0, 3]], "epoch": 1})
    c.read(1 * BLOCK)
    c.read(2 * BLOCK)
    c.read(6 * BLOCK)
    # The agent restarts: the index comes back from the state file, but only for blocks the
    # host still says are backed.
    c2 = cache(tmp_path, disks)
    c2.configure({"vm": "vm1", "size_blocks": 8, "backed": [[0, 1], [2, 1]], "epoch": 5})
    assert c2.index == {1: 0, 6: 2}
    assert c2.read(6 * BLOCK) == bytes([7]) * 4096 and c2.hits == 1
    # A config for another cache forgets everything.
    c2.configure({"vm": "vm2", "size_blocks": 8, "backed": [[0, 3]], "epoch": 1})
    assert c2.index == {}


def test_revoke_and_grant(tmp_path: Path, disks: tuple[str, str]) -> None:
    c = cache(tmp_path, disks)
    c.configure({"vm": "vm1", "size_blocks": 8, "backed": [[0, 2]], "epoch": 1})
    c.read(4 * BLOCK)
    assert c.revoke({"lbns": [[0, 1]], "epoch": 2})["backed_blocks"] == 1
    assert c.index == {}
    assert c.grant({"lbns": [[4, 2]], "epoch": 3})["backed_blocks"] == 3
    with pytest.raises(ValueError):
        c.grant({"lbns": [[7, 5]]})
    with pytest.raises(ValueError):
        c.configure({"vm": "vm1", "size_blocks": 0, "backed": []})
    with pytest.raises(ValueError):
        c.release({"count": -1})


def test_find_disk_by_serial(tmp_path: Path) -> None:
    for name, serial in (("vda", ""), ("vdb", "symbiont-cache\n"), ("vdc", "symbiont-slow")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "serial").write_text(serial)
    assert find_disk("symbiont-cache", str(tmp_path)) == "/dev/vdb"
    assert find_disk("symbiont-slow", str(tmp_path)) == "/dev/vdc"
    assert find_disk("nope", str(tmp_path)) is None
    assert find_disk("x", str(tmp_path / "missing")) is None


def test_doubledecker_vm_level_split() -> None:
    share = {"mem": 1000, "ssd": 600}
    out = split_share(share, {"c1": {"type": "mem", "weight": 60}, "c2": {"type": "mem", "weight": 40},
                              "c3": {"type": "ssd", "weight": 20}})
    assert out == {"c1": {"mem": 600, "ssd": 0}, "c2": {"mem": 400, "ssd": 0}, "c3": {"mem": 0, "ssd": 600}}
    out = split_share({"mem": 10, "ssd": 0}, {"a": {"type": "mem", "weight": 1}, "b": {"type": "mem", "weight": 2}})
    assert sum(v["mem"] for v in out.values()) == 10
    for bad in ({"a": {"type": "disk", "weight": 1}}, {"a": {"type": "mem", "weight": -1}}, {"": {}}):
        with pytest.raises(ValueError):
            split_share(share, bad)


def test_env_overrides_the_state_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SYMBIONT_SSDCACHE_STATE", str(tmp_path / "x.json"))
    assert GuestCache().state_file == str(tmp_path / "x.json")
    assert not os.path.exists(tmp_path / "x.json")


# -- DoubleDecker's VM level inside the guest: the store the containers put into -------------
def dd_store(tmp_path: Path, disks: tuple[str, str], backed: int = 2) -> tuple[GuestCache, DDStore]:
    c = cache(tmp_path, disks)
    c.configure({"vm": "vm1", "size_blocks": 8, "backed": [[0, backed]], "epoch": 1})
    return c, DDStore(c)


def test_dd_store_partitions_memory_by_weight_and_trims_at_once(tmp_path: Path, disks: tuple[str, str]) -> None:
    _, st = dd_store(tmp_path, disks)
    share = {"mem": 10, "ssd": 0}
    st.apply(share, split_share(share, {"C1": {"type": "mem", "weight": 60}, "C2": {"type": "mem", "weight": 40}}))
    for k in range(20):  # both produce far more than their quota
        assert st.put("C1", k, page_of(k)) and st.put("C2", k, page_of(k))
    occ = st.status()["containers"]
    assert occ["C1"]["used"] == {"mem": 6, "ssd": 0} and occ["C2"]["used"] == {"mem": 4, "ssd": 0}
    assert st.get("C1", 19) == page_of(19) and st.get("C1", 19) is None  # exclusive get
    assert st.get("C1", 0) is None  # the LRU pages went first
    # A third container joins: 50:30:20; the others shrink immediately.
    st.apply(share, split_share(share, {c: {"type": "mem", "weight": w} for c, w in
                                        (("C1", 50), ("C2", 30), ("C3", 20))}))
    occ = st.status()["containers"]
    assert occ["C1"]["used"]["mem"] == 5 and occ["C2"]["used"]["mem"] == 3 and occ["C3"]["quota"]["mem"] == 2
    assert st.put("C4", 1, page_of(1)) is False  # not a configured container: nothing stored


def test_dd_store_ssd_tier_lives_in_lent_blocks_of_the_elastic_disk(tmp_path: Path, disks: tuple[str, str]) -> None:
    c, st = dd_store(tmp_path, disks)
    share = {"mem": 4, "ssd": 300}
    st.apply(share, {"C1": {"mem": 4, "ssd": 0}, "C3": {"mem": 0, "ssd": 300}})
    assert c.status()["lent_blocks"] == 2 and st.status()["ssd_capacity"] == 512
    c.read(3 * BLOCK)  # the read cache finds no free block: lent blocks are not its to fill
    assert c.fills == 0
    for k in range(400):
        st.put("C3", k, page_of(k))
    assert st.status()["containers"]["C3"]["used"]["ssd"] == 300
    slot = st.ssd["C3"][399]
    with open(disks[0], "rb") as fh:  # the page really is on the disk, at its slot
        fh.seek(slot * 4096)
        assert fh.read(4096) == page_of(399)
    assert st.get("C3", 399) == page_of(399)
    # C1 moves to the SSD tier too: its memory pages are demoted, not lost.
    for k in range(4):
        st.put("C1", 1000 + k, page_of(1000 + k))
    st.apply(share, {"C1": {"mem": 0, "ssd": 100}, "C3": {"mem": 0, "ssd": 200}})
    occ = st.status()["containers"]
    assert occ["C1"]["used"] == {"mem": 0, "ssd": 4} and occ["C1"]["demoted"] == 4
    assert occ["C3"]["used"]["ssd"] == 200 and st.get("C1", 1002) == page_of(1002)
    # The host takes a lent block back (release): its pages are gone, later gets miss.
    gone = c.release({"count": 2})["lbns"]
    assert gone == [[0, 2]] and st.status()["ssd_capacity"] == 0
    assert st.get("C3", 398) is None and st.status()["containers"]["C3"]["used"]["ssd"] == 0


def test_container_of_pid_reads_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cgroup").write_text("0::/symbiont-ct/C2\n")
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "cgroup").write_text("0::/system.slice/ssh.service\n")
    assert container_of_pid(7, str(tmp_path)) == "C2"
    assert container_of_pid(8, str(tmp_path)) is None and container_of_pid(9, str(tmp_path)) is None
