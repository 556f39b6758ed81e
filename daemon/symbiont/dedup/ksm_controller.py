"""Turns KSM's knobs with the tuned discipline: save the original first, restore it on exit.

Used by experiments that tune KSM outside the daemon (the daemon's dedup part turns the same
tunables through the knob ledger, :mod:`symbiont.dedup.part`). Every tunable's *first* original
value is written to durable storage (:class:`LedgerKnobStore`: a knob ledger's table) **before**
the knob is changed, so that a run killed with ``-9`` is put right by the next one
(:meth:`KsmController.restore`). Restoring writes the tunables back in :data:`TUNABLES` order,
``run`` last.

Two tunables can only change while nothing is merged (the kernel answers ``EBUSY``):
``max_page_sharing`` and ``merge_across_nodes``. Setting them unmerges first only when asked
(``unmerge=True``). Restoring them when pages are merged unmerges (``run=2``) only if KSM was not
running before we touched it (then unmerged is the state the host had) or ``unmerge_on_restore``
is set; otherwise the row stays saved and the failure is reported, to be retried.

The advisor (``advisor_mode`` and its ``advisor_*`` knobs, Linux 6.8+) is saved and restored the
same way; ``advisor_mode`` is restored first, since the kernel refuses ``pages_to_scan`` while the
advisor is on and resets it when the advisor goes off.

``run`` restored to 0 stops ksmd but keeps pages merged (kernel semantics); with
``unmerge_on_restore`` the controller writes ``run=2`` first so the host is left with nothing
merged, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from symbiont.dedup.policy import KsmSettings
from symbiont.host.ksm import (
    NEEDS_UNMERGED,
    RUN_MERGE,
    RUN_STOP,
    RUN_UNMERGE,
    TUNABLES,
    Ksm,
    KsmdCpu,
    KsmError,
    KsmStats,
)

log = logging.getLogger(__name__)


class KnobStore(Protocol):
    def load(self) -> dict[str, int | str]: ...
    def save(self, knob: str, original: int | str, current: int | str) -> None: ...
    def forget(self, knob: str) -> None: ...


class MemoryKnobStore:
    """Originals in memory only (experiments that restore in ``finally``; tests)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int | str, int | str]] = {}

    def load(self) -> dict[str, int | str]:
        return {k: v[0] for k, v in self.rows.items()}

    def save(self, knob: str, original: int | str, current: int | str) -> None:
        orig = self.rows.get(knob, (original, current))[0]
        self.rows[knob] = (orig, current)

    def forget(self, knob: str) -> None:
        self.rows.pop(knob, None)


class LedgerKnobStore:
    """Originals in a :class:`~symbiont.knobs.KnobLedger`'s table (survives ``kill -9``): for
    experiments that tune KSM outside the daemon, in a state file of their own. The daemon's
    dedup part does not use this controller: it turns and restores through the ledger itself
    (:mod:`symbiont.dedup.part`)."""

    KIND = "ksm_tunable"

    def __init__(self, ledger: Any, part: str = "dedup") -> None:
        self.ledger = ledger
        self.part = part

    def load(self) -> dict[str, int | str]:
        return {r["key"]: r["original"] for r in self.ledger.rows(vm="", part=self.part) if r["kind"] == self.KIND}

    def save(self, knob: str, original: int | str, current: int | str) -> None:
        self.ledger.record(self.part, "", self.KIND, knob, original, current)

    def forget(self, knob: str) -> None:
        self.ledger.forget("", self.KIND, knob)


@dataclass
class Sample:
    """One observation of KSM for time series and the policies."""

    t: float
    stats: KsmStats
    ksmd_cpu_s: float | None
    settings: dict[str, int | str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, **self.stats.as_dict(), "ksmd_cpu_s": self.ksmd_cpu_s, "settings": self.settings}


