"""The block map in sqlite: allocation invariants (property-tested), all-or-nothing changes,
pool exhaustion, zero-on-free states, and the schema itself refusing a double mapping."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from symbiont.ssdcache.blockmap import BlockMap, BlockMapError, PoolExhausted
from symbiont.state import StateStore


def fresh(nblocks: int = 16, path: str | Path = ":memory:") -> BlockMap:
    bm = BlockMap(StateStore(path))
    bm.create_pool("/pool.img", "file", nblocks)
    return bm


def test_allocate_release_and_zero_on_free_states() -> None:
    bm = fresh(8)
    bm.add_cache("a", size_blocks=4, persist=True)
    got = bm.allocate("a", [0, 2])
    assert got == {0: 0, 2: 1}  # lowest free pbns
    assert bm.counts() == {"free": 6, "owned": 2, "dirty": 0, "total": 8}
    freed = bm.release("a", [2])
    assert freed == {2: 1}
    # A released block is dirty (not allocatable) until zeroed and marked free.
    assert bm.counts()["dirty"] == 1 and bm.dirty() == [1]
    bm.add_cache("b", size_blocks=8, persist=False)
    assert 1 not in bm.allocate("b", list(range(6))).values()
    with pytest.raises(PoolExhausted, match="1 blocks requested, 0 free"):
        bm.allocate("b", [6])
    bm.mark_free([1])
    assert bm.allocate("b", [6]) == {6: 1}
    bm.check()


def test_changes_are_all_or_nothing() -> None:
    bm = fresh(4)
    bm.add_cache("a", size_blocks=8, persist=False)
    with pytest.raises(PoolExhausted):
        bm.allocate("a", [0, 1, 2, 3, 4])
    assert bm.counts()["free"] == 4 and bm.mapping("a") == {}
    bm.allocate("a", [0, 1])
    with pytest.raises(BlockMapError, match="already backed"):
        bm.allocate("a", [1, 2])
    with pytest.raises(BlockMapError, match="not backed"):
        bm.release("a", [0, 5])
    assert bm.mapping("a") == {0: 0, 1: 1} and bm.counts()["dirty"] == 0
    with pytest.raises(BlockMapError, match="within 0..7"):
        bm.allocate("a", [8])
    with pytest.raises(BlockMapError, match="still owns 2 blocks"):
        bm.remove_cache("a")
    with pytest.raises(BlockMapError, match="caches are registered"):
        bm.delete_pool()
    with pytest.raises(BlockMapError, match="already registered"):
        bm.add_cache("a", size_blocks=1, persist=False)


def test_the_schema_refuses_double_mappings_even_from_raw_sql() -> None:
    bm = fresh(4)
    bm.add_cache("a", size_blocks=4, persist=False)
    bm.allocate("a", [0])
    with pytest.raises(sqlite3.IntegrityError):  # (vm, lbn) twice
        with bm.store.transaction() as db:
            db.execute("UPDATE ssd_blocks SET state='owned', vm='a', lbn=0 WHERE pbn=1")
    with pytest.raises(sqlite3.IntegrityError):  # owned without an owner
        with bm.store.transaction() as db:
            db.execute("UPDATE ssd_blocks SET state='owned' WHERE pbn=2")
    with pytest.raises(sqlite3.IntegrityError):  # an owner that is not a registered cache
        with bm.store.transaction() as db:
            db.execute("UPDATE ssd_blocks SET state='owned', vm='ghost', lbn=0 WHERE pbn=3")
    bm.check()


def test_state_survives_reopening_the_database(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    bm = fresh(8, db)
    bm.add_cache("a", size_blocks=8, persist=True, weight=3)
    bm.allocate("a", [5, 6])
    bm.release("a", [6])
    bm.store.close()
    bm2 = BlockMap(StateStore(db))
    assert bm2.mapping("a") == {5: 0}
    assert bm2.dirty() == [1]
    assert bm2.cache("a").weight == 3 and bm2.cache("a").persist
    assert bm2.pool()["nblocks"] == 8


class BlockMapMachine(RuleBasedStateMachine):
    """Random register/allocate/release/zero/unregister sequences against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 24
        self.bm = fresh(self.n)
        self.model: dict[str, dict[int, int]] = {}
        self.sizes: dict[str, int] = {}
        self.dirty: set[int] = set()

    @rule(vm=st.sampled_from(["a", "b", "c"]), size=st.integers(1, 16))
    def register(self, vm: str, size: int) -> None:
        if vm in self.model:
            with pytest.raises(BlockMapError):
                self.bm.add_cache(vm, size_blocks=size, persist=False)
            return
        self.bm.add_cache(vm, size_blocks=size, persist=False)
        self.model[vm] = {}
        self.sizes[vm] = size

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        vm = data.draw(st.sampled_from(sorted(self.model)))
        unbacked = [lbn for lbn in range(self.sizes[vm]) if lbn not in self.model[vm]]
        lbns = data.draw(st.lists(st.sampled_from(unbacked), unique=True, max_size=8)) if unbacked else []
        free = self.n - sum(len(m) for m in self.model.values()) - len(self.dirty)
        if len(lbns) > free:
            with pytest.raises(PoolExhausted):
                self.bm.allocate(vm, lbns)
            return
        got = self.bm.allocate(vm, lbns)
        assert sorted(got) == sorted(lbns)
        self.model[vm].update(got)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        vm = data.draw(st.sampled_from(sorted(v for v, m in self.model.items() if m)))
        lbns = data.draw(st.lists(st.sampled_from(sorted(self.model[vm])), unique=True, min_size=1))
        got = self.bm.release(vm, lbns)
        for lbn in lbns:
            assert got[lbn] == self.model[vm].pop(lbn)
            self.dirty.add(got[lbn])

    @precondition(lambda self: self.dirty)
    @rule()
    def zero(self) -> None:
        self.bm.mark_free(sorted(self.dirty))
        self.dirty.clear()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def unregister(self, data: st.DataObject) -> None:
        vm = data.draw(st.sampled_from(sorted(self.model)))
        if self.model[vm]:
            with pytest.raises(BlockMapError):
                self.bm.remove_cache(vm)
            return
        self.bm.remove_cache(vm)
        del self.model[vm]

    @invariant()
    def invariants(self) -> None:
        c = self.bm.check()  # free + owned + dirty = pool; pbns 0..n-1; owned within sizes
        owned = [p for m in self.model.values() for p in m.values()]
        assert len(owned) == len(set(owned)), "a pbn owned twice"
        assert c["owned"] == len(owned) and c["dirty"] == len(self.dirty)
        assert c["free"] + c["owned"] + c["dirty"] == self.n
        assert not set(owned) & self.dirty
        for vm, m in self.model.items():
            assert self.bm.mapping(vm) == m


