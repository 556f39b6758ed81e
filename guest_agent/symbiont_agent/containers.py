"""Containers inside the guest: a process tree in its own cgroup v2 group and namespaces.

The agent owns one delegated subtree, ``/sys/fs/cgroup/symbiont-ct`` (a sibling of systemd's
slices: the agent runs as root and makes it itself, enabling the ``cpu``, ``cpuset``,
``memory`` and ``pids`` controllers; no process ever lives in it directly, so the "no
internal processes" rule holds). A container is one child group ``symbiont-ct/NAME`` and a
command started through ``unshare --pid --fork --mount-proc --uts --ipc --mount`` (and
``--net`` when asked): the spawned process moves itself into the group before it execs, so
every descendant is accounted and limited from its first instruction.

Limits: ``cpu.weight``, ``cpu.max``, ``cpuset.cpus``, ``memory.max``/``high``/``low``,
``pids.max`` and the no-reclaim flag. A container with a ``cpu_ratio`` is *ratio-managed*:
its ``cpu.weight``/``cpu.max``/``cpuset.cpus`` are set by the ratio policy
(:mod:`symbiont_agent.containers_policy`) and recomputed after every vCPU change when the
agent is nesting-aware. Usage comes from ``cpu.stat``, ``memory.current``, ``memory.stat``
and the PSI files.

What the agent changes outside a container's own group (controllers enabled on the root,
``memory.min`` of the subtree for no-reclaim protection, a ``memory.high`` lowered by
reclamation) is recorded with its original value and put back when the container (or the
last container) goes away; the container's own group, and so its values, is removed.

State is kept in ``/run/symbiont-agent/containers.json`` so that a restarted agent (systemd
restarts it) still knows its containers; their processes are outside the agent's unit
cgroup and survive it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from symbiont_agent import containers_policy as policy
from symbiont_agent.containers_cgroup import (
    CGROUP_ROOT,
    DEFAULT_PERIOD_US,
    MAX_BYTES,
    Cgroup,
    CgroupError,
    format_cpu_list,
    parse_cpu_list,
)

log = logging.getLogger("symbiont-agent.containers")

SUBTREE = "symbiont-ct"
CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
STATE_PATH = "/run/symbiont-agent/containers.json"
LOG_DIR = "/var/log/symbiont-containers"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
MAX_CONTAINERS = 64
MAX_ARGS = 64
MAX_ARG_LEN = 4096
MAX_CMD_BYTES = 16384
PROTECT_HEADROOM = 16 << 20  # no-reclaim protection above the current usage
MEMORY_STAT_KEYS = (
    "anon", "file", "kernel", "shmem", "file_mapped", "file_dirty", "active_anon", "inactive_anon",
    "active_file", "inactive_file", "slab", "sock", "pgfault", "pgmajfault", "pgscan", "pgsteal",
    "workingset_refault_file", "workingset_refault_anon",
)
LIMIT_KEYS = (
    "cpu_weight", "cpu_max", "cpuset", "memory_max", "memory_high", "memory_low", "pids_max",
    "no_reclaim", "cpu_ratio", "mem_shares",
)
UNSET = object()


class ContainerError(Exception):
    """Base of the container errors; the agent answers with ``TypeName: message``."""


class InvalidSpec(ContainerError):
    """Bad input: nothing was changed."""


class NoSuchContainer(ContainerError):
    """The container does not exist."""


class Conflict(ContainerError):
    """The request does not fit the container's state (already exists, already running...)."""


