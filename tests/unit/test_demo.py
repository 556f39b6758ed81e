"""The demo's own arithmetic (issue 15 item 5): a VM's host memory counts shared and swapped
pages once, bad parameters fail before anything boots, and the report compares the phases."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiont_research.experiments import demo
from symbiont_research.experiments.framework import registry
from symbiont_research.lab.console import read_lines

ROLLUP = """55d0c0a00000-7ffd5f1f1000 ---p 00000000 00:00 0                          [rollup]
Rss:              300000 kB
Pss:              200000 kB
Pss_Anon:         190000 kB
Swap:             409600 kB
SwapPss:          204800 kB
Locked:                0 kB
"""


def test_host_memory_is_pss_plus_the_zram_share_of_its_swap() -> None:
    roll = demo.smaps_rollup_kib(ROLLUP)
    assert roll["Pss"] == 200000 and roll["SwapPss"] == 204800 and "Pss_Anon" in roll
    # 200000 KiB PSS + 204800 KiB swapped at 4:1 in zram = 200000 + 51200 KiB
    assert demo.host_mib(roll, 4.0) == pytest.approx((200000 + 51200) / 1024, abs=0.1)
    assert demo.host_mib(roll, None) == pytest.approx(200000 / 1024, abs=0.1)  # stock: no tier, swap not ours
    assert demo.host_mib({"Pss": 1024, "Swap": 4096}, 2.0) == pytest.approx(3.0)  # no SwapPss: Swap


def test_roles_and_bad_parameters_fail_before_booting() -> None:
    assert demo.roles(["a", "b", "c", "d"], 2) == {"a": "busy", "b": "busy", "c": "idle", "d": "idle"}
    p = dict(registry()["demo"].params)
    demo.check_params(p)  # the defaults overcommit: budget below vms × memory
    assert p["budget_mib"] < p["vms"] * p["memory_mib"] and 0 < p["busy"] < p["vms"]
    for bad, what in (({"busy": 0}, "busy"), ({"busy": p["vms"]}, "busy"), ({"vms": 1}, "vms"),
                      ({"budget_mib": p["vms"] * p["memory_mib"]}, "budget_mib"),
                      ({"budget_mib": p["vms"] * p["min_mib"] - 1}, "floors")):
        with pytest.raises(ValueError, match=what):
            demo.check_params({**p, **bad})


def test_report_compares_stock_and_symbiont_per_vm() -> None:
    phases = {"stock": {"a": 600.0, "b": 300.0}, "symbiont": {"a": 620.0, "b": 40.0}}
    rows = demo.report_rows(phases, {"a": "busy", "b": "idle"},
                            {"a": {"start_mib": 256, "end_mib": 480, "stock_rate": 40000.0, "symbiont_rate": 42000.0},
                             "b": {"parked": True, "ping_ms": 31.5, "start_mib": 256, "end_mib": 139}})
    assert rows[1] == {"vm": "b", "role": "idle", "stock_host_mib": 300.0, "symbiont_host_mib": 40.0,
                       "saved_mib": 260.0, "parked": True, "ping_ms": 31.5, "start_mib": 256, "end_mib": 139}
    lines = demo.format_report(rows, 1280)
    head1, head2, busy, idle, total, moved, rate = lines
    assert "guest MiB" in head1 and "k pages/s" in head1 and "start->end" in head2
    assert max(map(len, lines)) <= 78  # a piped run's console is 80 columns (the note indents by 2)
    # guest memory start -> end, host stock vs symbiont, thousands of pages/s in both phases
    assert busy.split() == ["VMa", "busy", "256->480", "600", "620", "40.0", "42.0", "no", "-"]
    assert idle.split() == ["VMb", "idle", "256->139", "300", "40", "-", "-", "yes", "32"]
    assert total.split()[:4] == ["all", "512->619", "900", "660"] and "budget 1280" in total
    assert moved == "guest memory moved: busy VMs +224 MiB, idle VMs -117 MiB"
    assert rate == "busy VMs' rate under symbiont / stock: 1.05"


def test_workload_rate_lines_from_the_console_log(tmp_path: Path) -> None:
    """The hog's SYMDEMO lines among console noise; a line still being written waits."""
    log = tmp_path / "console.log"
    data = b"login: root\r\nSYMDEMO 41234 184\r\n[  12.3] random kernel line\nSYMDEMO 39000 192\nSYMDEMO 38"
    log.write_bytes(data)
    lines, at = read_lines(log, 0)
    assert demo.hog_samples(lines) == [(41234.0, 184), (39000.0, 192)] and data[at:] == b"SYMDEMO 38"
    with log.open("ab") as fh:
        fh.write(b"000 200\nSYMDEMO 1 2")
    lines, at = read_lines(log, at)
    assert demo.hog_samples(lines) == [(38000.0, 200)]  # the partial line, once finished
    assert read_lines(log, at) == ([], at)  # "SYMDEMO 1 2": no newline yet
    assert "SYMDEMO" in demo.HOG and "/dev/ttyS0" in demo.HOG
    assert "now - last - slept" in demo.HOG  # pages per second of work: the pauses left out


