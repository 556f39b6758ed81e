"""overcommit-density's pure parts: criteria, percentiles, the zram share, rate lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiont_research.experiments.framework import ExperimentError, coerce_params, registry
from symbiont_research.experiments.overcommit import (
    judge,
    percentile,
    rates_since,
    seconds_until,
    zram_share_mib,
)


def test_percentile_is_nearest_rank() -> None:
    vals = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(vals, 50) == 50.0
    assert percentile(vals, 99) == 99.0
    assert percentile([0.1, 0.2, 5.0], 99) == 5.0  # three pings: p99 is the slowest
    assert percentile([0.3], 50) == 0.3


def test_zram_share_prorates_compressed_size_by_swapped_pages() -> None:
    share = zram_share_mib({"a": 300, "b": 100, "c": 0}, used_kib=400, mem_used_total=200 << 20)
    assert share == pytest.approx({"a": 150.0, "b": 50.0, "c": 0.0})
    assert zram_share_mib({"a": 10}, used_kib=0, mem_used_total=0) == {"a": 0.0}


def test_judge_names_the_first_failing_criterion() -> None:
    assert judge([0.95, 0.92], [0.01, 0.2, 0.5], 0, 0.9, 1.0) == ""
    assert "OOM" in judge([1.0], [0.01], 2, 0.9, 1.0)
    assert "throughput 0.85" in judge([0.95, 0.85], [0.01], 0, 0.9, 1.0)
    assert "did not answer" in judge([1.0], [0.01, None], 0, 0.9, 1.0)
    assert "p99 1.50 s" in judge([1.0], [0.01] * 10 + [1.5], 0, 0.9, 1.0)
    # 200 pings, one slow: the 99th percentile is still fast
    assert judge([1.0], [0.01] * 199 + [3.0], 0, 0.9, 1.0) == ""


def test_rates_since_reads_whole_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"boot noise\nSYMRATE 120.50\n# \nSYMRATE 99.00\nSYMRATE 1")
    vals, off = rates_since(log, 0)
    assert vals == [120.5, 99.0]
    with log.open("ab") as fh:
        fh.write(b"10.25\n")
    vals, off2 = rates_since(log, off)
    assert vals == [110.25] and off2 == log.stat().st_size
    assert rates_since(tmp_path / "missing.log", 7) == ([], 7)


def test_console_read_lines_whole_lines_from_an_offset(tmp_path: Path) -> None:
    """The console-log reader both experiments poll: whole lines only, the partial last one kept
    for the next read; a log that vanished or shrank below the offset gives nothing."""
    from symbiont_research.lab.console import read_lines

    log = tmp_path / "console.log"
    log.write_bytes(b"a\r\n\nb c\npart")
    assert read_lines(log, 0) == ([b"a\r", b"", b"b c"], 8)
    assert read_lines(log, 2) == ([b"", b"", b"b c"], 8)  # from mid-line: its tail is a line
    assert read_lines(log, 8) == ([], 8)  # only a partial line: nothing, offset kept
    log.write_bytes(b"no newline at all")
    assert read_lines(log, 0) == ([], 0)
    assert read_lines(log, 100) == ([], 100)  # shrank below the offset: wait for it to grow
    assert read_lines(tmp_path / "missing.log", 7) == ([], 7)


def test_registered_with_its_parameters() -> None:
    exp = registry()["overcommit-density"]
    assert exp.part == "overcommit" and {"root", "libvirt", "vm"} <= exp.needs
    params = coerce_params(exp, ["steps=4,8", "configs=stock,full", "idle_after_s=12"])
    assert params["steps"] == [4, 8] and params["configs"] == ["stock", "full"] and params["idle_after_s"] == 12.0
    with pytest.raises(ExperimentError, match="unknown parameter"):
        coerce_params(exp, ["nodes=3"])


def test_seconds_until_a_utc_clock_time() -> None:
    import datetime as dt

    now = dt.datetime(2026, 12, 5, 11, 20, 30, tzinfo=dt.UTC).timestamp()
    assert seconds_until("11:58", now) == 37 * 60 + 30
    assert seconds_until("11:20", now) == 24 * 3600 - 30  # passed: tomorrow
    with pytest.raises(ValueError, match="end_by"):
        seconds_until("25:00", now)


def test_restore_ksm_puts_every_changed_tunable_back_run_last(tmp_path: Path) -> None:
    from symbiont.host.ksm import Ksm
    from symbiont_research.experiments.overcommit import restore_ksm

    for name, value in {"run": "1", "pages_to_scan": "444", "sleep_millisecs": "20",
                        "advisor_mode": "none [scan-time]", "use_zero_pages": "0"}.items():
        (tmp_path / name).write_text(value + "\n")
    writes: list[str] = []

    class Recording(Ksm):
        def write(self, name: str, value: int | str) -> None:
            writes.append(name)
            (self.root / name).write_text(f"{value}\n")

    saved: dict[str, int | str] = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20,
                                   "advisor_mode": "none", "use_zero_pages": 0}
    notes: list[str] = []
    changed = restore_ksm(Recording(tmp_path), saved, notes.append)
    assert sorted(changed) == ["advisor_mode", "pages_to_scan", "run"]
    assert writes[-1] == "run"
    assert Ksm(tmp_path).read("pages_to_scan") == 100 and Ksm(tmp_path).read("run") == 0
    assert not notes


def test_restore_ksm_unmerges_only_for_the_tunables_busy_while_merged(tmp_path: Path) -> None:
    """max_page_sharing needs run=2 first, and run goes back last even though it read right;
    use_zero_pages does not (the kernel takes it at any time): nothing is unmerged for it."""
    from symbiont.host.ksm import Ksm
    from symbiont_research.experiments.overcommit import restore_ksm

    for name, value in {"run": "1", "use_zero_pages": "1", "max_page_sharing": "512"}.items():
        (tmp_path / name).write_text(value + "\n")
    writes: list[tuple[str, str]] = []

    class Recording(Ksm):
        def write(self, name: str, value: int | str) -> None:
            writes.append((name, str(value)))
            (self.root / name).write_text(f"{value}\n")

    notes: list[str] = []
    assert restore_ksm(Recording(tmp_path), {"run": 1, "use_zero_pages": 0, "max_page_sharing": 512},
                       notes.append) == ["use_zero_pages"]
    assert writes == [("use_zero_pages", "0")]
    writes.clear()
    (tmp_path / "max_page_sharing").write_text("256\n")
    assert restore_ksm(Recording(tmp_path), {"run": 1, "use_zero_pages": 0, "max_page_sharing": 512},
                       notes.append) == ["max_page_sharing", "run"]
    assert writes == [("run", "2"), ("max_page_sharing", "512"), ("run", "1")]
    assert not notes


def _fleet_with_memory(monkeypatch: pytest.MonkeyPatch, avails: list[int]) -> tuple[object, object]:
    """A Fleet whose host MemAvailable follows ``avails`` (MiB, one value per 2 s poll)."""
    import types

    from symbiont_research.experiments import overcommit

    clock = [0.0]
    monkeypatch.setattr(overcommit.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(overcommit.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    seq = iter(avails)
    last = [avails[0]]

    def vm() -> object:
        last[0] = next(seq, last[0])
        return types.SimpleNamespace(available=last[0] << 20)

    fleet = overcommit.Fleet(None, "full", None, None, None, None, "p-", Path("/nonexistent"),
                             {"min_avail_mib": 1536, "memory_mib": 512, "mem_wait_s": 45.0}, lambda _m: None)
    return fleet, types.SimpleNamespace(virtual_memory=vm)


def test_adding_waits_while_parks_give_memory_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, ps = _fleet_with_memory(monkeypatch, [1600] * 10 + [1800] * 15 + [2200])
    assert fleet._room(ps, lambda: "") == ""  # progress within each 45 s window: it waited


def test_adding_stops_when_no_memory_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, ps = _fleet_with_memory(monkeypatch, [1700])
    why = fleet._room(ps, lambda: "")
    assert "MemAvailable 1700 MiB < 2048 MiB" in why and "45 s" in why
