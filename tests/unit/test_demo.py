"""The demo's own arithmetic (issue 15 item 5): a VM's host memory counts shared and swapped
pages once, bad parameters fail before anything boots, and the report compares the phases."""

from __future__ import annotations

import pytest

from symbiont_research.experiments import demo
from symbiont_research.experiments.framework import registry

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
                            {"b": {"parked": True, "ping_ms": 31.5, "balloon_mib": 128}})
    assert rows[1] == {"vm": "b", "role": "idle", "stock_host_mib": 300.0, "symbiont_host_mib": 40.0,
                       "saved_mib": 260.0, "parked": True, "ping_ms": 31.5, "balloon_mib": 128}
    lines = demo.format_report(rows, 1280)
    assert "yes" in lines[2] and "31.5" in lines[2] and lines[-1].split()[-2:] == ["900", "660"]


def test_registry_demo_is_the_overcommit_one() -> None:
    exp = registry()["demo"]
    assert {"vm", "libvirt"} <= exp.needs
    assert {"budget_mib", "busy", "idle_after_s"} <= set(exp.params)


def test_plot_draws_both_phases(tmp_path) -> None:
    saved = []

    class Ctx:
        def savefig(self, fig, name):  # noqa: ANN001, ANN201
            fig.savefig(tmp_path / name)
            saved.append(name)

    rows = [{"t_s": t, "phase": ph, "vm": vm, "role": role, "host_mib": mib, "balloon_actual_mib": bal}
            for t, ph in ((0.0, "stock"), (2.0, "stock"), (4.0, "symbiont"), (6.0, "symbiont"))
            for vm, role, mib, bal in (("a", "busy", 600.0, 512), ("b", "idle", 300.0 if t < 5 else 20.0, 512))]
    demo._plot(Ctx(), rows, [{"t_s": 4.0, "vm": "all", "event": "profile overcommit"}], 1280)
    assert saved == ["demo.png"] and (tmp_path / "demo.png").stat().st_size > 10_000


def test_a_parked_vm_keeps_its_last_balloon_in_the_report() -> None:
    rows = [{"vm": "b", "balloon_actual_mib": 512}, {"vm": "b", "balloon_actual_mib": 139},
            {"vm": "b", "balloon_actual_mib": None}, {"vm": "a", "balloon_actual_mib": 512}]
    assert demo.last_known(rows, "balloon_actual_mib") == {"b": 139, "a": 512}
