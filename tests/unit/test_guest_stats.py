"""Guest stats are untrusted: only known, numeric, bounded data passes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert s["loadavg"] == []  # positional (1, 5, 15 min): one bad value voids all three
    assert "unexpected" not in s


def test_bounds_the_number_of_keys() -> None:
    s = sanitize({"meminfo": {f"k{i}": i for i in range(10000)}})
    assert len(s["meminfo"]) == 256


@pytest.mark.parametrize("raw", [None, [], "stats", 3])
def test_non_objects_are_refused(raw) -> None:
    with pytest.raises(ValueError):
        sanitize(raw)


# -- absurd values are dropped at ingestion (issue 16 item 13) -----------------------------

GiB = 1 << 30


def test_absurd_values_of_the_issue_are_dropped() -> None:
    raw = {
        "meminfo": {"MemTotal": -1, "MemAvailable": -9e18, "Cached": 10},
        "psi": {"memory": {"some_avg10": 1e300, "some_avg60": 3.5, "some_total_us": 10**12}},
        "cpus": {"online": list(range(4096)), "present": list(range(4096))},
        "loadavg": [-1.0, 0.5, 0.5],
        "uptime_s": -5,
        "cpu_times": {"user": -3, "idle": 7},
    }
    s = sanitize(raw, max_mem_bytes=4 * GiB, max_vcpus=4)
    assert s["meminfo"] == {}  # no MemTotal: its parts cannot be checked either
    assert s["psi"]["memory"] == {"some_avg60": 3.5, "some_total_us": 10**12}
    assert s["cpus"]["online"] == [0, 1, 2, 3] and s["cpus"]["count_online"] == 4
    assert s["cpus"]["present"] == [0, 1, 2, 3]
    assert s["loadavg"] == [] and s["uptime_s"] is None
    assert s["cpu_times"] == {"idle": 7}


def test_memory_is_bounded_by_the_domain() -> None:
    mi = {"MemTotal": 8 * GiB, "MemAvailable": 1 * GiB}
    assert sanitize({"meminfo": mi}, max_mem_bytes=4 * GiB)["meminfo"] == {}
    assert sanitize({"meminfo": mi}, max_mem_bytes=8 * GiB)["meminfo"] == mi
    assert sanitize({"meminfo": {"MemTotal": 1 << 51}})["meminfo"] == {}
    assert sanitize({"meminfo": {"MemTotal": GiB, "MemFree": 2 * GiB}})["meminfo"] == {"MemTotal": GiB}


def test_plausible_real_guest_stats_pass_unchanged() -> None:
    raw = {
        "uptime_s": 120.5,
        "loadavg": [0.1, 0.2, 0.3],
        "meminfo": {"MemTotal": 480 << 20, "MemFree": 300 << 20, "MemAvailable": 400 << 20,
                    "SwapTotal": 0, "SwapFree": 0, "VmallocTotal": 34359738367 << 10, "HugePages_Total": 0},
        "vmstat": {"pgfault": 12345, "nr_free_pages": 70000},
        "psi": {"cpu": {"some_avg10": 0.5, "some_total_us": 99}, "memory": {"full_avg300": 0.0}, "io": {}},
        "cpus": {"online": [0, 1], "present": [0, 1, 2, 3]},
        "cpu_times": {"user": 10, "idle": 1000},
    }
    s = sanitize(raw, max_mem_bytes=512 << 20, max_vcpus=4)
    for key in ("meminfo", "vmstat", "loadavg", "uptime_s", "cpu_times"):
        assert s[key] == raw[key]
    assert s["psi"] == raw["psi"] and s["cpus"]["online"] == [0, 1]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=12), kids, max_size=6),
    max_leaves=40,
)
_keys = st.sampled_from(["MemTotal", "MemFree", "MemAvailable", "Cached", "SwapTotal", "SwapFree", "Other",
                         "some_avg10", "full_avg60", "some_total_us", "user"])
_nums = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
_section = st.dictionaries(_keys, _nums, max_size=8) | _json


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "meminfo": _section, "vmstat": _section, "cpu_times": _section, "uptime_s": _nums | _json,
            "loadavg": st.lists(_nums, max_size=4) | _json,
            "psi": st.fixed_dictionaries({}, optional={"cpu": _section, "memory": _section, "io": _section}),
            "cpus": st.fixed_dictionaries({}, optional={"online": st.lists(st.integers(-10, 5000), max_size=40) | _json,
                                                        "present": st.lists(st.integers(-10, 5000), max_size=40)}),
        },
    ),
    st.none() | st.integers(1, 1 << 40),
    st.none() | st.integers(1, 512),
)
def test_sanitized_stats_are_always_within_bounds(raw, max_mem, max_vcpus) -> None:
    s = sanitize(raw, max_mem_bytes=max_mem, max_vcpus=max_vcpus)

    def finite_nonneg(v) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0

    mi = s["meminfo"]
    assert all(finite_nonneg(v) and v <= 1 << 50 for v in mi.values())
    if "MemTotal" in mi and max_mem is not None:
        assert mi["MemTotal"] <= max_mem
    for part in ("MemFree", "MemAvailable", "Cached"):
        if part in mi:
            assert mi[part] <= mi["MemTotal"]
    for section in (s["vmstat"], s["cpu_times"], *s["psi"].values()):
        assert all(finite_nonneg(v) for v in section.values())
    for res in s["psi"].values():
        assert all(v <= 100 for k, v in res.items() if "_avg" in k)
    ncpu = max_vcpus or 4096
    assert all(0 <= c < ncpu for c in s["cpus"]["online"] + s["cpus"]["present"])
    assert s["cpus"]["count_online"] == len(s["cpus"]["online"]) <= ncpu
    assert len(s["loadavg"]) in (0, 1, 2, 3) and all(finite_nonneg(x) for x in s["loadavg"])
    assert s["uptime_s"] is None or finite_nonneg(s["uptime_s"])