class KsmController:
    """Apply settings to KSM, remembering every original value (thread-safe)."""

    def __init__(
        self,
        ksm: Ksm | None = None,
        store: KnobStore | None = None,
        unmerge_on_restore: bool = False,
        on_change: Callable[[str, Any, Any], None] | None = None,
    ) -> None:
        self.ksm = ksm or Ksm()
        self.store: KnobStore = store or MemoryKnobStore()
        self.unmerge_on_restore = unmerge_on_restore
        self.on_change = on_change
        self._lock = threading.RLock()
        self.originals: dict[str, int | str] = dict(self.store.load())
        self.ksmd = KsmdCpu()

    @property
    def changed(self) -> bool:
        return bool(self.originals)

    # -- reading ------------------------------------------------------------------------------
    def sample(self) -> Sample:
        return Sample(time.time(), self.ksm.stats(), self.ksmd.seconds(), self.ksm.settings())

    # -- writing ------------------------------------------------------------------------------
    def set(self, knob: str, value: int | str, unmerge: bool = False) -> bool:
        """Set one tunable (saving its original first); ``True`` when the value changed."""
        if knob not in TUNABLES:
            raise KsmError(f"unknown KSM tunable {knob!r}")
        with self._lock:
            cur = self.ksm.read(knob)
            if cur == value or str(cur) == str(value):
                return False
            if knob in NEEDS_UNMERGED and unmerge and self.ksm.read_int("pages_shared") > 0:
                self._write("run", RUN_UNMERGE)
            self._write(knob, value, cur)
            return True

    def _write(self, knob: str, value: int | str, cur: int | str | None = None) -> None:
        if cur is None:
            cur = self.ksm.read(knob)
        if knob not in self.originals:
            self.originals[knob] = cur
            self.store.save(knob, cur, value)  # durable before the change
        else:
            self.store.save(knob, self.originals[knob], value)
        self.ksm.write(knob, value)
        log.info("ksm: %s %s -> %s", knob, cur, value)
        if self.on_change is not None:
            self.on_change(knob, cur, value)

    def apply(self, s: KsmSettings) -> dict[str, tuple[Any, Any]]:
        """Write the settings that differ (scan parameters first, then ``run``).

        With ``s.advisor`` the advisor's knobs are written and ``advisor_mode`` set to
        ``scan-time``; ``pages_to_scan`` is then the kernel's. Without it an advisor left on is
        turned off first (the kernel refuses ``pages_to_scan`` while it is on)."""
        changed: dict[str, tuple[Any, Any]] = {}
        with self._lock:
            steps: list[tuple[str, int | str]] = []
            if s.advisor is not None:
                if not self.ksm.has("advisor_mode"):
                    raise KsmError("this kernel has no KSM advisor (advisor_mode: Linux 6.8+)")
                steps += [*s.advisor.knobs().items(), ("advisor_mode", "scan-time")]
            else:
                if self.ksm.has("advisor_mode"):
                    steps.append(("advisor_mode", "none"))
                steps.append(("pages_to_scan", s.pages_to_scan))
            steps += [("sleep_millisecs", s.sleep_millisecs), ("run", s.run)]
            for knob, value in steps:
                before = self.ksm.read(knob)
                if self.set(knob, value):
                    changed[knob] = (before, value)
        return changed

    def unmerge(self) -> None:
        """``run=2``: unmerge every merged page on the host (and stop ksmd)."""
        with self._lock:
            self._write("run", RUN_UNMERGE)

    # -- restoring ----------------------------------------------------------------------------
    def restore(self) -> dict[str, Any]:
        """Write every saved original back (``run`` last). Returns per-knob outcome; knobs that
        could not be restored stay saved (and are retried by the next restore)."""
        out: dict[str, Any] = {}
        with self._lock:
            pending = dict(self.originals)
            if not pending:
                return out
            orig_run = pending.get("run", self._safe_read("run"))
            ksm_was_off = orig_run != RUN_MERGE
            if orig_run is not None:
                pending.setdefault("run", orig_run)  # unmerging below writes run; put it back last
            if self.unmerge_on_restore and ksm_was_off:
                self._raw_write_ok("run", RUN_UNMERGE)
            for knob in TUNABLES:
                if knob not in pending or knob == "run":
                    continue
                if knob == "pages_to_scan" and str(self._safe_read("advisor_mode")) not in ("none", "None"):
                    # The advisor was on before we touched KSM and is back on: it owns the value.
                    self.store.forget(knob)
                    self.originals.pop(knob, None)
                    out[knob] = {"skipped": "the kernel's advisor sets it", "original": pending[knob]}
                    continue
                out[knob] = self._restore_one(knob, pending[knob], allow_unmerge=ksm_was_off or self.unmerge_on_restore)
            if "run" in pending:
                out["run"] = self._restore_one("run", pending["run"], allow_unmerge=False)
        return out

    def _safe_read(self, knob: str) -> int | str | None:
        try:
            return self.ksm.read(knob)
        except KsmError:
            return None

    def _raw_write_ok(self, knob: str, value: int | str) -> bool:
        try:
            self.ksm.write(knob, value)
            return True
        except KsmError as exc:
            log.warning("ksm: %s", exc)
            return False

    def _restore_one(self, knob: str, value: int | str, allow_unmerge: bool) -> dict[str, Any]:
        try:
            cur = self.ksm.read(knob)
            if cur != value and str(cur) != str(value):
                try:
                    self.ksm.write(knob, value)
                except KsmError:
                    if knob in NEEDS_UNMERGED and allow_unmerge:
                        self.ksm.write("run", RUN_UNMERGE)
                        self.ksm.write(knob, value)
                    else:
                        raise
            self.store.forget(knob)
            self.originals.pop(knob, None)
            log.info("ksm: restored %s %s -> %s", knob, cur, value)
            if self.on_change is not None:
                self.on_change(knob, cur, value)
            return {"restored": value, "was": cur}
        except KsmError as exc:
            log.warning("ksm: could not restore %s to %s: %s", knob, value, exc)
            return {"error": str(exc), "original": value}


__all__ = [
    "NEEDS_UNMERGED",
    "RUN_MERGE",
    "RUN_STOP",
    "RUN_UNMERGE",
    "KnobStore",
    "KsmController",
    "LedgerKnobStore",
    "MemoryKnobStore",
    "Sample",
]
