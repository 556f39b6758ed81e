"""The guest's side of paging: free and cold frames from /proc/kpageflags words."""

from __future__ import annotations

import array

from symbiont_agent import ops_paging as op

BUDDY, LRU, ACTIVE, REF, ANON, SLAB, OFFLINE, UNEVICTABLE = (
    1 << 10, 1 << 5, 1 << 6, 1 << 2, 1 << 12, 1 << 7, 1 << 23, 1 << 18)


def test_classify_free_blocks_and_cold_lru_pages() -> None:
    words = array.array("Q", [
        SLAB,                 # 0 kernel: neither
        BUDDY, 0, 0, 0,       # 1-4 a free order-2 block (only its head says BUDDY)
        LRU,                  # 5 inactive, unreferenced: cold
        LRU | ANON,           # 6 cold anon
        LRU | ACTIVE,         # 7 active: not cold
        LRU | REF,            # 8 referenced: not cold
        LRU | UNEVICTABLE,    # 9 pinned: not cold
        OFFLINE,              # 10 ballooned: free
        0,                    # 11 follows a free page: still that block
    ])
    free, cold = op.classify(words)
    assert free == [[1, 4], [10, 2]]
    assert cold == [[5, 2]]


def test_cold_pages_reads_in_chunks_and_bounds_its_answer(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(op, "_CHUNK", 4)
    monkeypatch.setattr(op, "MAX_RUNS", 2)
    words = array.array("Q", [BUDDY, 0, SLAB, LRU, LRU, LRU, SLAB, SLAB, SLAB, BUDDY])
    path = tmp_path / "kpageflags"
    path.write_bytes(words.tobytes())
    r = op.cold_pages(str(path))
    assert r["pfns"] == 10 and r["free"] == [[0, 2], [9, 1]]
    assert r["cold"] == [[3, 3]] and not r["truncated"]  # one run across the chunk boundary
    words.extend([LRU, SLAB, LRU, SLAB])  # two more cold runs: the two largest are kept
    path.write_bytes(words.tobytes())
    r = op.cold_pages(str(path))
    assert r["truncated"] and r["cold"] == [[3, 3], [10, 1]] and r["cold_pages"] == 4