# -- validation (pure) ---------------------------------------------------------------------
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(key: str, value: Any) -> int | None:
    """Bytes from an int or a string such as ``"256M"``; ``None``/``"max"`` mean no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidSpec(f"{key}: expected bytes (an integer or e.g. '256M'), got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        s = value.strip().upper().removesuffix("B").removesuffix("I")
        if s == "MAX":
            return None
        m = re.fullmatch(r"(\d+)([KMGT]?)", s)
        if not m:
            raise InvalidSpec(f"{key}: expected bytes (an integer or e.g. '256M'), got {value!r}")
        n = int(m.group(1)) * _SUFFIX[m.group(2)]
    else:
        raise InvalidSpec(f"{key}: expected bytes (an integer or e.g. '256M'), got {value!r}")
    if not 0 <= n <= MAX_BYTES:
        raise InvalidSpec(f"{key}: {n} bytes outside 0..{MAX_BYTES}")
    return n


def _number(key: str, value: Any, lo: float, hi: float, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InvalidSpec(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if value != value or not lo <= value <= hi:  # NaN or out of range
        raise InvalidSpec(f"{key}: {value!r} outside {lo:g}..{hi:g}")
    return value


def parse_cpu_max(value: Any) -> tuple[int | None, int] | None:
    """``cpu_max``: a number of CPUs (``1.5``), ``"QUOTA PERIOD"``, ``"max"`` or None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split()
        if parts == ["max"]:
            return (None, DEFAULT_PERIOD_US)
        try:
            quota = None if parts[0] == "max" else int(parts[0])
            period = int(parts[1]) if len(parts) > 1 else DEFAULT_PERIOD_US
        except (ValueError, IndexError):
            raise InvalidSpec(f"cpu_max: expected CPUs (e.g. 1.5), 'QUOTA PERIOD' or 'max', got {value!r}") from None
        if len(parts) > 2 or not 1000 <= period <= 1_000_000 or (quota is not None and not 1000 <= quota <= 10**12):
            raise InvalidSpec(f"cpu_max: {value!r} out of range (quota >= 1000 us, period 1000..1000000 us)")
        return (quota, period)
    cpus = _number("cpu_max", value, 0.01, 4096.0)
    return (max(1000, round(float(cpus) * DEFAULT_PERIOD_US)), DEFAULT_PERIOD_US)


def parse_cpuset(value: Any, online: list[int]) -> list[int] | None:
    """``cpuset``: ``"0-1,3"`` or a list of ints, all of them online; None: all CPUs."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            cpus = parse_cpu_list(value)
        elif isinstance(value, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            cpus = sorted(set(value))
        else:
            raise ValueError
    except ValueError:
        raise InvalidSpec(f"cpuset: expected a CPU list such as '0-1,3' or [0, 1], got {value!r}") from None
    if not cpus:
        raise InvalidSpec("cpuset: empty CPU list (leave it unset for all CPUs)")
    outside = sorted(set(cpus) - set(online))
    if outside:
        raise InvalidSpec(
            f"cpuset: CPUs {format_cpu_list(outside)} are not online (online: {format_cpu_list(online)})"
        )
    return cpus


def validate_limits(args: dict[str, Any], online: list[int], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check limit arguments; return the full limit set (``base`` updated with ``args``)."""
    out = dict(base or default_limits())
    unknown = sorted(k for k in args if k not in LIMIT_KEYS)
    if unknown:
        raise InvalidSpec(f"unknown limit(s) {', '.join(unknown)} (known: {', '.join(LIMIT_KEYS)})")
    for k, v in args.items():
        if k == "cpu_weight":
            out[k] = None if v is None else int(_number(k, v, 1, 10_000, integer=True))
        elif k == "cpu_max":
            parsed = parse_cpu_max(v)
            out[k] = None if parsed is None or parsed[0] is None else list(parsed)
        elif k == "cpuset":
            c = parse_cpuset(v, online)
            out[k] = None if c is None else format_cpu_list(c)
        elif k in ("memory_max", "memory_high", "memory_low"):
            out[k] = parse_bytes(k, v)
        elif k == "pids_max":
            out[k] = None if v is None else int(_number(k, v, 1, 1 << 22, integer=True))
        elif k == "no_reclaim":
            if not isinstance(v, bool):
                raise InvalidSpec(f"no_reclaim: expected true or false, got {v!r}")
            out[k] = v
        elif k == "cpu_ratio":
            out[k] = None if v is None else float(_number(k, v, 0.001, 1_000_000.0))
        elif k == "mem_shares":
            out[k] = float(_number(k, v, 0.001, 1_000_000.0))
    if out["cpu_ratio"] is not None:
        clash = [k for k in ("cpu_weight", "cpu_max", "cpuset") if out[k] is not None]
        if clash:
            raise InvalidSpec(
                f"cpu_ratio manages cpu.weight, cpu.max and cpuset.cpus; do not also set {', '.join(clash)}"
            )
    for lo_key, hi_key in (("memory_low", "memory_high"), ("memory_low", "memory_max"), ("memory_high", "memory_max")):
        lo, hi = out[lo_key], out[hi_key]
        if lo is not None and hi is not None and lo > hi:
            raise InvalidSpec(f"{lo_key} ({lo}) must not exceed {hi_key} ({hi})")
    return out


