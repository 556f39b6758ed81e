"""Thin, typed adapter over Kernel Samepage Merging: ``/sys/kernel/mm/ksm`` and ``/proc/PID``.

Nothing here decides anything: it reads counters, reads and writes tunables (raising
:class:`KsmError` with the kernel's reason when a write is refused) and reads the CPU time of
the ``ksmd`` kernel thread. Policies live in :mod:`symbiont.dedup.policy`; saving and restoring
the tunables is :mod:`symbiont.dedup.ksm_controller`'s job.

Counters (Documentation/admin-guide/mm/ksm.rst):

* ``pages_shared``   KSM pages in use (one frame each; the copies that are kept);
* ``pages_sharing``  further mappings of those pages: the frames *saved*;
* ``pages_unshared`` pages scanned repeatedly that are unique but still candidates;
* ``pages_volatile`` pages changing too fast to be placed in the tree;
* ``full_scans``     completed passes over all mergeable memory.

Per process (Linux 6.1+): ``/proc/PID/ksm_stat`` (``ksm_rmap_items``, ``ksm_merging_pages``,
``ksm_process_profit``, ``ksm_zero_pages``, ...) and ``/proc/PID/ksm_merging_pages``.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from symbiont.host.port import HostError

KSM_DIR = Path("/sys/kernel/mm/ksm")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Tunables the controller may turn, in the order they are restored (``run`` last, so that the
# scanner only restarts once its other parameters are back). ``advisor_mode`` (Linux 6.8+) comes
# before ``pages_to_scan``: while the advisor is on the kernel refuses pages_to_scan (EINVAL), and
# turning it off resets pages_to_scan to 100, so the original must be written after it.
TUNABLES = (
    "advisor_mode",
    "advisor_target_scan_time",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "pages_to_scan",
    "sleep_millisecs",
    "use_zero_pages",
    "smart_scan",
    "max_page_sharing",
    "merge_across_nodes",
    "stable_node_chains_prune_millisecs",
    "run",
)

COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "pages_scanned",
    "pages_skipped",
    "ksm_zero_pages",
    "general_profit",
    "stable_node_chains",
    "stable_node_dups",
)

RUN_STOP, RUN_MERGE, RUN_UNMERGE = 0, 1, 2

# The kernel refuses these (EBUSY) while any page is merged: unmerge (run=2) first.
# (use_zero_pages may change at any time: mm/ksm.c's use_zero_pages_store has no such check.)
NEEDS_UNMERGED = ("max_page_sharing", "merge_across_nodes")


def restore_order(name: str) -> int:
    """A tunable's place when several are written: :data:`TUNABLES` order (``run`` last)."""
    return TUNABLES.index(name) if name in TUNABLES else len(TUNABLES) - 1


def write_plan(current: Mapping[str, int | str], wanted: Mapping[str, int | str]) -> tuple[list[str], bool]:
    """The tunables of ``wanted`` to write so that KSM reads ``wanted``, in the order to write
    them, and whether ``run=2`` (unmerge) must be written before them.

    Order: :func:`restore_order`. Written: what differs from ``current`` (a missing one
    differs), ``pages_to_scan`` also after ``advisor_mode`` goes to ``none`` (the kernel then
    resets it to 100). Unmerge first when one of :data:`NEEDS_UNMERGED` is written, and then
    ``run`` too (last), since unmerging wrote it. The overcommit experiment restores the host by
    this plan; the dedup part's ledger kind, which writes one knob at a time, orders by
    :func:`restore_order` and unmerges for :data:`NEEDS_UNMERGED` only when allowed to.
    """

    def same(name: str) -> bool:
        return name in current and (current[name] == wanted[name] or str(current[name]) == str(wanted[name]))

    todo = {name for name in wanted if not same(name)}
    if str(wanted.get("advisor_mode")) == "none" and "advisor_mode" in todo and "pages_to_scan" in wanted:
        todo.add("pages_to_scan")
    unmerge = any(name in NEEDS_UNMERGED for name in todo)
    if unmerge and "run" in wanted:
        todo.add("run")
    return sorted(todo, key=lambda name: (name == "run", restore_order(name), name)), unmerge


