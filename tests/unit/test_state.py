"""The sqlite state store: durable registrations, first-original knobs, atomic transactions."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiont.state import StateStore


def test_registration_and_history_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    s = StateStore(db)
    s.add_vm("vm1", "uuid-1", {"memory": {"shares": 500}})
    s.add_samples([(1.0, "vm1", "agent", {"x": 1}), (2.0, "vm1", "agent", {"x": 2}), (2.0, None, "host", {"h": 1})])
    s.close()
    s2 = StateStore(db)
    assert s2.get_vm("vm1").policy == {"memory": {"shares": 500}}
    assert [d["x"] for _, d in s2.history("vm1", "agent")] == [1, 2]
    assert s2.latest(None, "host")[1] == {"h": 1}
    assert s2.count_samples() == 3


def test_duplicate_registration_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.sqlite3")
    s.add_vm("vm1", "u1", {"a": 1})
    with pytest.raises(Exception, match="UNIQUE"):
        s.add_vm("vm1", "u2", {"a": 2})
    assert s.get_vm("vm1").uuid == "u1"


def test_knob_keeps_the_first_original(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.sqlite3")
    s.save_knob("vm1", "balloon_mib", 512, 300)
    s.save_knob("vm1", "balloon_mib", 300, 200)
    (k,) = s.knobs("vm1")
    assert (k["original"], k["current"]) == (512, 200)
    s.forget_knob("vm1", "balloon_mib")
    assert s.knobs("vm1") == []


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.sqlite3")
    with pytest.raises(RuntimeError):
        with s.transaction() as db:
            db.execute("INSERT INTO vms (name, uuid, policy, registered_at) VALUES ('a','u','{}',0)")
            raise RuntimeError("boom")
    assert s.get_vm("a") is None


def test_remove_vm_drops_its_knobs_and_prune_keeps_recent(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.sqlite3")
    s.add_vm("vm1", "u", {})
    s.save_knob("vm1", "vcpus", 1, 2)
    assert s.remove_vm("vm1") and s.knobs("vm1") == [] and not s.remove_vm("vm1")
    s.add_samples([(10.0, None, "host", {}), (100.0, None, "host", {})])
    assert s.prune(50.0) == 1
    assert [ts for ts, _ in s.history(None, "host")] == [100.0]


def test_decisions_are_logged_with_inputs(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s.sqlite3")
    s.log_decision("memory", "balloon", "vm1", {"target_mib": 300}, {"ok": True})
    (d,) = s.decisions("vm1")
    assert d["inputs"] == {"target_mib": 300} and d["part"] == "memory"
