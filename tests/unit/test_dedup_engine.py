"""The hashing engine finds exactly the planted duplicates — also when a test hash forces collisions
that only the byte compare can resolve — and reports potential per VM, across VMs and per subset."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symbiont.dedup.backends import PAGE_SIZE, SimulatedGpuBackend, as_pages
from symbiont.dedup.engine import BufferSource, Engine, EngineError, PageSource, ScanReport
from symbiont_research.experiments.dedup import synthetic_image


def _truth(images: dict[str, np.ndarray]) -> tuple[set[frozenset[tuple[str, int]]], int]:
    """Ground truth by Python bytes equality: the duplicate classes and the saveable frames."""
    by_content: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    for name, img in images.items():
        for i, page in enumerate(img):
            by_content[page.tobytes()].append((name, i))
    classes = {frozenset(m) for m in by_content.values() if len(m) >= 2}
    return classes, sum(len(c) - 1 for c in classes)


def _classes(rep: ScanReport) -> set[frozenset[tuple[str, int]]]:
    out: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for s, i, c in zip(rep.dup_src.tolist(), rep.dup_idx.tolist(), rep.dup_class.tolist(), strict=True):
        out[c].add((rep.sources[s].name, i))
    return {frozenset(v) for v in out.values()}


def _planted(seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(300, PAGE_SIZE), dtype=np.uint8)
    b = rng.integers(0, 256, size=(200, PAGE_SIZE), dtype=np.uint8)
    c = rng.integers(0, 256, size=(100, PAGE_SIZE), dtype=np.uint8)
    b[10:60] = a[100:150]  # 50 pages shared by a and b
    c[0:20] = a[100:120]  # 20 of them also in c
    a[200:205] = a[7]  # 5 extra copies of a[7] inside a
    a[250:260] = 0  # 10 zero pages in a, 5 in c
    c[90:95] = 0
    b[199] = b[0]  # one intra pair in b
    return {"a": a, "b": b, "c": c}


def test_finds_exactly_the_planted_duplicates() -> None:
    images = _planted()
    truth_classes, truth_saveable = _truth(images)
    rep = Engine(batch_pages=64, confirm_pages=32).scan([BufferSource(k, v) for k, v in images.items()])
    assert _classes(rep) == truth_classes
    assert rep.saveable == truth_saveable == 50 + 20 + 5 + 14 + 1
    assert rep.zero_pages == 15 and rep.collision_groups == 0 and rep.false_candidates == 0
    a, b, c = (rep.source(n) for n in "abc")
    assert (a.intra_saveable, b.intra_saveable, c.intra_saveable) == (5 + 9, 1, 4)
    assert rep.intra_saveable == 19 and rep.cross_saveable == rep.saveable - 19
    assert (a.cross_pages, b.cross_pages, c.cross_pages) == (50 + 10, 50, 20 + 5)
    assert sum(s.attributed_saveable for s in rep.sources) == pytest.approx(rep.saveable)
    # subsets: only a and b merged; a alone
    assert rep.saveable_for(["a", "b"]) == 50 + 5 + 9 + 1
    assert rep.saveable_for(["a"]) == a.intra_saveable
    assert rep.saveable_for(["a", "b", "c"], exclude_zero=True) == rep.saveable - 14
    assert rep.remaining is None and rep.remaining_for(["a"]) is None  # buffers know no frame numbers


def test_forced_collisions_are_resolved_by_the_byte_compare() -> None:
    images = _planted()
    truth_classes, truth_saveable = _truth(images)
    sources = [BufferSource(k, v) for k, v in images.items()]

    def weak(pages: np.ndarray) -> np.ndarray:  # 4 buckets: almost every pair of pages collides
        return (pages[:, 1] % 4).astype(np.uint64)

    rep = Engine(hash_fn=weak, confirm_pages=64).scan(sources)
    assert _classes(rep) == truth_classes and rep.saveable == truth_saveable
    assert rep.candidate_groups == 4 and rep.collision_groups == 4
    dup_pages = sum(len(c) for c in truth_classes)
    assert rep.false_candidates == 600 - dup_pages  # every other page was a candidate and got rejected
    # a single hash value for everything, streamed in pieces smaller than the run (the big-run path)
    rep1 = Engine(hash_fn=lambda p: np.zeros(p.shape[0], np.uint64), confirm_pages=16).scan(sources)
    assert _classes(rep1) == truth_classes and rep1.candidate_groups == 1


def test_collision_of_the_real_hash_between_different_pages_is_rejected() -> None:
    # A pure multilinear sum mod 2**64 would collide on pages that differ by 2**63 in two words;
    # xsm64 does not, and even a forced collision never merges different content.
    p = np.zeros((2, PAGE_SIZE), dtype=np.uint8)
    w = p.view(np.uint64)
    w[1, 3] = np.uint64(1 << 63)
    w[1, 9] = np.uint64(1 << 63)
    rep = Engine().scan([BufferSource("x", p)])
    assert rep.saveable == 0 and rep.candidate_groups == 0


class _Mutating(BufferSource):
    """A source whose pages change between hashing and confirmation (like a busy guest)."""

    def __init__(self, name: str, data: np.ndarray, change: list[int]) -> None:
        super().__init__(name, data)
        self.change = change

    def read(self, indices: np.ndarray) -> np.ndarray:
        for i in self.change:
            self.pages[i, 0] ^= 0xFF
        self.change = []
        return super().read(indices)


def test_pages_that_change_before_the_compare_are_volatile_not_shared() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(40, PAGE_SIZE), dtype=np.uint8)
    img[20:30] = img[0]  # class of 11 pages
    img[30:32] = img[1]  # class of 3 pages (1, 30, 31)
    rep = Engine().scan([_Mutating("v", img.copy(), change=[25, 30])])
    assert rep.volatile_pages == 2 and rep.source("v").volatile_pages == 2
    assert rep.saveable == 9 + 1  # 10 stable pages of the first class, 2 of the second
    assert {len(c) for c in _classes(rep)} == {10, 2}


def test_frame_numbers_tell_what_is_merged_and_what_remains() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(8, PAGE_SIZE), dtype=np.uint8)
    b = a.copy()  # 8 cross-VM pairs
    pa = np.arange(1, 9, dtype=np.uint64)
    pb = np.arange(101, 109, dtype=np.uint64)
    pb[:5] = pa[:5]  # 5 pairs already share a frame (merged), 3 are not
    rep = Engine().scan([BufferSource("a", a, pfns=pa), BufferSource("b", b, pfns=pb)])
    assert rep.saveable == 8 and rep.remaining == 3
    assert rep.source("a").merged_pages == 5 == rep.source("b").merged_pages
    assert rep.remaining_for(["a"]) == 0 and rep.remaining_for(["a", "b"]) == 3
    sub = rep.subset(["a", "b"])
    assert (sub["saveable_pages"], sub["saved_pages"], sub["merged_pages"]) == (8, 5, 10)


def test_candidate_regions_are_runs_of_adjacent_duplicates() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(64, PAGE_SIZE), dtype=np.uint8)
    b = rng.integers(0, 256, size=(64, PAGE_SIZE), dtype=np.uint8)
    b[4:20] = a[30:46]  # 16-page region in each
    b[40] = a[0]  # single pages
    rep = Engine().scan([BufferSource("a", a, base_addr=0x100000), BufferSource("b", b, base_addr=0x200000)])
    top = rep.regions[:2]
    assert {(r["source"], r["start"], r["pages"]) for r in top} == {("a", hex(0x100000 + 30 * PAGE_SIZE), 16),
                                                                  ("b", hex(0x200000 + 4 * PAGE_SIZE), 16)}
    assert all(r["cross_pages"] == 16 for r in top)
    assert rep.source("a").regions == 2 and rep.source("b").regions == 2


def test_cpu_and_simulated_gpu_reports_are_identical() -> None:
    images, truth = synthetic_image(3, 512, 0.4, 0.08, 0.1, seed=5)
    sources = [BufferSource(k, v) for k, v in images.items()]
    r1 = Engine().scan(sources)
    r2 = Engine(SimulatedGpuBackend("T4"), batch_pages=100).scan(sources)
    assert r1.saveable == r2.saveable == truth
    for f in ("dup_src", "dup_idx", "dup_class", "zero_classes"):
        assert np.array_equal(getattr(r1, f), getattr(r2, f)), f
    assert r1.regions == r2.regions
    assert r2.timings["device_s"] > 0 and r1.timings["device_s"] == 0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="whole number"):
        as_pages(b"x" * 5000)
    with pytest.raises(EngineError, match="unique"):
        Engine().scan([BufferSource("a", b"\0" * PAGE_SIZE), BufferSource("a", b"\0" * PAGE_SIZE)])
    with pytest.raises(EngineError, match="one uint64 per page"):
        Engine(hash_fn=lambda p: np.zeros(1, np.uint64)).scan([BufferSource("a", b"\0" * 2 * PAGE_SIZE)])

    class Short(BufferSource):
        def batches(self, batch_pages: int):  # type: ignore[override]
            yield self.pages[:1]

    with pytest.raises(EngineError, match="expected 2"):
        Engine().scan([Short("s", b"\1" * 2 * PAGE_SIZE)])
    assert isinstance(BufferSource("e", b""), PageSource)
    empty = Engine().scan([BufferSource("e", b"")])
    assert empty.pages == 0 and empty.saveable == 0


# A small alphabet of page contents makes duplicates, and collisions under the weak hash, likely.
_alphabet = st.lists(st.integers(0, 5), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vms=st.lists(_alphabet, min_size=1, max_size=3), weak=st.booleans(), confirm=st.integers(2, 9))
def test_property_engine_matches_bytes_equality(vms: list[list[int]], weak: bool, confirm: int) -> None:
    rng = np.random.default_rng(len(vms))
    palette = rng.integers(0, 256, size=(6, PAGE_SIZE), dtype=np.uint8)
    palette[5] = 0
    images = {f"vm{i}": palette[np.array(sym)] for i, sym in enumerate(vms)}
    truth_classes, truth_saveable = _truth(images)
    hash_fn = (lambda p: (p[:, 0] & 1).astype(np.uint64)) if weak else None
    rep = Engine(hash_fn=hash_fn, confirm_pages=confirm, batch_pages=7).scan(
        [BufferSource(k, v) for k, v in images.items()]
    )
    assert _classes(rep) == truth_classes
    assert rep.saveable == truth_saveable
    assert rep.intra_saveable + rep.cross_saveable == rep.saveable
    assert sum(s.attributed_saveable for s in rep.sources) == pytest.approx(rep.saveable)
    for name in images:
        assert rep.saveable_for([name]) == rep.source(name).intra_saveable
