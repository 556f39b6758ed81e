"""Allocation state of the pool and every VM's lbn→pbn map, in sqlite, changed in transactions.

One row per physical block, in one of three states:

* ``free``  — zeroed, owned by nobody: the only state allocation takes blocks from;
* ``owned`` — mapped to ``(vm, lbn)``; ``UNIQUE (vm, lbn)`` and ``pbn PRIMARY KEY`` make a
  double mapping impossible at the schema level;
* ``dirty`` — left a VM and not yet zeroed. **Blocks are zeroed on free**: a block leaves a VM
  as ``dirty`` (in the same transaction that unmaps it), is zeroed, and only then becomes
  ``free``. After a crash, every ``dirty`` block is zeroed again before anything is allocated,
  so no VM can ever read another VM's data.

free + owned + dirty = pool, always; at rest there are no dirty blocks. The tables live in
the daemon's own database (``daemon.store``); any object with the store's ``ensure_schema``,
``transaction`` and ``query`` works (the unit tests use a :class:`~symbiont.state.StateStore`
on a temporary file).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS ssd_pool (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    path TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'device')),
    nblocks INTEGER NOT NULL CHECK (nblocks > 0),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ssd_caches (
    vm TEXT PRIMARY KEY,
    size_blocks INTEGER NOT NULL CHECK (size_blocks > 0),
    persist INTEGER NOT NULL,
    weight INTEGER NOT NULL CHECK (weight > 0),
    min_blocks INTEGER NOT NULL DEFAULT 0,
    max_blocks INTEGER,
    revoked TEXT NOT NULL DEFAULT '[]',
    params TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ssd_blocks (
    pbn INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('free', 'owned', 'dirty')),
    vm TEXT REFERENCES ssd_caches (vm),
    lbn INTEGER,
    changed_at REAL NOT NULL,
    CHECK ((state = 'owned') = (vm IS NOT NULL AND lbn IS NOT NULL AND lbn >= 0)),
    UNIQUE (vm, lbn)
);
CREATE INDEX IF NOT EXISTS ssd_blocks_state ON ssd_blocks (state, pbn);
DROP INDEX IF EXISTS ssd_blocks_vm  -- the same as UNIQUE (vm, lbn)'s index: one more to keep per change
"""


