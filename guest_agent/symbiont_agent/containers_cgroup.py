"""A thin cgroup v2 library: read and write one group's interface files, parse what they say.

Standard library only, so the same module serves the guest agent (containers inside a VM)
and the host daemon (``cpu.weight``/``cpu.max`` on each VM's QEMU cgroup on a cgroup v2
host). Every write names the file and the value in its error, and the parsers are pure
functions, unit-tested on the host; the writes are tested for real inside a guest, where
cgroup v2 has every controller.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterable

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel refuses smaller cpu.max quotas
MAX_QUOTA_US = (1 << 53) // 1000  # sane upper bound for a JSON number
CPU_WEIGHT_MIN, CPU_WEIGHT_MAX = 1, 10_000
MAX_BYTES = 1 << 50  # 1 PiB: any memory value above is a typo


class CgroupError(Exception):
    """A cgroup file could not be read or written (the message names file and value)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# -- pure parsers and formatters -----------------------------------------------------------
def parse_flat_keyed(text: str) -> dict[str, int]:
    """``cpu.stat``/``memory.stat`` style ``key value`` lines -> dict of ints."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_nested_keyed(text: str) -> dict[str, dict[str, float]]:
    """``memory.pressure``/``io.pressure`` style lines: ``some avg10=0.00 ... total=12``."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        if not fields:
            continue
        row: dict[str, float] = {}
        for f in fields:
            k, sep, v = f.partition("=")
            if not sep:
                continue
            try:
                row[k] = float(v)
            except ValueError:
                continue
        out[kind] = row
    return out


def parse_pressure(text: str) -> dict[str, float]:
    """PSI file -> flat ``some_avg10``, ``some_total_us``, ``full_avg10`` ... keys."""
    flat: dict[str, float] = {}
    for kind, row in parse_nested_keyed(text).items():
        for k, v in row.items():
            flat[f"{kind}_{k}" + ("_us" if k == "total" else "")] = v
    return flat


def parse_mem_value(text: str) -> int | None:
    """``memory.max``-style value: ``max`` -> None, else bytes."""
    t = text.strip()
    if t == "max":
        return None
    return int(t)


def format_mem_value(value: int | None) -> str:
    if value is None:
        return "max"
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BYTES:
        raise ValueError(f"memory value {value!r} must be an integer number of bytes in 0..{MAX_BYTES}, or None")
    return str(value)


def parse_cpu_max(text: str) -> tuple[int | None, int]:
    """``cpu.max``: ``"max 100000"`` -> (None, 100000); ``"50000 100000"`` -> (50000, 100000)."""
    parts = text.split()
    if not parts:
        raise ValueError("empty cpu.max")
    quota = None if parts[0] == "max" else int(parts[0])
    period = int(parts[1]) if len(parts) > 1 else DEFAULT_PERIOD_US
    return quota, period


def format_cpu_max(quota_us: int | None, period_us: int = DEFAULT_PERIOD_US) -> str:
    if not 1_000 <= period_us <= 1_000_000:
        raise ValueError(f"cpu.max period {period_us} us outside 1000..1000000")
    if quota_us is None:
        return f"max {period_us}"
    if not MIN_QUOTA_US <= quota_us <= MAX_QUOTA_US:
        raise ValueError(f"cpu.max quota {quota_us} us outside {MIN_QUOTA_US}..{MAX_QUOTA_US}")
    return f"{quota_us} {period_us}"


def parse_cpu_list(text: str) -> list[int]:
    """``'0-2,5'`` -> ``[0, 1, 2, 5]`` (sorted, unique); raises ValueError on junk."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if lo < 0 or hi < lo or hi - lo > 4096:
                raise ValueError(f"bad CPU range {part!r}")
            cpus.update(range(lo, hi + 1))
        else:
            n = int(part)
            if n < 0:
                raise ValueError(f"bad CPU number {part!r}")
            cpus.add(n)
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'`` (the kernel's own form)."""
    s = sorted(set(cpus))
    out: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out)


