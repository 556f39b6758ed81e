"""Guest stats are untrusted: only known, numeric, bounded data passes."""

from __future__ import annotations

import math

import pytest

from symbiont.guest_stats import sanitize


def test_keeps_numbers_and_drops_junk() -> None:
    raw = {
        "meminfo": {"MemTotal": 100, "Evil": "rm -rf", "NaN": math.nan, "Big": 2**70, "B": True},
        "vmstat": {"pgfault": 5},
        "psi": {"memory": {"some_avg10": 1.5}, "cpu": "x"},
        "cpus": {"online": [0, 1, 1, -3, "2", 99999], "present": [0, 1, 2]},
        "loadavg": [0.1, "x", 0.3],
        "unexpected": {"a": 1},
    }
    s = sanitize(raw)
    assert s["meminfo"] == {"MemTotal": 100}
    assert s["psi"]["memory"] == {"some_avg10": 1.5} and s["psi"]["cpu"] == {}
    assert s["cpus"]["online"] == [0, 1] and s["cpus"]["count_online"] == 2
    assert s["loadavg"] == [0.1, 0.3]
    assert "unexpected" not in s


def test_bounds_the_number_of_keys() -> None:
    s = sanitize({"meminfo": {f"k{i}": i for i in range(10000)}})
    assert len(s["meminfo"]) == 256


@pytest.mark.parametrize("raw", [None, [], "stats", 3])
def test_non_objects_are_refused(raw) -> None:
    with pytest.raises(ValueError):
        sanitize(raw)