def _pairs(db: Any, rows: Any) -> None:
    """Load ``(a, b)`` rows into a per-connection temporary table, so that a change of any
    number of blocks is one set-based statement (sqlite allows at most 250,000 variables in a
    statement; one variable per block does not scale)."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS ssd_pairs (a INTEGER PRIMARY KEY, b INTEGER)")
    db.execute("DELETE FROM temp.ssd_pairs")
    db.executemany("INSERT INTO temp.ssd_pairs (a, b) VALUES (?, ?)", rows)


class Store(Protocol):
    def ensure_schema(self, ddl: str) -> None: ...

    def transaction(self) -> Any: ...

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]: ...


class BlockMapError(Exception):
    """An operation the block map refuses (the message says why)."""


class PoolExhausted(BlockMapError):
    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"pool exhausted: {requested} blocks requested, {free} free")
        self.requested = requested
        self.free = free


@dataclass
class CacheRecord:
    vm: str
    size_blocks: int
    persist: bool
    weight: int
    min_blocks: int
    max_blocks: int | None
    revoked: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm, "size_blocks": self.size_blocks, "persist": self.persist, "weight": self.weight,
            "min_blocks": self.min_blocks, "max_blocks": self.max_blocks, "revoked": list(self.revoked),
            "params": dict(self.params), "created_at": self.created_at,
        }


def _cache(row: Any) -> CacheRecord:
    return CacheRecord(
        vm=row["vm"], size_blocks=row["size_blocks"], persist=bool(row["persist"]), weight=row["weight"],
        min_blocks=row["min_blocks"], max_blocks=row["max_blocks"], revoked=json.loads(row["revoked"]),
        params=json.loads(row["params"]), created_at=row["created_at"],
    )


class BlockMap:
    """Transactions over the pool's block table; every method is one transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.ensure_schema(SCHEMA)

    # -- pool -----------------------------------------------------------------------------
    def pool(self) -> dict[str, Any] | None:
        rows = self.store.query("SELECT * FROM ssd_pool WHERE id = 1")
        if not rows:
            return None
        r = rows[0]
        return {"path": r["path"], "kind": r["kind"], "nblocks": r["nblocks"], "created_at": r["created_at"]}

    def create_pool(self, path: str, kind: str, nblocks: int, dirty: bool = False) -> None:
        """Record the pool and one row per block: ``free`` for a fresh (sparse, all-zero)
        file, ``dirty`` for a device whose old content must be zeroed before use."""
        if nblocks < 1:
            raise BlockMapError("a pool needs at least one block")
        now = time.time()
        state = "dirty" if dirty else "free"
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM ssd_pool WHERE id = 1").fetchone():
                raise BlockMapError("a pool already exists; delete it first")
            db.execute("DELETE FROM ssd_blocks")
            db.execute("INSERT INTO ssd_pool (id, path, kind, nblocks, created_at) VALUES (1, ?, ?, ?, ?)",
                       (path, kind, nblocks, now))
            db.executemany("INSERT INTO ssd_blocks (pbn, state, changed_at) VALUES (?, ?, ?)",
                           ((p, state, now) for p in range(nblocks)))

    def delete_pool(self, with_caches: bool = False) -> list[str]:
        """Forget the pool; ``with_caches`` (the pool is gone) forgets its caches too."""
        with self.store.transaction() as db:
            vms = [r[0] for r in db.execute("SELECT vm FROM ssd_caches ORDER BY vm")]
            if vms and not with_caches:
                raise BlockMapError("caches are registered on this pool; unregister them first")
            db.execute("DELETE FROM ssd_blocks")
            db.execute("DELETE FROM ssd_caches")
            db.execute("DELETE FROM ssd_pool")
        return vms

    def counts(self) -> dict[str, int]:
        out = {"free": 0, "owned": 0, "dirty": 0}
        for r in self.store.query("SELECT state, COUNT(*) AS n FROM ssd_blocks GROUP BY state"):
            out[r["state"]] = r["n"]
        out["total"] = out["free"] + out["owned"] + out["dirty"]
        return out

    # -- caches ---------------------------------------------------------------------------
    def add_cache(self, vm: str, size_blocks: int, persist: bool, weight: int = 100, min_blocks: int = 0,
                  max_blocks: int | None = None, params: dict[str, Any] | None = None) -> CacheRecord:
        if size_blocks < 1:
            raise BlockMapError("size must be at least one block")
        if not 0 <= min_blocks <= size_blocks:
            raise BlockMapError("min must be between 0 and size")
        if max_blocks is not None and not min_blocks <= max_blocks <= size_blocks:
            raise BlockMapError("max must be between min and size")
        now = time.time()
        with self.store.transaction() as db:
            if not db.execute("SELECT 1 FROM ssd_pool WHERE id = 1").fetchone():
                raise BlockMapError("no pool: create one first")
            if db.execute("SELECT 1 FROM ssd_caches WHERE vm = ?", (vm,)).fetchone():
                raise BlockMapError(f"a cache for {vm!r} is already registered")
            db.execute(
                "INSERT INTO ssd_caches (vm, size_blocks, persist, weight, min_blocks, max_blocks, params, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (vm, size_blocks, int(persist), weight, min_blocks, max_blocks, json.dumps(params or {}), now),
            )
        rec = self.cache(vm)
        assert rec is not None
        return rec

    def update_cache(self, vm: str, **fields: Any) -> None:
        allowed = {"weight", "min_blocks", "max_blocks", "persist", "params", "revoked"}
        bad = set(fields) - allowed
        if bad:
            raise BlockMapError(f"cannot update {', '.join(sorted(bad))}")
        sets, vals = [], []
        for k, v in fields.items():
            sets.append(f"{k} = ?")
            vals.append(json.dumps(sorted(set(v)) if k == "revoked" else v) if k in ("params", "revoked")
                        else (int(v) if k == "persist" else v))
        with self.store.transaction() as db:
            cur = db.execute(f"UPDATE ssd_caches SET {', '.join(sets)} WHERE vm = ?", (*vals, vm))
            if cur.rowcount == 0:
                raise BlockMapError(f"no cache registered for {vm!r}")

    def remove_cache(self, vm: str) -> None:
        with self.store.transaction() as db:
            n = db.execute("SELECT COUNT(*) FROM ssd_blocks WHERE vm = ?", (vm,)).fetchone()[0]
            if n:
                raise BlockMapError(f"{vm!r} still owns {n} blocks; release them first")
            if db.execute("DELETE FROM ssd_caches WHERE vm = ?", (vm,)).rowcount == 0:
                raise BlockMapError(f"no cache registered for {vm!r}")

    def cache(self, vm: str) -> CacheRecord | None:
        rows = self.store.query("SELECT * FROM ssd_caches WHERE vm = ?", (vm,))
        return _cache(rows[0]) if rows else None

    def caches(self) -> list[CacheRecord]:
        return [_cache(r) for r in self.store.query("SELECT * FROM ssd_caches ORDER BY vm")]

    # -- maps -----------------------------------------------------------------------------
    def mapping(self, vm: str) -> dict[int, int]:
        rows = self.store.query("SELECT lbn, pbn FROM ssd_blocks WHERE vm = ? ORDER BY lbn", (vm,))
        return {r["lbn"]: r["pbn"] for r in rows}

    def owned_count(self, vm: str) -> int:
        return self.store.query("SELECT COUNT(*) AS n FROM ssd_blocks WHERE vm = ?", (vm,))[0]["n"]

    def allocate(self, vm: str, lbns: list[int]) -> dict[int, int]:
        """Back ``lbns`` of ``vm`` with free blocks (lowest pbn first); all or nothing."""
        want = sorted(set(lbns))
        if len(want) != len(lbns):
            raise BlockMapError("duplicate logical blocks in one allocation")
        if not want:
            return {}
        now = time.time()
        with self.store.transaction() as db:
            row = db.execute("SELECT size_blocks FROM ssd_caches WHERE vm = ?", (vm,)).fetchone()
            if row is None:
                raise BlockMapError(f"no cache registered for {vm!r}")
            if want[0] < 0 or want[-1] >= row[0]:
                raise BlockMapError(f"logical blocks must be within 0..{row[0] - 1}")
            # One variable per statement, never one per block (sqlite caps those at 250,000).
            owned = {r[0] for r in db.execute("SELECT lbn FROM ssd_blocks WHERE vm = ?", (vm,))}
            taken = sorted(owned.intersection(want))
            if taken:
                raise BlockMapError(f"logical blocks already backed: {taken[:10]}")
            free = [r[0] for r in db.execute(
                "SELECT pbn FROM ssd_blocks WHERE state = 'free' ORDER BY pbn LIMIT ?", (len(want),))]
            if len(free) < len(want):
                nfree = db.execute("SELECT COUNT(*) FROM ssd_blocks WHERE state = 'free'").fetchone()[0]
                raise PoolExhausted(len(want), nfree)
            _pairs(db, zip(free, want, strict=True))
            cur = db.execute(
                "UPDATE ssd_blocks SET state = 'owned', vm = ?, lbn = p.b, changed_at = ? FROM temp.ssd_pairs p "
                "WHERE ssd_blocks.pbn = p.a AND ssd_blocks.state = 'free'", (vm, now))
            if cur.rowcount != len(want):
                raise BlockMapError("the free blocks changed under the allocation")
        return dict(zip(want, free, strict=True))

    def release(self, vm: str, lbns: list[int]) -> dict[int, int]:
        """Unmap ``lbns`` of ``vm``: their blocks become ``dirty`` (to be zeroed); all or nothing."""
        want = sorted(set(lbns))
        if not want:
            return {}
        now = time.time()
        with self.store.transaction() as db:
            mine = dict(db.execute("SELECT lbn, pbn FROM ssd_blocks WHERE vm = ?", (vm,)).fetchall())
            missing = [lbn for lbn in want if lbn not in mine]
            if missing:
                raise BlockMapError(f"{vm!r}: logical blocks not backed: {missing[:10]}")
            got = {lbn: mine[lbn] for lbn in want}
            _pairs(db, ((pbn, 0) for pbn in got.values()))
            db.execute("UPDATE ssd_blocks SET state = 'dirty', vm = NULL, lbn = NULL, changed_at = ? "
                       "WHERE pbn IN (SELECT a FROM temp.ssd_pairs)", (now,))
        return got

    def dirty(self) -> list[int]:
        return [r["pbn"] for r in self.store.query("SELECT pbn FROM ssd_blocks WHERE state = 'dirty' ORDER BY pbn")]

    def mark_free(self, pbns: list[int]) -> None:
        """``dirty`` → ``free``, once the caller has zeroed them (durably)."""
        if not pbns:
            return
        now = time.time()
        want = sorted(set(pbns))
        with self.store.transaction() as db:
            dirty = {r[0] for r in db.execute("SELECT pbn FROM ssd_blocks WHERE state = 'dirty'")}
            bad = [p for p in want if p not in dirty]
            if bad:
                raise BlockMapError(f"block {bad[0]} is not dirty")
            _pairs(db, ((pbn, 0) for pbn in want))
            db.execute("UPDATE ssd_blocks SET state = 'free', changed_at = ? "
                       "WHERE pbn IN (SELECT a FROM temp.ssd_pairs)", (now,))

    # -- invariants -----------------------------------------------------------------------
    def check(self) -> dict[str, int]:
        """Verify the invariants; raise BlockMapError naming the first one broken."""
        pool = self.pool()
        if pool is None:
            if self.store.query("SELECT COUNT(*) AS n FROM ssd_blocks")[0]["n"]:
                raise BlockMapError("blocks without a pool")
            return {"free": 0, "owned": 0, "dirty": 0, "total": 0}
        c = self.counts()
        if c["total"] != pool["nblocks"]:
            raise BlockMapError(f"free+owned+dirty = {c['total']} != pool {pool['nblocks']}")
        r = self.store.query("SELECT MIN(pbn) AS lo, MAX(pbn) AS hi FROM ssd_blocks")[0]
        if (r["lo"], r["hi"]) != (0, pool["nblocks"] - 1):
            raise BlockMapError(f"pbn range {r['lo']}..{r['hi']} is not 0..{pool['nblocks'] - 1}")
        bad = self.store.query(
            "SELECT b.pbn FROM ssd_blocks b LEFT JOIN ssd_caches c ON b.vm = c.vm "
            "WHERE b.state = 'owned' AND (c.vm IS NULL OR b.lbn >= c.size_blocks) LIMIT 1")
        if bad:
            raise BlockMapError(f"block {bad[0]['pbn']} is owned outside any cache's size")
        return c
