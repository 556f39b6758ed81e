"""DoubleDecker's two-level partitioning: <T, W> at the hypervisor level (VMs) and the VM level
(containers), deterministic quotas, LRU within a partition, demotion Mem → SSD, run-time
reconfiguration (the seed's 60:40 → 50:30:20 → C3 on SSD, C1:C2 60:40 scenario)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from symbiont.ssdcache.twolevel import (
    PAGE,
    SsdTier,
    TwoLevelCache,
    TwoLevelError,
    container_quotas,
    parse_tw,
    vm_shares,
)
from symbiont_agent.ops_ssdcache import split_share


class MemPool:
    """A pool stand-in for the SSD tier's unit tests: bytes in a bytearray (the real pool is
    exercised by the host tests and the experiment)."""

    def __init__(self, nblocks: int) -> None:
        self.buf = bytearray(nblocks << 20)

    def pwrite(self, phys: int, data: bytes) -> None:
        self.buf[phys : phys + len(data)] = data

    def pread(self, phys: int, n: int) -> bytes:
        return bytes(self.buf[phys : phys + n])


def test_parse_tw_spellings() -> None:
    assert parse_tw({"type": "Mem", "weight": 60}) == {"mem": 60}
    assert parse_tw(["ssd", 100]) == {"ssd": 100}
    assert parse_tw({"mem": 30, "ssd": 10}) == {"mem": 30, "ssd": 10}
    for bad in ({"type": "disk", "weight": 1}, ["mem", -1], ["mem", 1.5], "mem", {"tape": 1}):
        with pytest.raises(TwoLevelError):
            parse_tw(bad)


def test_hypervisor_and_vm_levels() -> None:
    shares = vm_shares({"mem": 1000, "ssd": 400}, {"vm1": {"mem": 3}, "vm2": {"mem": 1, "ssd": 1}})
    assert shares == {"vm1": {"mem": 750, "ssd": 0}, "vm2": {"mem": 250, "ssd": 400}}
    q = container_quotas(shares["vm2"], {"a": {"mem": 60}, "b": {"mem": 40}, "c": {"ssd": 100}})
    assert q == {"a": {"mem": 150, "ssd": 0}, "b": {"mem": 100, "ssd": 0}, "c": {"mem": 0, "ssd": 400}}
    assert container_quotas({"mem": 5, "ssd": 0}, {}) == {"-": {"mem": 5, "ssd": 0}}


@given(st.integers(0, 10_000), st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(0, 100), min_size=1))
def test_the_guests_split_and_the_hosts_agree_and_sum_up(total: int, weights: dict[str, int]) -> None:
    conts = {c: {"mem": w} for c, w in weights.items()}
    host = container_quotas({"mem": total, "ssd": 0}, conts)
    guest = split_share({"mem": total, "ssd": 0}, {c: {"type": "mem", "weight": w} for c, w in weights.items()})
    assert host == guest
    used = sum(q["mem"] for q in host.values())
    assert used == (total if any(weights.values()) else 0)


def test_partitions_are_deterministic_lru_and_demote_to_ssd() -> None:
    ssd = SsdTier(MemPool(2), [0, 1])  # 2 MiB: 512 pages
    c = TwoLevelCache(mem_pages=10, ssd=ssd)
    c.configure_vm("vm", {"mem": 1, "ssd": 1}, {"c1": {"mem": 60, "ssd": 50}, "c2": {"mem": 40}})
    q = {k: v["quota"] for k, v in c.occupancy().items()}
    assert q == {"vm/c1": {"mem": 6, "ssd": 512}, "vm/c2": {"mem": 4, "ssd": 0}}
    for i in range(20):
        assert c.put("vm", "c1", i, bytes([i]) * PAGE) == "mem"
        c.put("vm", "c2", i, b"x")
    occ = c.occupancy()
    assert occ["vm/c1"]["used"] == {"mem": 6, "ssd": 14} and occ["vm/c1"]["demotions"] == 14
    assert occ["vm/c2"]["used"] == {"mem": 4, "ssd": 0} and occ["vm/c2"]["evictions"] == 16
    # c1's oldest pages were demoted to the SSD tier, and come back from there (exclusive get).
    assert c.get("vm", "c1", 0) == bytes([0]) * PAGE
    assert c.get("vm", "c1", 0) is None
    assert c.get("vm", "c1", 19) == bytes([19]) * PAGE  # in memory
    assert c.get("vm", "c2", 0) is None  # evicted: c2 has no SSD quota
    with pytest.raises(TwoLevelError):
        c.put("vm", "c3", 1, b"x")


def test_the_seeds_reconfiguration_scenario() -> None:
    ssd = SsdTier(MemPool(1), [0])  # 256 pages
    c = TwoLevelCache(mem_pages=100, ssd=ssd)
    c.configure_vm("vm", {"mem": 100, "ssd": 100}, {"C1": ["mem", 60], "C2": ["mem", 40]})

    def fill() -> dict[str, dict[str, int]]:
        for k in range(300):
            for cont in c.containers["vm"]:
                c.put("vm", cont, (cont, k), b"p")
        return {k.split("/")[1]: v["used"] for k, v in c.occupancy().items()}

    assert fill() == {"C1": {"mem": 60, "ssd": 0}, "C2": {"mem": 40, "ssd": 0}}
    c.configure_container("vm", "C1", ["mem", 50])
    c.configure_container("vm", "C2", ["mem", 30])
    c.configure_container("vm", "C3", ["mem", 20])
    assert {k: v["used"] for k, v in c.occupancy().items()}["vm/C1"] == {"mem": 50, "ssd": 0}  # shrunk at once
    assert fill() == {"C1": {"mem": 50, "ssd": 0}, "C2": {"mem": 30, "ssd": 0}, "C3": {"mem": 20, "ssd": 0}}
    # C3 moves to the SSD: its pages are demoted, not lost; C1:C2 back to 60:40.
    c.configure_container("vm", "C3", ["ssd", 100])
    c.configure_container("vm", "C1", ["mem", 60])
    c.configure_container("vm", "C2", ["mem", 40])
    occ = {k.split("/")[1]: v["used"] for k, v in c.occupancy().items()}
    assert occ["C3"] == {"mem": 0, "ssd": 20}
    assert fill() == {"C1": {"mem": 60, "ssd": 0}, "C2": {"mem": 40, "ssd": 0}, "C3": {"mem": 0, "ssd": 256}}
    assert c.reconfigurations == 7


def test_removal_frees_ssd_slots_and_the_guests_split_is_used() -> None:
    ssd = SsdTier(MemPool(1), [0])
    calls = []

    def split(vm, share, conts):
        calls.append(vm)
        return container_quotas(share, conts)

    c = TwoLevelCache(mem_pages=0, ssd=ssd, split=split)
    c.configure_vm("a", ["ssd", 1], {"x": ["ssd", 1]})
    c.configure_vm("b", ["ssd", 1])
    for k in range(200):
        c.put("a", "x", k, b"1")
        c.put("b", None, k, b"2")
    assert len(ssd.free) == 0
    c.remove("a")
    assert len(ssd.free) == 128 and "a" in calls
    assert c.view()["vms"] == {"b": {"ssd": 1}}


def test_the_guest_is_asked_to_split_and_told_when_its_containers_are_gone(tmp_path) -> None:
    """The VM level is the guest's decision: the manager asks the agent (here a recording link
    that answers with the agent's own split function) and, once the VM has no container left,
    tells it so, so that its in-guest store stops holding their pages."""
    import asyncio

    from symbiont.gateway import AgentGateway
    from symbiont.ssdcache.manager import CacheManager
    from symbiont.state import StateStore

    # An old guest image lists only the old name: the gateway canonicalises, so it is still asked.
    class Link:
        ready, caps, hello = True, ["doubledecker-split"], {}

        def __init__(self) -> None:
            self.asked: list[dict] = []

        async def request(self, op: str, args: dict, payload: bytes = b"", timeout: float | None = None):
            assert op == "doubledecker-split"
            self.asked.append(args)
            return {"split": split_share(args["share"], args["containers"])}, b""

    link = Link()

    async def scenario() -> None:
        mgr = CacheManager(StateStore(":memory:"), tmp_path / "run", agents=AgentGateway({"vm1": link}))
        await mgr.twolevel_setup(1, 0)
        await mgr.twolevel_configure("vm1", {"mem": 100})
        await mgr.twolevel_configure("vm1", {"mem": 60}, "C1")
        await mgr.twolevel_configure("vm1", {"mem": 40}, "C2")
        assert link.asked[-1] == {"share": {"mem": 256, "ssd": 0}, "containers": {
            "C1": {"type": "mem", "weight": 60}, "C2": {"type": "mem", "weight": 40}}}  # fmt: skip
        await mgr.twolevel_remove("vm1", "C1")
        assert set(link.asked[-1]["containers"]) == {"C2"}
        n = len(link.asked)
        await mgr.twolevel_remove("vm1", "C2")
        assert len(link.asked) == n + 1 and link.asked[-1]["containers"] == {}
        await mgr.twolevel_remove("vm1")
        assert len(link.asked) == n + 1  # told once; nothing left to tell
        await mgr.stop()

    asyncio.run(scenario())