TestBlockMapMachine = BlockMapMachine.TestCase
TestBlockMapMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_resize_across_300000_blocks_is_one_batch_not_one_sql_variable_per_block() -> None:
    """Issue 16, item 5: sqlite refuses more than 250,000 variables in one statement; inflate,
    deflate and zero-on-free of 300,000 blocks must work, all or nothing."""
    n = 300_000
    bm = fresh(n + 8)
    bm.add_cache("big", size_blocks=n, persist=True)
    got = bm.allocate("big", list(range(n)))
    assert len(got) == n and bm.counts()["owned"] == n
    with pytest.raises(BlockMapError, match="already backed"):
        bm.allocate("big", [n - 1])
    with pytest.raises(BlockMapError, match="not backed"):  # all or nothing: nothing was released
        bm.release("big", [*range(n), n])
    assert bm.counts()["owned"] == n
    freed = bm.release("big", list(range(n)))
    assert len(freed) == n and bm.counts()["dirty"] == n
    with pytest.raises(BlockMapError, match="not dirty"):
        bm.mark_free([*freed.values(), n + 1])
    assert bm.counts()["dirty"] == n
    bm.mark_free(list(freed.values()))
    assert bm.check() == {"free": n + 8, "owned": 0, "dirty": 0, "total": n + 8}
