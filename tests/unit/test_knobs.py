"""The knob ledger: one table, originals saved before a change, one restore path."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from symbiont.config import load_config
from symbiont.daemon import Daemon
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.host.port import HostError
from symbiont.knobs import KnobKind, KnobLedger
from symbiont.state import StateStore


class Dial:
    """A knob outside the daemon: a dict of values, with a switch to make writes fail."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], int] = {}
        self.broken = False

    def read(self, vm: str, key: str) -> int:
        return self.values.get((vm, key), 100)

    def write(self, vm: str, key: str, value: int) -> None:
        if self.broken:
            raise HostError("the dial is stuck")
        self.values[(vm, key)] = value


@pytest.fixture
def ledger(tmp_path):
    store = StateStore(tmp_path / "s.sqlite3")
    led = KnobLedger(store)
    dial = Dial()
    led.register(KnobKind("dial", "toy", dial.read, dial.write))
    yield led, dial, store
    store.close()


def test_turn_saves_the_first_original_and_restore_puts_it_back(ledger) -> None:
    led, dial, _ = ledger

    async def run() -> None:
        assert await led.turn("toy", "vm1", "dial", "a", 50) == 100
        assert await led.turn("toy", "vm1", "dial", "a", 20) == 100  # the first original is kept
        await led.turn("toy", "", "dial", "host", 7)  # a host-wide knob
        assert led.current("vm1", "dial", "a") == 20 and dial.values[("vm1", "a")] == 20
        done = await led.restore(vm="vm1", reason="test")
        assert [(r["vm"], r["key"]) for r in done] == [("vm1", "a")]
        assert dial.values[("vm1", "a")] == 100
        assert [r["vm"] for r in led.rows()] == [""]  # only the VM's rows were restored

    asyncio.run(run())


def test_a_failed_restore_keeps_the_row_and_an_unknown_kind_is_left_alone(ledger) -> None:
    led, dial, store = ledger
    store.save_knob("vm1", "someone_elses", 1, 2, part="other")

    async def run() -> None:
        await led.turn("toy", "vm1", "dial", "", 5)
        dial.broken = True
        assert await led.restore(vm="vm1") == []
        assert {r["kind"] for r in led.rows("vm1")} == {"dial", "someone_elses"}
        dial.broken = False
        assert [r["kind"] for r in await led.restore(vm="vm1")] == ["dial"]
        assert [r["kind"] for r in led.rows("vm1")] == ["someone_elses"]

    asyncio.run(run())


def test_rows_survive_a_crash(tmp_path, ledger) -> None:
    led, dial, store = ledger
    asyncio.run(led.turn("toy", "vm1", "dial", "", 5))
    # kill -9: nothing closed; a new daemon opens the same file.
    again = KnobLedger(StateStore(store.path))
    again.register(KnobKind("dial", "toy", dial.read, dial.write))
    assert asyncio.run(again.restore(reason="restart"))[0]["original"] == 100
    assert dial.values[("vm1", "")] == 100


def test_a_kind_has_one_owner(ledger) -> None:
    led, dial, _ = ledger
    with pytest.raises(ValueError, match="registered by part 'toy'"):
        led.register(KnobKind("dial", "other", dial.read, dial.write))


def test_the_old_knobs_table_is_migrated_in_place(tmp_path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE knobs (vm TEXT NOT NULL, knob TEXT NOT NULL, original TEXT NOT NULL, "
               "current TEXT NOT NULL, changed_at REAL NOT NULL, PRIMARY KEY (vm, knob))")
    db.execute("INSERT INTO knobs VALUES ('vm1', 'balloon_mib', '512', '300', 1.0)")
    db.execute("INSERT INTO knobs VALUES ('vm1', 'paging_parked', '\"running\"', '\"paused\"', 2.0)")
    db.commit()
    db.close()
    store = StateStore(path)
    rows = {r["kind"]: r for r in store.knobs("vm1")}
    assert rows["balloon_mib"]["original"] == 512 and rows["balloon_mib"]["part"] == "memory"
    assert rows["paging_parked"]["current"] == "paused" and rows["paging_parked"]["part"] == "paging"
    assert [r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE name LIKE 'knobs%' "
                                           "AND type = 'table'")] == ["knobs"]


def test_legacy_tables_are_mirrored_read_only_or_moved(ledger) -> None:
    led, _, store = ledger
    store.ensure_schema("CREATE TABLE IF NOT EXISTS dedup_ksm_knobs (knob TEXT PRIMARY KEY, original TEXT, "
                        "current TEXT, changed_at REAL)")
    with store.transaction() as db:
        db.execute("INSERT INTO dedup_ksm_knobs VALUES ('pages_to_scan', '100', '1000', 1.0)")
    conv = lambda r: ("", r["knob"], r["original"], r["current"])  # noqa: E731
    assert led.import_legacy("dedup_ksm_knobs", "ksm_tunable", "dedup", conv, drop=False) == 1
    assert led.get("", "ksm_tunable", "pages_to_scan")["original"] == "100"
    with store.transaction() as db:  # the part restored it by its own path: the mirror follows
        db.execute("DELETE FROM dedup_ksm_knobs")
    led.import_legacy("dedup_ksm_knobs", "ksm_tunable", "dedup", conv, drop=False)
    assert led.rows() == []
    with store.transaction() as db:
        db.execute("INSERT INTO dedup_ksm_knobs VALUES ('sleep_millisecs', '20', '5', 1.0)")
    led.import_legacy("dedup_ksm_knobs", "ksm_tunable", "dedup", conv, drop=True)
    assert store.query("SELECT name FROM sqlite_master WHERE name = 'dedup_ksm_knobs'") == []
    assert json.dumps(led.get("", "ksm_tunable", "sleep_millisecs")["current"]) == '"5"'


def test_unregister_restores_the_balloon_through_the_ledger(tmp_path) -> None:
    cfg = load_config(overrides={"state_dir": str(tmp_path), "socket": str(tmp_path / "s.sock")})
    host = FakeHost(FakeDomain("vm1", memory_kib=512 << 10, max_memory_kib=512 << 10))
    d = Daemon(cfg, host=host)

    async def run() -> None:
        await d.register("vm1", {"memory": {}, "cpu": {}})
        await d.knobs.turn("memory", "vm1", "balloon_mib", "", 300)
        assert host.domains["vm1"].memory_kib == 300 << 10
        await d.unregister("vm1")

    try:
        asyncio.run(run())
    finally:
        for link in d.links.values():
            asyncio.run(link.stop())
        d.store.close()
    assert host.domains["vm1"].memory_kib == 512 << 10
    assert ("set_balloon", "vm1", 512 << 10) in host.calls