def default_limits() -> dict[str, Any]:
    return {
        "cpu_weight": None, "cpu_max": None, "cpuset": None, "memory_max": None, "memory_high": None,
        "memory_low": None, "pids_max": None, "no_reclaim": False, "cpu_ratio": None, "mem_shares": 100.0,
    }


def validate_command(command: Any, path: str | None = None) -> list[str]:
    """A non-empty argv list of strings whose program exists in the guest's root file system."""
    if not isinstance(command, list) or not command:
        raise InvalidSpec("command: expected a non-empty list of strings (argv)")
    if len(command) > MAX_ARGS:
        raise InvalidSpec(f"command: at most {MAX_ARGS} arguments")
    for a in command:
        if not isinstance(a, str) or len(a) > MAX_ARG_LEN or "\x00" in a:
            raise InvalidSpec(f"command: every argument must be a string of at most {MAX_ARG_LEN} characters")
    if sum(len(a.encode()) for a in command) > MAX_CMD_BYTES:
        raise InvalidSpec(f"command: more than {MAX_CMD_BYTES} bytes")
    prog = command[0]
    found = shutil.which(prog, path=path or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise InvalidSpec(f"command: {prog!r} not found in the guest's root file system")
    return [found, *command[1:]]


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidSpec(f"name: {name!r} must match {NAME_RE.pattern}")
    return name


# -- the manager ---------------------------------------------------------------------------
@dataclass
class Container:
    name: str
    command: list[str]
    limits: dict[str, Any]
    hostname: str
    netns: bool = False
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    stopped_at: float | None = None
    pid: int | None = None
    exit_code: int | None = None
    starts: int = 0
    state: str = "created"  # created | running | stopped | exited
    reclaim_high: int | None = None  # memory.high lowered by reclamation (restored on release)
    protect_min: int | None = None  # memory.min set for no-reclaim protection

    def record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class ContainerManager:
    """All containers of this guest. Every public method validates fully before changing anything."""

    def __init__(
        self,
        root: str = CGROUP_ROOT,
        state_path: str = STATE_PATH,
        log_dir: str = LOG_DIR,
        cpu_root: str = "/sys/devices/system/cpu",
        meminfo_path: str = "/proc/meminfo",
    ) -> None:
        self.root = Cgroup(root)
        self.slice = self.root.child(SUBTREE)
        self.state_path = state_path
        self.log_dir = log_dir
        self.cpu_root = cpu_root
        self.meminfo_path = meminfo_path
        self.containers: dict[str, Container] = {}
        self.nesting_aware = True
        self.cpu_strategy = "pin-share"
        # Values changed outside containers' own groups: file -> original, restored later.
        self.ledger: dict[str, Any] = {}
        self.last_plan: dict[str, Any] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._loaded = False

    # state ---------------------------------------------------------------------------------
    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            with open(self.state_path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return
        try:
            self.nesting_aware = bool(data.get("nesting_aware", True))
            self.cpu_strategy = data.get("cpu_strategy", "pin-share")
            self.ledger = dict(data.get("ledger", {}))
            self.last_plan = dict(data.get("last_plan", {}))
            for rec in data.get("containers", []):
                c = Container(**rec)
                self.containers[c.name] = c
        except (TypeError, ValueError) as exc:
            log.warning("ignoring unreadable container state %s: %s", self.state_path, exc)
            self.containers = {}

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(
                {
                    "nesting_aware": self.nesting_aware,
                    "cpu_strategy": self.cpu_strategy,
                    "ledger": self.ledger,
                    "last_plan": self.last_plan,
                    "containers": [c.record() for c in self.containers.values()],
                },
                fh,
            )
        os.replace(tmp, self.state_path)

    def online_cpus(self) -> list[int]:
        try:
            with open(os.path.join(self.cpu_root, "online")) as fh:
                return parse_cpu_list(fh.read())
        except (OSError, ValueError):
            return [0]

    def get(self, name: Any) -> Container:
        self.load()
        if not isinstance(name, str) or name not in self.containers:
            raise NoSuchContainer(f"no container {name!r} in this guest")
        return self.containers[name]

    def group(self, c: Container) -> Cgroup:
        return self.slice.child(c.name)

    # the subtree ---------------------------------------------------------------------------
    def ensure_subtree(self) -> None:
        """Make ``symbiont-ct`` with the controllers on; remember what was enabled on the root."""
        if not self.root.has("cgroup.controllers"):
            raise ContainerError(f"{self.root.path} is not a cgroup v2 hierarchy")
        missing = [c for c in CONTROLLERS if c not in self.root.controllers()]
        if missing:
            raise ContainerError(f"cgroup v2 controllers {', '.join(missing)} are not available in this guest")
        added = self.root.enable(CONTROLLERS)
        if added:
            self.ledger.setdefault("root.subtree_control.added", [])
            self.ledger["root.subtree_control.added"] = sorted(set(self.ledger["root.subtree_control.added"]) | set(added))
        if self.slice.create():
            self.ledger["slice.created"] = True
        self.slice.enable(CONTROLLERS)

    def release_subtree(self) -> dict[str, Any]:
        """After the last container: put back the subtree's values, remove it if we made it,
        and turn off the root controllers we enabled (where nothing else still uses them)."""
        done: dict[str, Any] = {}
        if self.slice.exists and not self.slice.children():
            if "slice.memory.min" in self.ledger:
                try:
                    self.slice.set_mem("min", int(self.ledger["slice.memory.min"]))
                    done["slice.memory.min"] = self.ledger["slice.memory.min"]
                except (CgroupError, ValueError) as exc:
                    done["slice.memory.min"] = f"error: {exc}"
            if self.ledger.get("slice.created"):
                try:
                    self.slice.remove()
                    done["removed"] = self.slice.path
                except CgroupError as exc:
                    done["error"] = str(exc)
        added = self.ledger.get("root.subtree_control.added", [])
        if added and not self.slice.exists:
            try:
                self.root.disable(added)
                done["root_controllers_disabled"] = added
            except CgroupError as exc:  # another group below the root uses them now
                done["root_controllers_kept"] = f"{added}: {exc}"
        self.ledger = {}
        return done

    # lifecycle -----------------------------------------------------------------------------
    def create(self, args: dict[str, Any]) -> dict[str, Any]:
        self.load()
        self.reap()
        name = validate_name(args.get("name"))
        if name in self.containers:
            raise Conflict(f"container {name!r} already exists")
        if len(self.containers) >= MAX_CONTAINERS:
            raise Conflict(f"at most {MAX_CONTAINERS} containers per guest")
        extra = sorted(set(args) - {"name", "command", "limits", "hostname", "netns", "start"})
        if extra:
            raise InvalidSpec(f"unknown field(s) {', '.join(extra)}")
        command = validate_command(args.get("command"))
        limits_in = args.get("limits") or {}
        if not isinstance(limits_in, dict):
            raise InvalidSpec("limits: expected an object")
        limits = validate_limits(limits_in, self.online_cpus())
        hostname = args.get("hostname", name)
        if not isinstance(hostname, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", hostname):
            raise InvalidSpec(f"hostname: {hostname!r} is not a valid host name")
        netns = args.get("netns", False)
        start = args.get("start", True)
        if not isinstance(netns, bool) or not isinstance(start, bool):
            raise InvalidSpec("netns and start must be true or false")
        self.ensure_subtree()
        c = Container(name=name, command=command, limits=limits, hostname=hostname, netns=netns)
        g = self.group(c)
        if g.exists:  # a left-over of a lost state file: start clean
            g.kill()
            g.remove()
        g.create()
        try:
            self._apply_limits(c, limits)
        except (CgroupError, ValueError) as exc:
            g.remove()
            raise InvalidSpec(f"the kernel refused a limit: {exc}") from None
        self.containers[name] = c
        self.save()
        if start:
            self._start(c)
        else:
            self.rebalance("create")
        return self.view(c)

    def start(self, name: Any) -> dict[str, Any]:
        c = self.get(name)
        self.reap()
        if c.state == "running":
            raise Conflict(f"container {c.name!r} is already running")
        self._start(c)
        return self.view(c)

    def _start(self, c: Container) -> None:
        g = self.group(c)
        os.makedirs(self.log_dir, exist_ok=True)
        logf = open(os.path.join(self.log_dir, f"{c.name}.log"), "ab")  # noqa: SIM115 (child keeps it)
        argv = ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "--ipc", "--mount", "--propagation", "private"]
        if c.netns:
            argv.append("--net")
        # Inside the new namespaces: set the UTS host name, then exec the command.
        argv += ["--", "/bin/sh", "-c", 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"', c.hostname, *c.command]
        procs_file = g.file("cgroup.procs")

        def enter_group() -> None:  # runs in the child between fork and exec
            os.setsid()
            with open(procs_file, "w") as fh:
                fh.write("0")

        try:
            p = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd="/",
                preexec_fn=enter_group, close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ContainerError(f"could not start {c.name!r}: {exc}") from None
        finally:
            logf.close()
        self._procs[c.name] = p
        c.pid, c.state, c.exit_code = p.pid, "running", None
        c.started_at, c.stopped_at = time.time(), None
        c.starts += 1
        self.save()
        self.rebalance("start")

    def stop(self, name: Any, timeout: float = 2.0) -> dict[str, Any]:
        c = self.get(name)
        self._stop(c, timeout)
        self.rebalance("stop")
        return self.view(c)

    def _stop(self, c: Container, timeout: float = 2.0) -> None:
        g = self.group(c)
        if g.exists and g.populated():
            g.signal(signal.SIGTERM)
            deadline = time.monotonic() + min(timeout, 1.0)
            while g.populated() and time.monotonic() < deadline:
                time.sleep(0.02)
            if g.populated() and not g.kill(timeout):
                raise ContainerError(f"container {c.name!r} did not stop within {timeout:.1f} s")
        p = self._procs.pop(c.name, None)
        if p is not None:
            try:
                c.exit_code = p.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        if c.state == "running":
            c.state = "stopped"
            c.stopped_at = time.time()
        self.save()

    def destroy(self, name: Any) -> dict[str, Any]:
        c = self.get(name)
        self._stop(c)
        restored = self._restore_outside(c)
        g = self.group(c)
        g.remove()
        del self.containers[c.name]
        if not self.containers:
            restored["subtree"] = self.release_subtree()
        self.save()
        plan = self.rebalance("destroy") if self.containers else {}
        return {"destroyed": c.name, "restored": restored, "plan": plan}

    def _restore_outside(self, c: Container) -> dict[str, Any]:
        """Put back what was changed outside the container's group because of it."""
        restored: dict[str, Any] = {}
        if c.protect_min is not None:
            c.protect_min = None
            restored["slice.memory.min"] = self._update_protection(exclude=c.name)
        return restored

    def reap(self) -> None:
        """Collect exit statuses of finished containers (the agent is their parent)."""
        for name, p in list(self._procs.items()):
            rc = p.poll()
            if rc is not None:
                self._procs.pop(name)
                c = self.containers.get(name)
                if c is not None and c.state == "running" and not self.group(c).populated():
                    c.state, c.exit_code, c.stopped_at = "exited", rc, time.time()
        changed = False
        for c in self.containers.values():
            if c.state == "running" and c.name not in self._procs and not self.group(c).populated():
                c.state, c.stopped_at = "exited", time.time()  # after an agent restart
                changed = True
        if changed:
            self.save()

    # limits --------------------------------------------------------------------------------
    def set_limits(self, name: Any, args: dict[str, Any]) -> dict[str, Any]:
        c = self.get(name)
        if not isinstance(args, dict) or not args:
            raise InvalidSpec("limits: expected a non-empty object")
        new = validate_limits(args, self.online_cpus(), base=c.limits)
        old = dict(c.limits)
        try:
            self._apply_limits(c, new)
        except (CgroupError, ValueError) as exc:
            try:
                self._apply_limits(c, old)
            except (CgroupError, ValueError):
                log.exception("rolling back limits of %s failed", c.name)
            raise InvalidSpec(f"the kernel refused a limit (rolled back): {exc}") from None
        c.limits = new
        if c.reclaim_high is not None and "memory_high" in args:
            c.reclaim_high = None  # an explicit memory.high replaces the reclamation's
        self.save()
        self.rebalance("set")
        return self.view(c)

    def _apply_limits(self, c: Container, lim: dict[str, Any]) -> None:
        g = self.group(c)
        if lim["cpu_ratio"] is None:
            g.set_cpu_weight(lim["cpu_weight"] or 100)
            q = lim["cpu_max"]
            g.set_cpu_max(*(q if q else (None, DEFAULT_PERIOD_US)))
            g.set_cpuset_cpus(parse_cpu_list(lim["cpuset"]) if lim["cpuset"] else None)
        for key in ("max", "low"):
            g.set_mem(key, lim[f"memory_{key}"] if key == "max" else (lim["memory_low"] or 0))
        high = lim["memory_high"]
        if c.reclaim_high is not None:
            high = c.reclaim_high if high is None else min(high, c.reclaim_high)
        g.set_mem("high", high)
        if g.has("pids.max"):
            g.write("pids.max", "max" if lim["pids_max"] is None else str(lim["pids_max"]))

    # nesting-aware CPU -------------------------------------------------------------------
    def set_mode(self, args: dict[str, Any]) -> dict[str, Any]:
        self.load()
        aware = args.get("nesting_aware", self.nesting_aware)
        strategy = args.get("cpu_strategy", self.cpu_strategy)
        if not isinstance(aware, bool):
            raise InvalidSpec("nesting_aware: expected true or false")
        if strategy not in policy.CPU_STRATEGIES:
            raise InvalidSpec(f"cpu_strategy: {strategy!r} (known: {', '.join(policy.CPU_STRATEGIES)})")
        self.nesting_aware, self.cpu_strategy = aware, strategy
        self.save()
        plan = self.rebalance("mode", force=True) if self.containers else {}
        if self.containers:
            self._update_protection()
        return {**self.mode(), "plan": plan}

    def mode(self) -> dict[str, Any]:
        self.load()
        return {"nesting_aware": self.nesting_aware, "cpu_strategy": self.cpu_strategy}

    def rebalance(self, reason: str = "request", force: bool = False) -> dict[str, Any]:
        """Apply the CPU ratio plan for the CPUs online now.

        Nesting-aware: always. Agnostic (the baseline): only when the set of containers
        changes (create/start/stop/set), never because vCPUs came or went, and with the
        ratio in absolute terms only (default ``cpu.weight``), as a nesting-agnostic
        container manager would configure it.
        """
        self.load()
        t0 = time.monotonic()
        online = self.online_cpus()
        if not self.nesting_aware and reason == "cpus" and not force:
            return {"applied": False, "reason": reason, "why": "nesting-agnostic: allocation kept as it was",
                    "online": online, "allocations": self.last_plan.get("allocations", {})}
        ratios = {
            c.name: c.limits["cpu_ratio"]
            for c in self.containers.values()
            if c.limits.get("cpu_ratio") is not None and c.state == "running"
        }
        plan = (
            policy.cpu_plan(online, ratios, self.cpu_strategy, proportional_weights=self.nesting_aware)
            if ratios else {}
        )
        errors: dict[str, str] = {}
        for name, alloc in plan.items():
            g = self.group(self.containers[name])
            try:
                g.set_cpuset_cpus(alloc.cpuset)
                g.set_cpu_max(alloc.quota_us, alloc.period_us)
                g.set_cpu_weight(alloc.weight)
            except (CgroupError, ValueError) as exc:
                errors[name] = str(exc)
        out = {
            "applied": True, "reason": reason, "online": online, "strategy": self.cpu_strategy,
            "nesting_aware": self.nesting_aware, "allocations": {n: a.as_dict() for n, a in plan.items()},
            "errors": errors, "seconds": round(time.monotonic() - t0, 6), "at": time.time(),
        }
        self.last_plan = {"online": online, "allocations": out["allocations"], "at": out["at"]}
        self.save()
        return out

    # nesting-aware memory ----------------------------------------------------------------
    def _protect_value(self, c: Container) -> int:
        g = self.group(c)
        usage = g.memory_current() if g.exists else 0
        cap = c.limits.get("memory_max")
        want = usage + PROTECT_HEADROOM
        return min(want, cap) if cap is not None else want

    def _update_protection(self, exclude: str | None = None) -> dict[str, Any]:
        """No-reclaim containers get ``memory.min`` = their usage (+ headroom); the subtree's
        ``memory.min`` is exactly their sum, so with ``memory_recursiveprot`` no protection
        leaks to the other containers. Off in nesting-agnostic mode (the stock baseline)."""
        if not self.slice.exists:
            return {}
        if not any(c.limits.get("no_reclaim") or c.protect_min for c in self.containers.values()) \
                and not self.ledger.get("slice.memory.min") and not self.slice.mem("min"):
            return {"slice": 0, "containers": {}}  # nothing protected, nothing to undo
        total = 0
        out: dict[str, int] = {}
        for c in self.containers.values():
            g = self.group(c)
            if not g.exists:
                continue
            want = (
                self._protect_value(c)
                if self.nesting_aware and c.limits.get("no_reclaim") and c.name != exclude and c.state == "running"
                else 0
            )
            try:
                g.set_mem("min", want)
            except (CgroupError, ValueError) as exc:
                log.warning("memory.min of %s: %s", c.name, exc)
                continue
            c.protect_min = want or None
            total += want
            out[c.name] = want
        if "slice.memory.min" not in self.ledger:
            self.ledger["slice.memory.min"] = self.slice.mem("min") or 0
        self.slice.set_mem("min", total)
        self.save()
        return {"slice": total, "containers": out}

    def protect(self) -> dict[str, Any]:
        """Refresh the no-reclaim protection to the containers' current usage (the daemon asks
        every period, so the guest kernel's own reclaim never takes what grew since)."""
        self.load()
        self.reap()
        return self._update_protection() if self.containers else {}

    def _meminfo(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            with open(self.meminfo_path) as fh:
                for line in fh:
                    k, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts:
                        out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
        except (OSError, ValueError):
            pass
        return out

    def reclaim(self, args: dict[str, Any]) -> dict[str, Any]:
        """Free memory before the host inflates the balloon: proportional to shares, never
        from no-reclaim containers. Returns the plan and what each container really gave."""
        self.load()
        self.reap()
        want = args.get("bytes")
        if isinstance(want, bool) or not isinstance(want, int) or not 0 <= want <= MAX_BYTES:
            raise InvalidSpec(f"bytes: expected a non-negative integer, got {want!r}")
        use_free = args.get("use_free", True)
        reserve = args.get("reserve", 32 << 20)
        hold = args.get("hold", True)
        if not isinstance(use_free, bool) or not isinstance(hold, bool):
            raise InvalidSpec("use_free and hold must be true or false")
        if isinstance(reserve, bool) or not isinstance(reserve, int) or not 0 <= reserve <= MAX_BYTES:
            raise InvalidSpec("reserve: expected a non-negative integer")
        t0 = time.monotonic()
        protection = self._update_protection() if self.containers else {}
        mi = self._meminfo()
        slack = max(0, mi.get("MemFree", 0) - reserve) if use_free else 0
        need = max(0, want - slack)
        views = []
        for c in self.containers.values():
            g = self.group(c)
            if not g.exists:
                continue
            views.append(
                policy.MemView(
                    c.name, g.memory_current(), float(c.limits.get("mem_shares") or 100.0),
                    bool(c.limits.get("no_reclaim")), int(c.limits.get("memory_low") or 0),
                )
            )
        plan = policy.reclaim_plan(views, need)
        result: dict[str, Any] = {}
        freed_total = 0
        for v in views:
            amount = plan.get(v.name, 0)
            row: dict[str, Any] = {"usage_before": v.usage, "planned": amount, "no_reclaim": v.no_reclaim,
                                   "shares": v.shares}
            if amount > 0:
                c = self.containers[v.name]
                g = self.group(c)
                try:
                    freed, status = g.reclaim(amount)
                except CgroupError as exc:
                    freed, status = 0, f"error: {exc}"
                row.update(freed=freed, status=status)
                freed_total += freed
                if hold:
                    # Keep it there while the balloon holds the memory: memory.high at the new
                    # size, never below what could not be freed (that would only throttle it).
                    target = max(v.floor, v.usage - amount, g.memory_current(), 1 << 20)
                    conf = c.limits.get("memory_high")
                    c.reclaim_high = target if conf is None else min(conf, target)
                    try:
                        g.set_mem("high", c.reclaim_high)
                        row["memory_high"] = c.reclaim_high
                    except (CgroupError, ValueError) as exc:
                        row["memory_high_error"] = str(exc)
            else:
                row.update(freed=0, status="skipped" if v.no_reclaim else "not needed")
            row["usage_after"] = self.group(self.containers[v.name]).memory_current()
            result[v.name] = row
        self.save()
        return {
            "requested": want, "free_slack": slack, "needed": need, "planned": sum(plan.values()),
            "freed": freed_total, "containers": result, "protection": protection,
            "seconds": round(time.monotonic() - t0, 6),
        }

    def release(self) -> dict[str, Any]:
        """The balloon gave memory back: lift the memory.high that reclamation had lowered."""
        self.load()
        out: dict[str, Any] = {}
        for c in self.containers.values():
            if c.reclaim_high is None:
                continue
            c.reclaim_high = None
            try:
                self.group(c).set_mem("high", c.limits.get("memory_high"))
                out[c.name] = c.limits.get("memory_high")
            except (CgroupError, ValueError) as exc:
                out[c.name] = f"error: {exc}"
        self.save()
        return {"restored_memory_high": out}

    # views ---------------------------------------------------------------------------------
    def usage(self, c: Container, full: bool = False) -> dict[str, Any]:
        g = self.group(c)
        if not g.exists:
            return {}
        out: dict[str, Any] = {}
        try:
            cs = g.cpu_stat()
            out.update(cpu_usage_usec=cs.get("usage_usec", 0), cpu_user_usec=cs.get("user_usec", 0),
                       cpu_system_usec=cs.get("system_usec", 0), nr_throttled=cs.get("nr_throttled", 0),
                       throttled_usec=cs.get("throttled_usec", 0))
            out["memory_current"] = g.memory_current()
            ms = g.memory_stat()
            keys = ms if full else ("anon", "file", "shmem", "kernel")
            out["memory_stat"] = {k: ms[k] for k in keys if k in ms and (full or k in MEMORY_STAT_KEYS)}
            if full:
                out["memory_pressure"] = g.pressure("memory")
                out["cpu_pressure"] = g.pressure("cpu")
                out["io_pressure"] = g.pressure("io")
            else:
                mp = g.pressure("memory")
                out["memory_pressure"] = {k: mp[k] for k in ("some_avg10", "full_avg10") if k in mp}
            out["pids"] = len(g.procs())
        except CgroupError as exc:
            out["error"] = str(exc)
        return out

    def applied(self, c: Container) -> dict[str, Any]:
        g = self.group(c)
        if not g.exists:
            return {}
        try:
            quota, period = g.cpu_max()
            return {
                "cpu.weight": g.cpu_weight(),
                "cpu.max": [quota, period],
                "cpuset.cpus": g.read("cpuset.cpus").strip(),
                "cpuset.cpus.effective": g.read("cpuset.cpus.effective").strip(),
                "memory.max": g.mem("max"), "memory.high": g.mem("high"),
                "memory.low": g.mem("low"), "memory.min": g.mem("min"),
                "pids.max": g.read("pids.max").strip() if g.has("pids.max") else None,
            }
        except (CgroupError, ValueError) as exc:
            return {"error": str(exc)}

    def view(self, c: Container, full: bool = False) -> dict[str, Any]:
        out = {
            "name": c.name, "state": c.state, "command": c.command, "hostname": c.hostname, "netns": c.netns,
            "pid": c.pid, "exit_code": c.exit_code, "created_at": c.created_at, "started_at": c.started_at,
            "stopped_at": c.stopped_at, "starts": c.starts, "limits": c.limits, "reclaim_high": c.reclaim_high,
            "cgroup": self.group(c).path, "applied": self.applied(c), "usage": self.usage(c, full),
        }
        if full:
            out["log"] = os.path.join(self.log_dir, f"{c.name}.log")
        return out

    def list(self) -> dict[str, Any]:
        self.load()
        self.reap()
        return {
            **self.mode(), "online": self.online_cpus(), "time": time.time(),
            "containers": [self.view(c) for c in sorted(self.containers.values(), key=lambda c: c.name)],
        }

    def show(self, name: Any) -> dict[str, Any]:
        c = self.get(name)
        self.reap()
        return self.view(c, full=True)

    def logs(self, name: Any, max_bytes: int = 16384) -> dict[str, Any]:
        c = self.get(name)
        path = os.path.join(self.log_dir, f"{c.name}.log")
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                data = fh.read()
        except OSError:
            data, size = b"", 0
        return {"name": c.name, "size": size, "tail": data.decode(errors="replace")}
