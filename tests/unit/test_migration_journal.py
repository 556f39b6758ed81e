"""The migration journal's state machine and its crash-recovery rule (exactly one copy runs)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from symbiont.migration import journal as jn
from symbiont.migration.workload import counter_command, echo_command, migratable_command, parse_counter
from symbiont.state import StateStore

HAPPY = ["check", "predump", "transfer", "dump", "transfer", "restore", "confirm", "cleanup", "done"]


@pytest.fixture
def journal(tmp_path):
    store = StateStore(tmp_path / "state.db")
    yield jn.Journal(store)
    store.close()


def test_happy_path_and_history(journal: jn.Journal) -> None:
    journal.create("m1", "vm1", "ct", "vm2", "relay", "adaptive", {"predumps": 1})
    for phase in HAPPY:
        m = journal.move("m1", phase, timings={phase: 1.0})
    assert m["phase"] == "done"
    assert [h[0] for h in m["history"]] == ["created", *HAPPY]
    assert set(m["timings"]) == set(HAPPY)
    assert journal.unfinished() == []


def test_illegal_moves_change_nothing(journal: jn.Journal) -> None:
    journal.create("m1", "vm1", "ct", "vm2", "relay", "adaptive", {})
    journal.move("m1", "check")
    with pytest.raises(jn.JournalError):
        journal.move("m1", "restore")  # skipping the dump and the transfer
    assert journal.get("m1")["phase"] == "check"
    for p in ["dump", "transfer", "restore", "confirm"]:
        journal.move("m1", p)
    with pytest.raises(jn.JournalError):
        journal.move("m1", "aborted")  # after confirm the destination is the container
    assert journal.get("m1")["phase"] == "confirm"
    assert [m["id"] for m in journal.unfinished()] == ["m1"]


def test_one_migration_at_a_time_per_vm(journal: jn.Journal) -> None:
    journal.create("m1", "vm1", "ct", "vm2", "relay", "adaptive", {})
    with pytest.raises(jn.JournalError, match="in progress"):
        journal.create("m2", "vm2", "other", "vm3", "relay", "adaptive", {})
    journal.move("m1", "aborted", error="test")
    journal.create("m2", "vm2", "other", "vm3", "relay", "adaptive", {})
    assert journal.get("m1")["error"] == "test"


def test_state_survives_reopening(tmp_path) -> None:
    store = StateStore(tmp_path / "s.db")
    j = jn.Journal(store)
    j.create("m1", "a", "ct", "b", "network", "fixed", {})
    j.move("m1", "check")
    j.move("m1", "dump")
    store.close()
    store2 = StateStore(tmp_path / "s.db")
    assert [m["phase"] for m in jn.Journal(store2).unfinished()] == ["dump"]
    store2.close()


views = st.builds(jn.GuestView, st.booleans(), st.booleans(), st.booleans())


@given(st.sampled_from(jn.PHASES), views, views)
def test_recovery_never_leaves_two_copies_or_none(phase: str, src: jn.GuestView, dst: jn.GuestView) -> None:
    action = jn.recovery_action(phase, src, dst)
    if phase not in jn.ACTIVE:
        assert action == "none"
        return
    if jn.authoritative(phase) == "destination":
        # Confirmed: the source copy is removed, never thawed.
        assert action in ("finish", "wait")
        assert action == "wait" or src.reachable
    else:
        assert action in ("abort", "keep-destination", "wait")
        if action == "abort" and phase == "restore":
            assert dst.reachable  # a restored copy is removed before the source runs on
        if src.reachable and src.running and dst.reachable:
            assert action == "abort"  # the source still has it: it stays the container
        if phase != "restore":
            assert action == ("abort" if src.reachable else "wait")  # no copy can run on the destination
        elif not dst.reachable:
            assert action == "wait"  # a restored copy there could not be ruled out
        if action == "keep-destination":
            assert dst.restored and dst.running and not (src.reachable and src.running)


def test_authoritative_switches_at_confirm() -> None:
    assert [jn.authoritative(p) for p in ("transfer", "restore", "confirm", "cleanup")] == [
        "source", "source", "destination", "destination",
    ]  # fmt: skip
    assert jn.can_move("restore", "aborted") and not jn.can_move("confirm", "aborted")
    assert not jn.can_move("done", "aborted") and not jn.can_move("nope", "check")


def test_workload_commands() -> None:
    cmd = migratable_command("c1", ["python3", "-c", "pass"])
    assert cmd[0] == "setsid" and cmd[-3:] == ["python3", "-c", "pass"] and "/c1.log" in cmd[4]
    assert counter_command("c1", 8, "/var/lib/x/out")[-4:] == ["8", "/var/lib/x/out", "0.2", "0"]
    assert counter_command("c1", 8, "/x", 0.1, dirty_kib_s=1024)[-1] == str(1 << 20)  # bytes/s
    assert echo_command("e1", 47900)[-1] == "47900"
    with pytest.raises(ValueError):
        echo_command("e1", 80)
    with pytest.raises(ValueError):
        counter_command("c1", -1, "/x")
    assert parse_counter("1 10.0\n2 10.2\n3 10") == [(1, 10.0), (2, 10.2)]