def test_phase_rates_are_medians_without_the_starts() -> None:
    rows = [{"phase": ph, "vm": "a", "pages_per_s": r}
            for ph, rs in (("stock", [5.0, 9.0, 100.0, 110.0, 90.0]), ("symbiont", [1.0, 2.0, 120.0]))
            for r in rs]
    assert demo.phase_rates(rows, "stock") == {"a": 100.0}
    assert demo.phase_rates(rows, "symbiont") == {"a": 120.0}
    assert demo.phase_rates([{"phase": "stock", "vm": "a", "pages_per_s": 7.0}], "stock") == {"a": 7.0}
    assert demo.phase_rates(rows, "other") == {}


def test_peak_host_memory_of_a_phase() -> None:
    rows = [{"phase": ph, "t_s": t, "host_mib": m} for ph, t, m in (
        ("stock", 1.0, 900.0), ("stock", 1.0, 900.0), ("symbiont", 5.0, 700.0), ("symbiont", 5.0, 750.0),
        ("symbiont", 7.0, 500.0), ("symbiont", 7.0, 100.0))]
    assert demo.peak_total(rows, "symbiont") == (1450.0, 5.0)
    assert demo.peak_total(rows, "other") is None


def test_busy_memory_settles_only_after_a_quiet_window() -> None:
    def tl(vals: list[int]) -> list[dict]:
        return [{"vm": "a", "t_s": 2.0 * i, "balloon_actual_mib": v} for i, v in enumerate(vals)]

    assert not demo.settled(tl([256, 320, 384, 448]), ["a"], 4)  # still growing
    assert demo.settled(tl([256, 320, 480, 484, 488]), ["a"], 4)  # moved < 16 MiB over the last 4 s
    assert not demo.settled(tl([480, 484]), ["a"], 4)  # not observed long enough
    assert not demo.settled(tl([480, 484, 488]), ["a", "b"], 4)  # b never seen


def test_timeline_line_shows_memory_parking_and_the_last_lever() -> None:
    assert demo.lever_text(None) is None  # no lever moved yet: the cell shows none
    last = {"part": "memory", "action": "balloon", "age_s": 4.2,
            "reason": "policy: grant 64 MiB (under pressure; rho=0.0021)"}
    assert demo.lever_text(last) == "memory balloon: grant 64 MiB, 4 s ago"
    assert demo.lever_text({"part": "paging", "action": "park", "reason": ""}) == "paging park"
    long = {"part": "paging", "action": "park", "reason": "idle policy: idle for 16.2 s at 0.4 % of a vCPU"}
    assert demo.lever_text(long) == "paging park: idle policy: idle for 16.2 s at"  # whole words, <= 32
    line = demo.timeline_line(95.4, "symbiont", [
        {"label": "1", "role": "busy", "mib": 448.0, "parked": False, "lever": demo.lever_text(last)},
        {"label": "3", "role": "idle", "mib": 139.0, "parked": True, "lever": "paging park"},
        {"label": "4", "role": "idle", "mib": None, "parked": False, "lever": None}])
    assert line == ("t=  95s symbiont VM1 448 MiB (memory balloon: grant 64 MiB, 4 s ago) | "
                    "VM3 139 MiB parked (paging park) | VM4 ? MiB")
    assert "[" not in line  # the progress console would read [..] as markup and drop it


def test_start_mib_must_lie_between_floor_and_ceiling() -> None:
    p = dict(registry()["demo"].params)
    assert p["min_mib"] <= p["start_mib"] < p["memory_mib"]  # the VMs start ballooned down: room to grow
    for bad in (p["min_mib"] - 1, p["memory_mib"] + 1):
        with pytest.raises(ValueError, match="start_mib"):
            demo.check_params({**p, "start_mib": bad})


def test_registry_demo_is_the_overcommit_one() -> None:
    exp = registry()["demo"]
    assert {"vm", "libvirt"} <= exp.needs
    assert {"budget_mib", "busy", "idle_after_s", "start_mib", "timeline_s"} <= set(exp.params)


def test_plot_draws_both_phases(tmp_path) -> None:
    saved = []

    class Ctx:
        def savefig(self, fig, name):  # noqa: ANN001, ANN201
            fig.savefig(tmp_path / name)
            saved.append(name)

    rows = [{"t_s": t, "phase": ph, "vm": vm, "role": role, "host_mib": mib, "balloon_actual_mib": bal}
            for t, ph in ((0.0, "stock"), (2.0, "stock"), (4.0, "symbiont"), (6.0, "symbiont"))
            for vm, role, mib, bal in (("a", "busy", 600.0, 512), ("b", "idle", 300.0 if t < 5 else 20.0, 512))]
    work = [{"t_s": t, "vm": "a", "pages_per_s": 40000.0 + t} for t in (0.0, 2.0, 4.0, 6.0)]
    demo._plot(Ctx(), rows, [{"t_s": 4.0, "vm": "all", "event": "profile overcommit"}], 1280, work)
    assert saved == ["demo.png"] and (tmp_path / "demo.png").stat().st_size > 10_000
    demo._plot(Ctx(), rows, [], 1280)  # no workload samples: the rate panel stays empty


def test_a_parked_vm_keeps_its_last_balloon_in_the_report() -> None:
    rows = [{"vm": "b", "balloon_actual_mib": 512}, {"vm": "b", "balloon_actual_mib": 139},
            {"vm": "b", "balloon_actual_mib": None}, {"vm": "a", "balloon_actual_mib": 512}]
    assert demo.last_known(rows, "balloon_actual_mib") == {"b": 139, "a": 512}
