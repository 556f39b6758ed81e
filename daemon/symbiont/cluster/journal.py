"""The cluster controller's journal (sqlite): plans, their steps, decisions, host health.

Why: a controller killed in the middle of a plan must, when it starts again, know which step
was under way, so that it can find the VM and finish or roll back that step (every VM on exactly
one host, registered with that host's daemon) instead of guessing. Each state change is one
transaction, written *before* the action it announces (``started``) and after its outcome.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
  id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, source TEXT NOT NULL,
  state TEXT NOT NULL,            -- pending, running, done, failed, refused, resumed, dry-run
  reason TEXT NOT NULL DEFAULT '', plan TEXT NOT NULL, inputs TEXT NOT NULL, finished REAL
);
CREATE TABLE IF NOT EXISTS steps (
  plan_id INTEGER NOT NULL REFERENCES plans(id), idx INTEGER NOT NULL,
  kind TEXT NOT NULL, vm TEXT NOT NULL, step TEXT NOT NULL,
  state TEXT NOT NULL,            -- pending, started, done, failed, skipped, completed, rolled-back
  context TEXT NOT NULL DEFAULT '{}',  -- what resume needs: the VM's policy before the step
  started REAL, finished REAL, outcome TEXT NOT NULL DEFAULT '{}',
  PRIMARY KEY (plan_id, idx)
);
CREATE TABLE IF NOT EXISTS decisions (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, vm TEXT,
  inputs TEXT NOT NULL, outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS hosts (
  id TEXT PRIMARY KEY, state TEXT NOT NULL, since REAL NOT NULL, reason TEXT NOT NULL DEFAULT '',
  last_ok REAL
);
"""


def _j(x: Any) -> str:
    return json.dumps(x, default=str, sort_keys=True)


class Journal:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plans and steps --------------------------------------------------------------------
    def new_plan(self, source: str, plan: Any, inputs: Any, steps: list[dict[str, Any]], state: str = "pending",
                 reason: str = "") -> int:  # fmt: skip
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(
                "INSERT INTO plans (created, source, state, reason, plan, inputs) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), source, state, reason, _j(plan), _j(inputs)),
            )
            pid = int(cur.lastrowid or 0)
            for i, s in enumerate(steps):
                self.db.execute(
                    "INSERT INTO steps (plan_id, idx, kind, vm, step, state) VALUES (?, ?, ?, ?, ?, 'pending')",
                    (pid, i, s["kind"], s["vm"], _j(s)),
                )
        return pid

    def set_plan(self, pid: int, state: str, reason: str = "") -> None:
        done = time.time() if state not in ("pending", "running") else None
        with self.db:
            self.db.execute("UPDATE plans SET state = ?, reason = ?, finished = ? WHERE id = ?",
                            (state, reason, done, pid))  # fmt: skip

    def start_step(self, pid: int, idx: int, context: Any) -> None:
        with self.db:
            self.db.execute("UPDATE steps SET state = 'started', started = ?, context = ? WHERE plan_id = ? AND idx = ?",
                            (time.time(), _j(context), pid, idx))  # fmt: skip

    def end_step(self, pid: int, idx: int, state: str, outcome: Any) -> None:
        with self.db:
            self.db.execute("UPDATE steps SET state = ?, finished = ?, outcome = ? WHERE plan_id = ? AND idx = ?",
                            (state, time.time(), _j(outcome), pid, idx))  # fmt: skip

    def skip_rest(self, pid: int, reason: str) -> None:
        with self.db:
            self.db.execute("UPDATE steps SET state = 'skipped', outcome = ? WHERE plan_id = ? AND state = 'pending'",
                            (_j({"reason": reason}), pid))  # fmt: skip

    def unfinished(self) -> list[dict[str, Any]]:
        """Plans a dead controller left pending/running, with their steps."""
        out = []
        for pid, source, state in self.db.execute(
            "SELECT id, source, state FROM plans WHERE state IN ('pending', 'running') ORDER BY id"
        ).fetchall():
            out.append({"id": pid, "source": source, "state": state, "steps": self.steps(pid)})
        return out

    def steps(self, pid: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT idx, kind, vm, step, state, context, started, finished, outcome FROM steps "
            "WHERE plan_id = ? ORDER BY idx", (pid,)
        ).fetchall()  # fmt: skip
        return [{"idx": r[0], "kind": r[1], "vm": r[2], "step": json.loads(r[3]), "state": r[4],
                 "context": json.loads(r[5]), "started": r[6], "finished": r[7], "outcome": json.loads(r[8])}
                for r in rows]  # fmt: skip

    def plans(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, created, source, state, reason, plan, finished FROM plans ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [{"id": r[0], "created": r[1], "source": r[2], "state": r[3], "reason": r[4],
                 "plan": json.loads(r[5]), "finished": r[6], "steps": self.steps(r[0])} for r in reversed(rows)]  # fmt: skip

    def last_move(self, vm: str) -> float | None:
        """When ``vm`` last started moving (any outcome): the per-VM cooldown counts from it."""
        r = self.db.execute(
            "SELECT MAX(started) FROM steps WHERE vm = ? AND kind = 'move' AND started IS NOT NULL", (vm,)
        ).fetchone()
        return r[0] if r and r[0] is not None else None

    # -- decisions and hosts ----------------------------------------------------------------
    def decide(self, kind: str, vm: str | None, inputs: Any, outcome: Any) -> None:
        with self.db:
            self.db.execute("INSERT INTO decisions (ts, kind, vm, inputs, outcome) VALUES (?, ?, ?, ?, ?)",
                            (time.time(), kind, vm, _j(inputs), _j(outcome)))  # fmt: skip

    def decisions(self, limit: int = 50, kind: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT id, ts, kind, vm, inputs, outcome FROM decisions"
        args: tuple[Any, ...] = ()
        if kind:
            q, args = q + " WHERE kind = ?", (kind,)
        rows = self.db.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [{"id": r[0], "ts": r[1], "kind": r[2], "vm": r[3], "inputs": json.loads(r[4]),
                 "outcome": json.loads(r[5])} for r in reversed(rows)]  # fmt: skip

    def host_seen(self, hid: str, ok: bool, reason: str = "") -> str | None:
        """Record a poll's result; returns the new state when it changed (for the decision log)."""
        now = time.time()
        row = self.db.execute("SELECT state FROM hosts WHERE id = ?", (hid,)).fetchone()
        new = "up" if ok else "down"
        with self.db:
            if row is None or row[0] != new:
                self.db.execute(
                    "INSERT INTO hosts (id, state, since, reason, last_ok) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET state = excluded.state, since = excluded.since, "
                    "reason = excluded.reason, last_ok = COALESCE(excluded.last_ok, hosts.last_ok)",
                    (hid, new, now, reason, now if ok else None),
                )
                return new
            self.db.execute("UPDATE hosts SET reason = ?, last_ok = COALESCE(?, last_ok) WHERE id = ?",
                            (reason, now if ok else None, hid))  # fmt: skip
        return None

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {"state": r[1], "since": r[2], "reason": r[3], "last_ok": r[4]}
                for r in self.db.execute("SELECT id, state, since, reason, last_ok FROM hosts")}  # fmt: skip
