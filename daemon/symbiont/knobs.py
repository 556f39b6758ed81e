"""The knob ledger: one table, one restore path for every knob any part turns.

A *knob* is a value outside the daemon that a part changes: a VM's balloon target, its vCPU
count, a KSM tunable, the QEMU cgroup's CPU shares, an SSD cache's size. Each kind is
registered once (:class:`KnobKind`: how to read and write it) by the part that owns it, at
start. :meth:`KnobLedger.turn` saves the original in sqlite *before* the knob is written (only
the first original is kept), so a restarted daemon — even after ``kill -9`` — can still put it
back. :meth:`KnobLedger.restore` is the only restore path: on VM removal (before the parts'
``vm_removed``), on stop (when ``restore_on_exit``), and at start for rows of VMs no longer
registered. A row whose kind no running part registered stays (its part restores it when it
starts); tables of older daemons are copied in by :meth:`KnobLedger.import_legacy`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from symbiont.errors import DaemonError
from symbiont.host.port import HostError
from symbiont.state import StateStore

log = logging.getLogger("symbiontd.knobs")

Reader = Callable[[str, str], Any]  # (vm, key) -> value, sync or async
Writer = Callable[[str, str, Any], Any]  # (vm, key, value) -> None, sync or async
RESTORE_TIMEOUT = 60.0  # restoring one knob gives up after this long


@dataclass(frozen=True)
class KnobKind:
    """How to read and write one kind of knob. ``vm`` is '' for a host-wide knob; ``key``
    names one of several knobs of the kind on the same VM (a KSM tunable's name)."""

    name: str
    part: str
    read: Reader
    write: Writer
    # the order in which knobs of this kind are restored (a sort key over ``key``): KSM's
    # advisor_mode before pages_to_scan, run last; None: by key
    order: Callable[[str], Any] | None = None


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """A reader/writer: a coroutine function is awaited, a plain one runs in a thread (the
    host's calls block)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await asyncio.to_thread(fn, *args)


class KnobLedger:
    """The ledger over the store's ``knobs`` table."""

    def __init__(self, store: StateStore, on_restore: Callable[[str, dict[str, Any], str], None] | None = None) -> None:
        self.store = store
        self.kinds: dict[str, KnobKind] = {}
        self._on_restore = on_restore

    def register(self, kind: KnobKind) -> None:
        """Register a kind (a part's ``start``). A kind has one owner: a second part claiming
        the same name is a startup error."""
        have = self.kinds.get(kind.name)
        if have is not None and have.part != kind.part:
            raise ValueError(f"knob kind {kind.name!r} is registered by part {have.part!r} already")
        self.kinds[kind.name] = kind

    def rows(self, vm: str | None = None, part: str | None = None) -> list[dict[str, Any]]:
        return self.store.knobs(vm, part=part)

    def get(self, vm: str, kind: str, key: str = "") -> dict[str, Any] | None:
        return next((r for r in self.store.knobs(vm) if r["kind"] == kind and r["key"] == key), None)

    def current(self, vm: str, kind: str, key: str = "", default: Any = None) -> Any:
        """The value the ledger last set (``default`` when this knob was never turned)."""
        row = self.get(vm, kind, key)
        return row["current"] if row is not None else default

    def record(self, part: str, vm: str, kind: str, key: str, original: Any, current: Any) -> None:
        """Record a change made by the part itself (a multi-step change such as a vCPU
        scaling); the first original is kept. Call it *before* the change."""
        self.store.save_knob(vm, kind, original, current, key=key, part=part)

    async def turn(self, part: str, vm: str, kind: str, key: str, value: Any, *, original: Any = None) -> Any:
        """Set a knob: save its original (read through the kind unless given) if this is its
        first change, write, record the new value. Returns the original. A failed first write
        leaves no row behind."""
        k = self.kinds.get(kind)
        if k is None:
            raise KeyError(f"knob kind {kind!r} is not registered")
        row = self.get(vm, kind, key)
        if row is None:
            if original is None:
                original = await _call(k.read, vm, key)
            self.store.save_knob(vm, kind, original, value, key=key, part=part)
        else:
            original = row["original"]
            self.store.save_knob(vm, kind, original, value, key=key, part=part)
        try:
            await _call(k.write, vm, key, value)
        except BaseException:
            if row is None:
                self.store.forget_knob(vm, kind, key)
            else:
                self.store.save_knob(vm, kind, original, row["current"], key=key, part=part)
            raise
        return original

    def forget(self, vm: str, kind: str, key: str = "") -> None:
        self.store.forget_knob(vm, kind, key)

    async def restore(self, vm: str | None = None, part: str | None = None, reason: str = "",
                      kinds: set[str] | None = None) -> list[dict[str, Any]]:
        """Put knobs back to their originals (all of ``vm``'s, all of ``part``'s, or all);
        returns the rows restored. A knob that fails to restore keeps its row (logged), and so
        does one whose kind no running part registered."""
        done = []
        for row in sorted(self.store.knobs(vm, part=part), key=self._restore_order):
            if kinds is not None and row["kind"] not in kinds:
                continue
            k = self.kinds.get(row["kind"])
            if k is None:
                log.debug("knob %s/%s of %r: no part registered its kind; left for it", row["kind"], row["key"],
                          row["vm"])
                continue
            try:
                async with asyncio.timeout(RESTORE_TIMEOUT):
                    await _call(k.write, row["vm"], row["key"], row["original"])
            except (HostError, DaemonError, OSError, ValueError, TimeoutError) as exc:
                log.warning("vm %r: could not restore %s%s to %s: %s", row["vm"], row["kind"],
                            f"/{row['key']}" if row["key"] else "", row["original"], exc)
                continue
            self.store.forget_knob(row["vm"], row["kind"], row["key"])
            done.append(row)
            with_key = f"{row['kind']}/{row['key']}" if row["key"] else row["kind"]
            log.info("vm %r: restored %s to %s (%s)", row["vm"], with_key, row["original"], reason)
            if self._on_restore is not None:
                self._on_restore(row["vm"], row, reason)
        return done

    def _restore_order(self, row: dict[str, Any]) -> tuple[Any, ...]:
        k = self.kinds.get(row["kind"])
        return (row["vm"], row["kind"], k.order(row["key"]) if k is not None and k.order is not None else 0,
                row["key"])

    def import_legacy(self, table: str, kind: str, part: str, convert: Callable[[Any], tuple[str, str, Any, Any]],
                      *, drop: bool) -> int:
        """Copy the rows of a part's own knob table of an older daemon into the ledger (the
        first original wins). ``drop``: the table goes in the same transaction (its part is
        migrated); else the ledger's copy mirrors it (rows of ``kind`` gone from the table go
        from the ledger too), read-only, until that part is migrated."""
        with self.store.transaction() as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
                return 0
            rows = [convert(r) for r in db.execute(f"SELECT * FROM {table}").fetchall()]  # noqa: S608 (a name)
            if not drop:
                db.execute("DELETE FROM knobs WHERE kind = ? AND part = ?", (kind, part))
            for vm, key, original, current in rows:
                db.execute("INSERT OR IGNORE INTO knobs (vm, kind, key, original, current, part, changed_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (vm, kind, key, json.dumps(original), json.dumps(current), part, time.time()))
            if drop:
                db.execute(f"DROP TABLE {table}")
        if rows:
            log.info("knobs: %s %d rows of %s into the ledger as %s", "moved" if drop else "mirrored", len(rows),
                     table, kind)
        return len(rows)


