"""The daemon's durable state in sqlite: registrations, stats history, knobs and decisions.

Everything that must survive a crash (``kill -9`` included) is written here in a
transaction before the daemon acts on it: a registration exists once its INSERT committed;
a knob's original value is saved before the knob is turned, so a restarted daemon can still
put it back (the tuned discipline). Parts add tables with :meth:`StateStore.ensure_schema`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symbiont.apimodel import SAFE_DEPTH, check_json, json_depth_exceeds, json_safe

log = logging.getLogger("symbiontd.state")

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    policy TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    vm TEXT,
    source TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_vm_ts ON samples (vm, source, ts);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    vm TEXT,
    part TEXT NOT NULL,
    action TEXT NOT NULL,
    inputs TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# The one knob ledger's table (see symbiont.knobs): every knob any part turns, with its original
# value saved before the first change. vm '' is a host-wide knob (a KSM tunable).
KNOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS knobs (
    vm TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL DEFAULT '',
    original TEXT NOT NULL,
    current TEXT NOT NULL,
    part TEXT NOT NULL,
    changed_at REAL NOT NULL,
    PRIMARY KEY (vm, kind, key)
)
"""

# Which part owns a knob kind of the first ledger (``knobs(vm, knob, ...)``), for its migration.
_V1_KIND_PART = {"balloon_mib": "memory", "vcpus": "cpu", "paging_parked": "paging"}


@dataclass
class VmRecord:
    name: str
    uuid: str
    policy: dict[str, Any]
    registered_at: float


