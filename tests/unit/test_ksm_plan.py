"""The one rule for writing several KSM tunables (:func:`symbiont.host.ksm.write_plan`)."""

from __future__ import annotations

from symbiont.dedup import part
from symbiont.host.ksm import NEEDS_UNMERGED, TUNABLES, restore_order, write_plan


def test_only_what_differs_in_tunables_order_run_last() -> None:
    current = {"run": 1, "pages_to_scan": 444, "sleep_millisecs": 20, "use_zero_pages": 1}
    wanted = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": "20", "use_zero_pages": 0}
    assert write_plan(current, wanted) == (["pages_to_scan", "use_zero_pages", "run"], False)
    assert write_plan(wanted, wanted) == ([], False)
    assert write_plan({}, {"run": 1, "sleep_millisecs": 20}) == (["sleep_millisecs", "run"], False)


def test_a_tunable_busy_while_merged_means_unmerge_first_and_run_back_last() -> None:
    current = {"run": 1, "max_page_sharing": 512, "pages_to_scan": 100}
    wanted = {"run": 1, "max_page_sharing": 256, "pages_to_scan": 100}
    # run reads as wanted now, but the unmerge writes run=2: it must go back, last
    assert write_plan(current, wanted) == (["max_page_sharing", "run"], True)
    assert write_plan({"merge_across_nodes": 0}, {"merge_across_nodes": 1}) == (["merge_across_nodes"], True)
    assert write_plan({"use_zero_pages": 0}, {"use_zero_pages": 1})[1] is False  # never EBUSY
    assert set(NEEDS_UNMERGED) == {"max_page_sharing", "merge_across_nodes"}


def test_advisor_off_then_pages_to_scan_even_if_it_reads_right_now() -> None:
    current = {"advisor_mode": "scan-time", "pages_to_scan": 100}
    wanted = {"advisor_mode": "none", "pages_to_scan": 100}
    assert write_plan(current, wanted) == (["advisor_mode", "pages_to_scan"], False)
    on = write_plan({"advisor_mode": "none", "pages_to_scan": 100}, {"advisor_mode": "scan-time", "pages_to_scan": 100})
    assert on == (["advisor_mode"], False)


def test_the_dedup_part_orders_its_ledger_restore_by_the_same_rule() -> None:
    assert part.restore_order is restore_order
    assert sorted(reversed(TUNABLES), key=restore_order) == list(TUNABLES)
    assert restore_order("advisor_mode") < restore_order("pages_to_scan") < restore_order("run")
