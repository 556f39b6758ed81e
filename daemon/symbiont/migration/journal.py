"""The migration journal: one sqlite row per migration, its phase changed in transactions.

The rule that keeps a container running exactly once (:func:`recovery_action`) depends only
on the last committed phase and on what the two guests report, so the daemon can apply it
after any crash — its own, either agent's or either VM's:

* before ``confirm`` is committed the **source** copy is the container: a failure (or a
  recovery) removes whatever the destination received or restored and thaws the source;
* once ``confirm`` is committed the **destination** copy is the container: what is left of
  the source (a frozen copy, image files) is removed, and the migration ends ``done``;
* before ``restore`` was asked for, no copy can run on the destination: the source is thawed
  even when the destination cannot be reached (its leftover files are only garbage);
* the only exception: the source's copy is gone (its VM died) while the destination has a
  running restored copy — then that one is kept (it is the only one left).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from symbiont.state import StateStore

PHASES = (
    "created",
    "check",
    "predump",
    "dump",
    "transfer",
    "restore",
    "confirm",
    "cleanup",
    "done",
    "aborted",
)
ACTIVE = ("created", "check", "predump", "dump", "transfer", "restore", "confirm", "cleanup")
# Phases that may follow each phase (a migration may always end "aborted" before confirm).
NEXT: dict[str, tuple[str, ...]] = {
    "created": ("check",),
    "check": ("predump", "dump"),
    "predump": ("transfer",),
    "transfer": ("predump", "dump", "restore"),
    "dump": ("transfer",),
    "restore": ("confirm",),
    "confirm": ("cleanup",),
    "cleanup": ("done",),
    "done": (),
    "aborted": (),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    ct TEXT NOT NULL,
    dest TEXT NOT NULL,
    path TEXT NOT NULL,
    rate TEXT NOT NULL,
    phase TEXT NOT NULL,
    params TEXT NOT NULL,
    timings TEXT NOT NULL DEFAULT '{}',
    progress TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    history TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS migrations_phase ON migrations (phase);
CREATE TABLE IF NOT EXISTS migration_regions (
    name TEXT PRIMARY KEY,
    mid TEXT NOT NULL,
    vm TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
)
"""


class JournalError(ValueError):
    """An illegal phase change (a bug or a concurrent change): nothing was written."""


def can_move(current: str, new: str) -> bool:
    """Whether ``current`` may become ``new``: forward along NEXT, or aborted before confirm."""
    if current not in PHASES or new not in PHASES:
        return False
    if new == "aborted":
        return current in ACTIVE and PHASES.index(current) < PHASES.index("confirm")
    return new in NEXT[current]


def authoritative(phase: str) -> str:
    """Which copy is the container at this committed phase: ``source`` or ``destination``."""
    return "destination" if phase in ("confirm", "cleanup", "done") else "source"


@dataclass(frozen=True)
class GuestView:
    """What one guest reports about the migrated container (``None``: the agent cannot be asked)."""

    reachable: bool
    running: bool = False  # the container's cgroup has processes
    restored: bool = False  # (destination) a restore of this migration completed


def recovery_action(phase: str, source: GuestView, dest: GuestView) -> str:
    """What to do with an unfinished migration found after a crash.

    ``"abort"``: clear the destination, thaw the source; ``"finish"``: clear the source, keep
    the destination; ``"wait"``: a guest that must be asked cannot be, try again later.
    """
    if phase not in ACTIVE:
        return "none"
    if authoritative(phase) == "destination":
        return "finish" if source.reachable else "wait"
    if phase != "restore":  # no restore was asked for: no copy can run on the destination
        return "abort" if source.reachable else "wait"
    if not dest.reachable:
        return "wait"
    if source.reachable and source.running:
        return "abort"
    if dest.restored and dest.running:
        return "keep-destination"  # the source copy is gone: the restored one is the only one
    return "abort" if source.reachable else "wait"


def _row(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"], "vm": r["vm"], "ct": r["ct"], "dest": r["dest"], "path": r["path"], "rate": r["rate"],
        "phase": r["phase"], "params": json.loads(r["params"]), "timings": json.loads(r["timings"]),
        "progress": json.loads(r["progress"]), "result": json.loads(r["result"]), "error": r["error"],
        "history": json.loads(r["history"]), "created_at": r["created_at"], "updated_at": r["updated_at"],
    }  # fmt: skip