class StateStore:
    """A thin, thread-safe wrapper over one sqlite database (WAL, synchronous=FULL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self.ensure_schema(SCHEMA)
        self._migrate_knobs()

    def _migrate_knobs(self) -> None:
        """Create the ledger's table; a state dir of an older daemon has ``knobs(vm, knob, ...)``:
        its rows move into the new table in the same transaction (nothing is lost to kill -9)."""
        with self.transaction() as db:
            cols = {r["name"] for r in db.execute("PRAGMA table_info(knobs)").fetchall()}
            if cols and "kind" not in cols:
                db.execute("ALTER TABLE knobs RENAME TO knobs_v1")
                db.execute(KNOBS_SCHEMA)
                for r in db.execute("SELECT * FROM knobs_v1").fetchall():
                    db.execute("INSERT OR IGNORE INTO knobs (vm, kind, key, original, current, part, changed_at) "
                               "VALUES (?, ?, '', ?, ?, ?, ?)",
                               (r["vm"], r["knob"], r["original"], r["current"],
                                _V1_KIND_PART.get(r["knob"], "core"), r["changed_at"]))
                db.execute("DROP TABLE knobs_v1")
                log.info("knobs: migrated the first ledger's table into knobs(vm, kind, key, ...)")
            else:
                db.execute(KNOBS_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ensure_schema(self, ddl: str) -> None:
        with self.transaction() as db:
            for stmt in ddl.split(";"):
                if stmt.strip():
                    db.execute(stmt)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- VMs ------------------------------------------------------------------------------
    def add_vm(self, name: str, uuid: str, policy: dict[str, Any]) -> VmRecord:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO vms (name, uuid, policy, registered_at) VALUES (?, ?, ?, ?)",
                (name, uuid, _dumps(policy), now),
            )
        return VmRecord(name, uuid, policy, now)

    def update_vm_policy(self, name: str, policy: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE vms SET policy = ? WHERE name = ?", (_dumps(policy), name))

    def remove_vm(self, name: str) -> bool:
        with self.transaction() as db:
            cur = db.execute("DELETE FROM vms WHERE name = ?", (name,))
            db.execute("DELETE FROM knobs WHERE vm = ?", (name,))
            return cur.rowcount > 0

    def get_vm(self, name: str) -> VmRecord | None:
        rows = self.query("SELECT * FROM vms WHERE name = ?", (name,))
        return _vm(rows[0]) if rows else None

    def list_vms(self) -> list[VmRecord]:
        return [_vm(r) for r in self.query("SELECT * FROM vms ORDER BY name")]

    # -- samples --------------------------------------------------------------------------
    def add_samples(self, rows: list[tuple[float, str | None, str, dict[str, Any]]]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO samples (ts, vm, source, data) VALUES (?, ?, ?, ?)",
                [(ts, vm, src, json.dumps(data, separators=(",", ":"))) for ts, vm, src, data in rows],
            )

    def history(
        self, vm: str | None, source: str, since: float = 0.0, limit: int = 1000
    ) -> list[tuple[float, dict[str, Any]]]:
        if vm is None:
            rows = self.query(
                "SELECT ts, data FROM samples WHERE vm IS NULL AND source = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
                (source, since, limit),
            )
        else:
            rows = self.query(
                "SELECT ts, data FROM samples WHERE vm = ? AND source = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
                (vm, source, since, limit),
            )
        return [(r["ts"], _loads(r["data"], f"sample of {vm or 'host'} at {r['ts']}")) for r in reversed(rows)]

    def latest(self, vm: str | None, source: str) -> tuple[float, dict[str, Any]] | None:
        h = self.history(vm, source, limit=1)
        return h[-1] if h else None

    def count_samples(self, vm: str | None = None) -> int:
        if vm is None:
            return self.query("SELECT COUNT(*) AS n FROM samples")[0]["n"]
        return self.query("SELECT COUNT(*) AS n FROM samples WHERE vm = ?", (vm,))[0]["n"]

    def prune(self, older_than: float) -> int:
        with self.transaction() as db:
            n = db.execute("DELETE FROM samples WHERE ts < ?", (older_than,)).rowcount
            db.execute("DELETE FROM decisions WHERE ts < ?", (older_than,))
            return n

    # -- knobs: the ledger's rows (symbiont.knobs.KnobLedger turns and restores them) -----------
    def save_knob(self, vm: str, knob: str, original: Any, current: Any, *, key: str = "",
                  part: str | None = None) -> None:
        """Record a knob change; the *first* original value is kept across changes."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO knobs (vm, kind, key, original, current, part, changed_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (vm, kind, key) DO UPDATE SET current = excluded.current, changed_at = excluded.changed_at",
                (vm, knob, key, json.dumps(original), json.dumps(current), part or _V1_KIND_PART.get(knob, "core"),
                 time.time()),
            )

    def knobs(self, vm: str | None = None, *, part: str | None = None) -> list[dict[str, Any]]:
        """Rows of the ledger (``knob`` is the kind, kept under its first name for the API)."""
        where, params = [], []
        if vm is not None:
            where.append("vm = ?")
            params.append(vm)
        if part is not None:
            where.append("part = ?")
            params.append(part)
        sql = "SELECT * FROM knobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY vm, kind, key"
        rows = self.query(sql, tuple(params))
        return [
            {"vm": r["vm"], "knob": r["kind"], "kind": r["kind"], "key": r["key"], "part": r["part"],
             "original": _loads(r["original"], f"knob {r['kind']} of {r['vm']}"),
             "current": _loads(r["current"], f"knob {r['kind']} of {r['vm']}"), "changed_at": r["changed_at"]}
            for r in rows
        ]

    def forget_knob(self, vm: str, knob: str, key: str = "") -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM knobs WHERE vm = ? AND kind = ? AND key = ?", (vm, knob, key))

    # -- decisions ------------------------------------------------------------------------
    def log_decision(
        self, part: str, action: str, vm: str | None, inputs: dict[str, Any], outcome: dict[str, Any]
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO decisions (ts, vm, part, action, inputs, outcome) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), vm, part, action, _dumps(inputs), _dumps(outcome)),
            )

    def decisions(self, vm: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM decisions" + (" WHERE vm = ?" if vm else "") + " ORDER BY id DESC LIMIT ?"
        rows = self.query(sql, ((vm, limit) if vm else (limit,)))
        return [
            {"ts": r["ts"], "vm": r["vm"], "part": r["part"], "action": r["action"],
             "inputs": _loads(r["inputs"], f"decision {r['id']}"), "outcome": _loads(r["outcome"], f"decision {r['id']}")}
            for r in reversed(rows)
        ]


def _vm(row: sqlite3.Row) -> VmRecord:
    policy = _loads(row["policy"], f"policy of VM {row['name']}")
    return VmRecord(row["name"], row["uuid"], policy if isinstance(policy, dict) else {}, row["registered_at"])


def _dumps(value: Any) -> str:
    """JSON for a row; anything json cannot encode is stored as its str (as before), and too deep
    a structure is stored cut (the API bounds what it accepts; this is the last line)."""
    text = json.dumps(value, default=str)
    if json_depth_exceeds(text):
        text = json.dumps(json_safe(value), default=str)
    return text


def _loads(text: str, what: str) -> Any:
    """A stored JSON value, always serialisable again: a row written before the API bounded its
    input (or damaged) is cut to a safe depth or replaced by a marker, with a warning, so that
    one row cannot break every list that contains it."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        log.warning("%s: stored JSON unreadable (%s); served as a marker", what, type(exc).__name__)
        return {"unreadable": f"stored JSON could not be read: {type(exc).__name__}"}
    if json_depth_exceeds(text):
        try:
            check_json(value, max_depth=SAFE_DEPTH, max_nodes=1 << 62, max_str=1 << 62)
        except ValueError as exc:
            log.warning("%s: stored JSON served cut: %s", what, exc)
            return json_safe(value)
    return value
