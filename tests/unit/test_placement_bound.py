"""Lower bounds on hosts needed: volume, LP relaxation, exact MILP."""

from __future__ import annotations

import numpy as np
import pytest

from symbiont.placement.bound import LowerBound, lower_bound, milp_bound, quality, volume_bound


def test_volume_bound_per_dimension() -> None:
    # capacity (10, 10): cpu total 4+4+4 = 12 -> 2 hosts; mem total 3 -> 1. Max = 2.
    dem = np.array([[4, 1], [4, 1], [4, 1]], dtype=float)
    assert volume_bound(dem, np.full((5, 2), 10.0)) == 2


def test_volume_bound_heterogeneous_takes_largest_hosts_first() -> None:
    # total 25 over hosts of 20, 4, 4, 4: 20 + 4 + 4 = 28 >= 25 -> 3 hosts (one 20 and two 4s).
    dem = np.array([[4.0]] * 5 + [[5.0]])
    assert volume_bound(dem, np.array([[4.0], [20.0], [4.0], [4.0]])) == 3


def test_volume_bound_counts_vms_over_half_a_host() -> None:
    # three VMs of 6 on hosts of 10: total 18 -> 2 by volume, but no two fit together -> 3.
    assert volume_bound(np.array([[6.0], [6.0], [6.0]]), np.full((3, 1), 10.0)) == 3


def test_milp_beats_volume_when_items_do_not_pack() -> None:
    # five VMs of 4 on hosts of 10: volume ceil(20/10) = 2, but a host holds only two (4+4+4 = 12 > 10),
    # so 3 hosts are needed; the MILP proves it. The LP relaxation cannot see integrality: 2.
    dem = np.full((5, 1), 4.0)
    eff = np.full((5, 1), 10.0)
    assert volume_bound(dem, eff) == 2
    exact = milp_bound(dem, eff, time_limit=10)
    assert (exact.value, exact.method, exact.optimal) == (3, "milp", True)
    lp = milp_bound(dem, eff, relax=True)
    assert (lp.value, lp.method) == (2, "lp")


def test_two_dimensional_milp() -> None:
    # hosts (10, 10); VMs (6, 1), (1, 6), (6, 1), (1, 6): volume 14/10 -> 2 and the pairs
    # (6,1)+(1,6) = (7,7) fit, so 2 hosts are optimal.
    dem = np.array([[6, 1], [1, 6], [6, 1], [1, 6]], dtype=float)
    lb = milp_bound(dem, np.full((4, 2), 10.0))
    assert lb.value == 2 and lb.optimal


def test_lower_bound_picks_method_by_size() -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(1, 6, size=(12, 2)).astype(float)
    eff = np.full((12, 2), 10.0)
    assert lower_bound(small, eff).method in ("milp", "volume")
    big = rng.integers(1, 6, size=(2000, 2)).astype(float)
    lb = lower_bound(big, np.full((2000, 2), 10.0))
    assert lb.method == "volume" and lb.value == volume_bound(big, np.full((2000, 2), 10.0))
    medium = rng.integers(1, 6, size=(150, 2)).astype(float)
    assert lower_bound(medium, np.full((150, 2), 10.0), exact_max_vars=100).method in ("lp", "volume")


def test_time_limited_milp_still_returns_a_valid_bound() -> None:
    rng = np.random.default_rng(5)
    dem = rng.uniform(1, 5, size=(40, 3))
    eff = np.full((40, 3), 10.0)
    lb = milp_bound(dem, eff, time_limit=0.05)
    assert lb.value >= volume_bound(dem, eff)
    assert isinstance(lb, LowerBound) and lb.detail


def test_empty_and_errors() -> None:
    assert lower_bound(np.zeros((0, 2)), np.full((3, 2), 1.0)).value == 0
    with pytest.raises(ValueError, match="fits no host even when alone"):
        lower_bound(np.array([[11.0]]), np.array([[10.0]]))
    with pytest.raises(ValueError, match="finite and non-negative"):
        volume_bound(np.array([[-1.0]]), np.array([[10.0]]))


def test_quality_ratio() -> None:
    assert quality(11, LowerBound(10, "lp")) == pytest.approx(1.1)
    assert quality(0, 0) == 1.0


def test_martello_toth_l2_beats_volume_and_matches_its_definition() -> None:
    from symbiont.placement.bound import l2_bound, quick_bound

    # C = 10: three 7s each need a host; the 4s cannot join them (7 + 4 > 10), and three 4s need
    # two more hosts. Volume: ceil(33/10) = 4 (and 3 VMs over half a host); L2 (K = 4): 3 + ceil(12/10) = 5.
    w = np.array([7.0, 7.0, 7.0, 4.0, 4.0, 4.0])
    assert volume_bound(w[:, None], np.full((6, 1), 10.0)) == 4
    assert l2_bound(w, 10.0) == 5
    lb = quick_bound(w[:, None], np.full((6, 1), 10.0))
    assert (lb.value, lb.method) == (5, "l2")

    def l2_by_definition(w: list[float], c: float) -> int:
        best = 0
        for k in [0.0] + [x for x in w if x <= c / 2]:
            j1 = [x for x in w if x > c - k]
            j2 = [x for x in w if c / 2 < x <= c - k]
            j3 = [x for x in w if k <= x <= c / 2]
            best = max(best, len(j1) + len(j2) + max(0, -(-int(sum(j3) - (len(j2) * c - sum(j2))) // int(c))))
        return best

    rng = np.random.default_rng(0)
    for _ in range(300):
        ws = rng.integers(1, 100, rng.integers(1, 12)).astype(float)
        assert l2_bound(ws, 100.0) == l2_by_definition(list(ws), 100.0)


def test_conflict_clique_bound_for_vectors() -> None:
    from symbiont.placement.bound import clique_bound, quick_bound

    # Hosts (10, 10). No two of these fit together ((6,4.5)+(4.5,6) = 10.5 in each), so 3 hosts are
    # needed; volume sees 16/10 -> 2, and only two VMs exceed half a host in a single dimension.
    dem = np.array([[6.0, 4.5], [4.5, 6.0], [5.5, 5.5]])
    eff = np.full((3, 2), 10.0)
    assert volume_bound(dem, eff) == 2
    assert clique_bound(dem, eff) == 3
    assert quick_bound(dem, eff).value == 3


def test_lower_bound_honours_its_time_limit_as_a_whole() -> None:
    import time

    # 500 VMs x ~300 hosts: building the LP alone took longer than the limit (1.4 s for 0.5 s).
    rng = np.random.default_rng(3)
    dem = rng.uniform(1, 6, (500, 2))
    t = time.perf_counter()
    lb = lower_bound(dem, np.full((500, 2), 10.0), time_limit=0.5)
    assert time.perf_counter() - t < 0.9
    assert lb.value >= volume_bound(dem, np.full((500, 2), 10.0)) and "time limit" in lb.detail
    # time_limit 0: the cheap bounds only, immediately
    assert lower_bound(dem, np.full((500, 2), 10.0), time_limit=0).value == lb.value


def test_relative_tolerance_with_tiny_units() -> None:
    # Capacities of 1e-10: a VM of 5e-10 is five times the host. A fixed 1e-9 slack let it fit.
    with pytest.raises(ValueError, match="fits no host even when alone"):
        volume_bound(np.array([[5e-10]]), np.array([[1e-10]]))
