"""SymFlex's address translation: sector → (lbn, offset) → pbn·2048 + offset, and its byte form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from symbiont.ssdcache.layout import (
    BLOCK_SIZE,
    SECTOR_SIZE,
    SECTORS_PER_BLOCK,
    UNBACKED,
    Unbacked,
    expand,
    ranges,
    segments,
    translate_range,
    translate_sector,
)


def test_geometry_is_the_seeds() -> None:
    assert BLOCK_SIZE == 1 << 20 and SECTOR_SIZE == 512 and SECTORS_PER_BLOCK == 2048


def test_the_slides_worked_example() -> None:
    # lbn 2 → pbn 10: offset 4 lands on physical sector 10·2048 + 4 = 20484 (the slide's result) ...
    assert translate_sector(2 * 2048 + 4, lambda lbn: {2: 10}[lbn]) == 20484
    # ... and the slide's "sector 5000" is lbn 2, offset 904 by the same formula.
    assert divmod(5000, 2048) == (2, 904)
    assert translate_sector(5000, lambda lbn: {2: 10}[lbn]) == 10 * 2048 + 904


def test_unbacked_block_raises_with_its_lbn() -> None:
    with pytest.raises(Unbacked) as ei:
        translate_sector(3 * 2048, lambda lbn: UNBACKED)
    assert ei.value.lbn == 3
    with pytest.raises(Unbacked) as ei:
        translate_range(BLOCK_SIZE - 512, 1024, lambda lbn: 7 if lbn == 0 else UNBACKED)
    assert ei.value.lbn == 1


def test_segments_split_at_block_boundaries() -> None:
    assert list(segments(BLOCK_SIZE - 4096, 8192)) == [(0, BLOCK_SIZE - 4096, 4096), (1, 0, 4096)]
    assert list(segments(0, 3 * BLOCK_SIZE)) == [(0, 0, BLOCK_SIZE), (1, 0, BLOCK_SIZE), (2, 0, BLOCK_SIZE)]


def test_physically_contiguous_blocks_merge_into_one_piece() -> None:
    pieces = translate_range(0, 2 * BLOCK_SIZE, {0: 5, 1: 6}.__getitem__)
    assert pieces == [(5 * BLOCK_SIZE, 0, 2 * BLOCK_SIZE)]
    pieces = translate_range(0, 2 * BLOCK_SIZE, {0: 6, 1: 5}.__getitem__)
    assert pieces == [(6 * BLOCK_SIZE, 0, BLOCK_SIZE), (5 * BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE)]


maps = st.lists(st.integers(0, 1000), min_size=8, max_size=8, unique=True)


@given(maps, st.integers(0, 8 * SECTORS_PER_BLOCK - 1), st.integers(1, 3 * SECTORS_PER_BLOCK))
def test_byte_translation_agrees_with_the_sector_formula(pbns: list[int], sector: int, nsect: int) -> None:
    nsect = min(nsect, 8 * SECTORS_PER_BLOCK - sector)
    pieces = translate_range(sector * SECTOR_SIZE, nsect * SECTOR_SIZE, pbns.__getitem__)
    # Every sector of the request lands where the seed's formula says, exactly once, in order.
    got = []
    for phys, boff, n in pieces:
        assert phys % SECTOR_SIZE == 0 and boff % SECTOR_SIZE == 0 and n % SECTOR_SIZE == 0
        got += [(boff // SECTOR_SIZE + i, phys // SECTOR_SIZE + i) for i in range(n // SECTOR_SIZE)]
    assert got == [(i, translate_sector(sector + i, pbns.__getitem__)) for i in range(nsect)]


@given(st.sets(st.integers(0, 5000), max_size=200))
def test_runs_round_trip(values: set[int]) -> None:
    r = ranges(values)
    assert expand(r) == sorted(values)
    assert all(n >= 1 for _, n in r)
    assert all(a[0] + a[1] < b[0] for a, b in zip(r, r[1:], strict=False))
