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