def parse_proc_cgroup(text: str) -> str | None:
    """The cgroup v2 path of a process from ``/proc/PID/cgroup`` (the ``0::`` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


# -- one group -----------------------------------------------------------------------------
class Cgroup:
    """One cgroup v2 directory. Paths are absolute; ``child`` refuses names that escape it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r})"

    # files
    def file(self, name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise CgroupError(f"bad cgroup file name {name!r}")
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self.file(name))

    def read(self, name: str) -> str:
        try:
            with open(self.file(name)) as fh:
                return fh.read()
        except OSError as exc:
            raise CgroupError(f"read {self.file(name)}: {exc.strerror}", exc.errno) from None

    def write(self, name: str, value: str) -> None:
        try:
            with open(self.file(name), "w") as fh:
                fh.write(value)
        except OSError as exc:
            raise CgroupError(f"write {value!r} to {self.file(name)}: {exc.strerror}", exc.errno) from None

    # tree
    @property
    def exists(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "cgroup.procs"))

    def child(self, name: str) -> Cgroup:
        if not name or "/" in name or name in (".", ".."):
            raise CgroupError(f"bad cgroup name {name!r}")
        return Cgroup(os.path.join(self.path, name))

    def children(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.path) if e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def create(self) -> bool:
        """mkdir; True when it was made now, False when it existed."""
        try:
            os.mkdir(self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise CgroupError(f"mkdir {self.path}: {exc.strerror}") from None

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir (the group must be empty of processes and children); retries while it drains."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"rmdir {self.path}: {exc.strerror}") from None
                time.sleep(0.02)

    # controllers
    def controllers(self) -> set[str]:
        return set(self.read("cgroup.controllers").split())

    def subtree_control(self) -> set[str]:
        return set(self.read("cgroup.subtree_control").split())

    def enable(self, controllers: Iterable[str]) -> list[str]:
        """Enable controllers for the children; returns those that were not on before."""
        want = [c for c in controllers if c not in self.subtree_control()]
        if want:
            self.write("cgroup.subtree_control", " ".join(f"+{c}" for c in want))
        return want

    def disable(self, controllers: Iterable[str]) -> None:
        names = [c for c in controllers if c in self.subtree_control()]
        if names:
            self.write("cgroup.subtree_control", " ".join(f"-{c}" for c in names))

    # processes
    def procs(self) -> list[int]:
        return [int(x) for x in self.read("cgroup.procs").split()]

    def populated(self) -> bool:
        try:
            return parse_flat_keyed(self.read("cgroup.events")).get("populated", 0) == 1
        except CgroupError:
            return False

    def add_proc(self, pid: int) -> None:
        """Move ``pid`` here (0: the calling process)."""
        self.write("cgroup.procs", str(pid))

    def kill(self, timeout: float = 2.0) -> bool:
        """Kill every process in the group (``cgroup.kill``, else SIGKILL each); True once empty."""
        if self.has("cgroup.kill"):
            self.write("cgroup.kill", "1")
        else:
            for pid in self.procs():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while self.populated():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every process of the group; returns how many got it."""
        n = 0
        for pid in self.procs():
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
        return n

    # cpu
    def cpu_weight(self) -> int:
        return int(self.read("cpu.weight"))

    def set_cpu_weight(self, weight: int) -> None:
        if not isinstance(weight, int) or isinstance(weight, bool) or not CPU_WEIGHT_MIN <= weight <= CPU_WEIGHT_MAX:
            raise ValueError(f"cpu.weight {weight!r} outside {CPU_WEIGHT_MIN}..{CPU_WEIGHT_MAX}")
        self.write("cpu.weight", str(weight))

    def cpu_max(self) -> tuple[int | None, int]:
        return parse_cpu_max(self.read("cpu.max"))

    def set_cpu_max(self, quota_us: int | None, period_us: int = DEFAULT_PERIOD_US) -> None:
        self.write("cpu.max", format_cpu_max(quota_us, period_us))

    def cpuset_cpus(self) -> list[int]:
        return parse_cpu_list(self.read("cpuset.cpus"))

    def cpuset_effective(self) -> list[int]:
        return parse_cpu_list(self.read("cpuset.cpus.effective"))

    def set_cpuset_cpus(self, cpus: Iterable[int] | None) -> None:
        """Pin to ``cpus``; None or empty: inherit the parent's CPUs."""
        self.write("cpuset.cpus", format_cpu_list(cpus or []))

    def cpu_stat(self) -> dict[str, int]:
        return parse_flat_keyed(self.read("cpu.stat"))

    # memory
    def mem(self, name: str) -> int | None:
        """``memory.max``/``high``/``low``/``min``: None means ``max``."""
        return parse_mem_value(self.read(f"memory.{name}"))

    def set_mem(self, name: str, value: int | None) -> None:
        if name not in ("max", "high", "low", "min"):
            raise ValueError(f"unknown memory limit {name!r}")
        self.write(f"memory.{name}", format_mem_value(value))

    def memory_current(self) -> int:
        return int(self.read("memory.current"))

    def memory_stat(self) -> dict[str, int]:
        return parse_flat_keyed(self.read("memory.stat"))

    def pressure(self, resource: str) -> dict[str, float]:
        try:
            return parse_pressure(self.read(f"{resource}.pressure"))
        except CgroupError:
            return {}

    def reclaim(self, nbytes: int) -> tuple[int, str]:
        """Ask the kernel to reclaim ``nbytes`` from this group (``memory.reclaim``).

        Returns (bytes freed as seen in memory.current, ``ok``/``partial``/``unsupported``):
        the kernel answers EAGAIN when it could not reclaim the whole amount (anonymous
        memory without swap, for instance), which is reported, not raised.
        """
        if nbytes <= 0:
            return 0, "ok"
        before = self.memory_current()
        status = "ok"
        if not self.has("memory.reclaim"):
            return 0, "unsupported"
        try:
            self.write("memory.reclaim", str(int(nbytes)))
        except CgroupError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            status = "partial"
        return max(0, before - self.memory_current()), status


def cgroup_v2_root(root: str = CGROUP_ROOT) -> Cgroup | None:
    """The unified hierarchy's root when ``root`` is a cgroup v2 mount, else None."""
    g = Cgroup(root)
    return g if g.has("cgroup.controllers") else None


def parse_cgroup2_mounts(text: str) -> list[str]:
    """Mount points of cgroup2 file systems in ``/proc/self/mounts`` text."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            out.append(parts[1].replace("\\040", " "))
    return out


def cgroup2_mount(mounts_path: str = "/proc/self/mounts") -> str | None:
    """Where the unified hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified`` on a hybrid host)."""
    try:
        with open(mounts_path) as fh:
            found = parse_cgroup2_mounts(fh.read())
    except OSError:
        return None
    return found[0] if found else None


def cgroup_of_pid(pid: int, root: str = CGROUP_ROOT) -> Cgroup | None:
    """The cgroup v2 group holding ``pid`` (None when the process is gone or no v2 path)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            rel = parse_proc_cgroup(fh.read())
    except OSError:
        return None
    if rel is None:
        return None
    return Cgroup(os.path.join(root, rel.lstrip("/")))