class KsmError(HostError):
    """KSM is missing, a value is invalid, or the kernel refused a write (message says why)."""


@dataclass(frozen=True)
class KsmStats:
    """One reading of the global counters (absent counters are ``None``)."""

    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    full_scans: int
    pages_scanned: int | None = None
    pages_skipped: int | None = None
    ksm_zero_pages: int | None = None
    general_profit: int | None = None
    stable_node_chains: int | None = None
    stable_node_dups: int | None = None

    @property
    def saved_bytes(self) -> int:
        """Memory saved by merging: every mapping beyond the first of a KSM page."""
        return self.pages_sharing * PAGE_SIZE

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def _parse_value(text: str) -> int | str:
    text = text.strip()
    m = re.search(r"\[([^\]]+)\]", text)  # advisor_mode: "[none] scan-time"
    if m:
        return m.group(1)
    try:
        return int(text)
    except ValueError:
        return text


class Ksm:
    """The host's KSM through sysfs (``root`` is replaceable for tests of the parsing)."""

    def __init__(self, root: Path | str = KSM_DIR) -> None:
        self.root = Path(root)

    def available(self) -> bool:
        return (self.root / "run").exists()

    def require(self) -> None:
        if not self.available():
            raise KsmError(f"KSM is not available: {self.root}/run does not exist (kernel built without CONFIG_KSM?)")

    def has(self, name: str) -> bool:
        return (self.root / name).exists()

    def tunables(self) -> list[str]:
        """The tunables this kernel has, in restore order."""
        return [t for t in TUNABLES if self.has(t)]

    def read(self, name: str) -> int | str:
        if "/" in name or name.startswith("."):
            raise KsmError(f"not a KSM file name: {name!r}")
        try:
            return _parse_value((self.root / name).read_text())
        except FileNotFoundError:
            raise KsmError(f"this kernel has no KSM file {name!r}") from None
        except OSError as exc:
            raise KsmError(f"reading {self.root / name}: {exc.strerror}") from None

    def read_int(self, name: str) -> int:
        v = self.read(name)
        if not isinstance(v, int):
            raise KsmError(f"{name}: expected an integer, read {v!r}")
        return v

    def write(self, name: str, value: int | str) -> None:
        """Write one tunable; the kernel's refusal (EBUSY, EINVAL, EPERM) becomes a KsmError."""
        if name not in TUNABLES:
            raise KsmError(f"{name!r} is not a KSM tunable this adapter writes (known: {', '.join(TUNABLES)})")
        path = self.root / name
        if not path.exists():
            raise KsmError(f"this kernel has no KSM tunable {name!r}")
        try:
            with open(path, "w") as fh:
                fh.write(f"{value}\n")
        except OSError as exc:
            why = {
                errno.EBUSY: "busy (max_page_sharing and merge_across_nodes can only change while no "
                "pages are merged: unmerge with run=2 first)",
                errno.EINVAL: "invalid value",
                errno.EPERM: "permission denied (needs root)",
                errno.EACCES: "permission denied (needs root)",
            }.get(exc.errno or 0, exc.strerror or str(exc))
            raise KsmError(f"writing {value!r} to {path}: {why}") from None

    def settings(self) -> dict[str, int | str]:
        return {t: self.read(t) for t in self.tunables()}

    def stats(self) -> KsmStats:
        vals: dict[str, int | None] = {}
        for c in COUNTERS:
            try:
                v = self.read(c)
            except KsmError:
                vals[c] = None
                continue
            vals[c] = v if isinstance(v, int) else None
        for required in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans"):
            if vals.get(required) is None:
                raise KsmError(f"KSM counter {required} is missing under {self.root}")
        return KsmStats(**vals)  # type: ignore[arg-type]