class Journal:
    """The ``migrations`` table of the daemon's state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        store.ensure_schema(SCHEMA)

    def create(
        self, mid: str, vm: str, ct: str, dest: str, path: str, rate: str, params: dict[str, Any]
    ) -> None:
        now = time.time()
        with self.store.transaction() as db:
            busy = db.execute(
                f"SELECT id FROM migrations WHERE phase IN ({','.join('?' * len(ACTIVE))}) AND "
                "(vm IN (?, ?) OR dest IN (?, ?))",
                (*ACTIVE, vm, dest, vm, dest),
            ).fetchone()
            if busy is not None:
                raise JournalError(f"migration {busy['id']} is still in progress between these VMs")
            db.execute(
                "INSERT INTO migrations (id, vm, ct, dest, path, rate, phase, params, history, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'created', ?, ?, ?, ?)",
                (mid, vm, ct, dest, path, rate, json.dumps(params), json.dumps([["created", now]]), now, now),
            )

    def get(self, mid: str) -> dict[str, Any] | None:
        rows = self.store.query("SELECT * FROM migrations WHERE id = ?", (mid,))
        return _row(rows[0]) if rows else None

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.store.query("SELECT * FROM migrations ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_row(r) for r in rows]

    def unfinished(self) -> list[dict[str, Any]]:
        rows = self.store.query(
            f"SELECT * FROM migrations WHERE phase IN ({','.join('?' * len(ACTIVE))}) ORDER BY created_at",
            ACTIVE,
        )
        return [_row(r) for r in rows]

    def move(self, mid: str, new: str, error: str = "", **fields: Any) -> dict[str, Any]:
        """Change the phase (checked against :func:`can_move`) and merge ``timings``/``result``."""
        with self.store.transaction() as db:
            r = db.execute("SELECT * FROM migrations WHERE id = ?", (mid,)).fetchone()
            if r is None:
                raise JournalError(f"no migration {mid!r}")
            cur = r["phase"]
            if new != cur and not can_move(cur, new):
                raise JournalError(f"migration {mid}: {cur} -> {new} is not allowed")
            now = time.time()
            hist = json.loads(r["history"])
            if new != cur:
                hist.append([new, now])
            sets = {"phase": new, "history": json.dumps(hist), "updated_at": now}
            if error:
                sets["error"] = error[:2000]
            for key in ("timings", "result", "progress"):
                if key in fields:
                    merged = {**json.loads(r[key]), **fields[key]}
                    sets[key] = json.dumps(merged, default=str)
            db.execute(
                f"UPDATE migrations SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                (*sets.values(), mid),
            )
        out = self.get(mid)
        assert out is not None
        return out

    def progress(self, mid: str, **progress: Any) -> None:
        """Bytes moved so far (not a phase change; written often, so kept small)."""
        with self.store.transaction() as db:
            r = db.execute("SELECT progress FROM migrations WHERE id = ?", (mid,)).fetchone()
            if r is not None:
                merged = {**json.loads(r["progress"]), **progress}
                db.execute(
                    "UPDATE migrations SET progress = ?, updated_at = ? WHERE id = ?",
                    (json.dumps(merged), time.time(), mid),
                )

    # -- the shm channel's regions: written before a region is attached, removed once it is gone --
    def add_region(self, name: str, mid: str, vm: str, size: int) -> None:
        """Record a region before it exists, so a daemon killed at any point finds it again."""
        with self.store.transaction() as db:
            other = db.execute("SELECT mid, vm FROM migration_regions WHERE name = ?", (name,)).fetchone()
            if other is not None:
                raise JournalError(f"region {name} is already {other['vm']}'s (migration {other['mid']})")
            db.execute("INSERT INTO migration_regions (name, mid, vm, size, created_at) VALUES (?, ?, ?, ?, ?)",
                       (name, mid, vm, size, time.time()))  # fmt: skip

    def regions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.query("SELECT * FROM migration_regions ORDER BY created_at")]

    def drop_region(self, name: str) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM migration_regions WHERE name = ?", (name,))