# -- per process ----------------------------------------------------------------------------------
def process_ksm_stat(pid: int, proc: Path | str = "/proc") -> dict[str, int | bool] | None:
    """``/proc/PID/ksm_stat`` as a dict (``ksm_merging_pages`` etc.); ``None`` if the process is gone.

    Falls back to ``/proc/PID/ksm_merging_pages`` (Linux 5.19+) when ``ksm_stat`` is absent.
    """
    base = Path(proc) / str(pid)
    out: dict[str, int | bool] = {}
    try:
        text = (base / "ksm_stat").read_text()
    except FileNotFoundError:
        if not base.exists():
            return None
        text = ""
    except ProcessLookupError:
        return None
    except OSError:
        text = ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        k, v = parts
        k = k.rstrip(":")  # "ksm_merge_any: no" vs "ksm_rmap_items 10"
        if v in ("yes", "no"):
            out[k] = v == "yes"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                continue
    if "ksm_merging_pages" not in out:
        try:
            out["ksm_merging_pages"] = int((base / "ksm_merging_pages").read_text().strip())
        except (OSError, ValueError):
            if not base.exists():
                return None
    return out


def process_merging_pages(pid: int, proc: Path | str = "/proc") -> int | None:
    st = process_ksm_stat(pid, proc)
    if st is None:
        return None
    v = st.get("ksm_merging_pages")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def mergeable_processes(proc: Path | str = "/proc") -> dict[int, dict[str, int | bool]]:
    """Every process KSM tracks or may merge (``ksm_mergeable: yes``, rmap items or merged pages)."""
    out: dict[int, dict[str, int | bool]] = {}
    for entry in Path(proc).iterdir():
        if not entry.name.isdigit():
            continue
        st = process_ksm_stat(int(entry.name), proc)
        if st and (st.get("ksm_rmap_items", 0) or st.get("ksm_merging_pages", 0) or st.get("ksm_mergeable") is True):
            out[int(entry.name)] = st
    return out


# -- ksmtuned's inputs ---------------------------------------------------------------------------
QEMU_NAME = re.compile(r"^qemu(-(kvm|system-.+)|:.{1,11})$")  # ksmtuned's pgrep pattern


def meminfo_kib(path: Path | str = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` in KiB."""
    out: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        k, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[k] = int(parts[0])
    return out


def qemu_committed_kib() -> int:
    """ksmtuned's committed memory: the summed RSS of every QEMU process on the host."""
    total = 0
    for p in psutil.process_iter(["name", "memory_info"]):
        try:
            if QEMU_NAME.match(p.info["name"] or "") and p.info["memory_info"] is not None:
                total += p.info["memory_info"].rss // 1024
        except psutil.Error:
            continue
    return total


# -- ksmd -----------------------------------------------------------------------------------------
def ksmd_pid(proc: Path | str = "/proc") -> int | None:
    """PID of the ``ksmd`` kernel thread (a child of kthreadd, PID 2), or ``None``."""
    for entry in Path(proc).iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "ksmd":
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields and int(fields[1]) == 2:  # ppid
            return int(entry.name)
    return None


def process_cpu_seconds(pid: int, proc: Path | str = "/proc") -> float | None:
    """utime + stime of a process or kernel thread from ``/proc/PID/stat``, in seconds."""
    try:
        stat = (Path(proc) / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # after "pid (comm) ": state=0 ... utime=11, stime=12 (stat fields 14 and 15)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class KsmdCpu:
    """ksmd's CPU seconds, found once and re-found if the thread changes."""

    def __init__(self, proc: Path | str = "/proc") -> None:
        self.proc = proc
        self.pid = ksmd_pid(proc)

    def seconds(self) -> float | None:
        if self.pid is None:
            self.pid = ksmd_pid(self.proc)
            if self.pid is None:
                return None
        v = process_cpu_seconds(self.pid, self.proc)
        if v is None:
            self.pid = None
        return v


__all__ = [
    "CLK_TCK",
    "COUNTERS",
    "KSM_DIR",
    "NEEDS_UNMERGED",
    "PAGE_SIZE",
    "RUN_MERGE",
    "RUN_STOP",
    "RUN_UNMERGE",
    "TUNABLES",
    "Ksm",
    "KsmError",
    "KsmStats",
    "KsmdCpu",
    "ksmd_pid",
    "meminfo_kib",
    "mergeable_processes",
    "process_cpu_seconds",
    "process_ksm_stat",
    "process_merging_pages",
    "qemu_committed_kib",
    "restore_order",
    "write_plan",
]
