"""``overcommit-density``: how many 512 MiB lab VMs this host keeps under each way of managing
memory, a few busy and the rest idle, before a criterion fails (issue 15's headline).

Configurations, one after the other in the same run, each from an empty host:

* ``stock`` — libvirt alone: no symbiontd, KSM off; pings go straight to each agent's channel.
* ``ksm`` — ksmtuned-like: no daemon; KSM driven by a port of ksmtuned's ``adjust()`` loop
  (:func:`symbiont.dedup.policy.ksmtuned_step`), QEMU marks guest RAM mergeable (its default).
* ``balloon`` — oVirt MoM-like: ``symbiontd`` with only the memory part (ESX policy under one
  budget of host MemTotal − reserve); no sharing, no paging.
* ``full`` — ``symbiontd --profile overcommit`` with ``paging.idle_park`` (the daemon's idle
  policy parks idle VMs: paged out to its zram tier and paused) — the experiment never parks a
  VM itself. Pings go through ``POST /v1/vms/{name}/ping``, which wakes a parked VM first.

For each, N grows over ``steps``; ``active`` of the N VMs run a page-touching loop that writes
its rate (MiB/s of 1 MiB block writes over a ``work_mib`` buffer) to the serial console every
2 s (read on the host from the console log: nothing asks the guest), the rest are idle. After
each step: the active VMs' rate over ``measure_s`` against their rate alone (measured once at
the start, the active VMs only, no daemon), one agent ping per idle VM (sequential; latency
includes a wake), guest OOM messages on the consoles, the host's memory. A step passes when
every active VM keeps ≥ ``min_ratio`` of its rate, the idle pings' p99 is ≤ ``max_ping_s`` and
all answered, and no guest logged an OOM kill. A config stops at its first failing step (or
when the host's MemAvailable would fall below ``min_avail_mib``, or its share of the time
budget is spent: both reported as what bound it).

Host memory per idle VM = its QEMU's PSS (KSM-shared pages divided among their sharers) + its
share of the zram tier's compressed size (``mem_used_total`` prorated by the VM's swapped
pages); RSS would count shared pages once per VM.

VMs are clones restored from a saved template (:mod:`symbiont_research.lab.clone`): seconds
per clone instead of ~20 s of a core per cold boot. ``density.csv`` is written row by row, so a
run stopped early still holds its data.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symbiont.host.procmem import read_smaps_rollup
from symbiont_research.experiments.framework import RunContext, experiment

# The active VMs' workload: write 1 MiB blocks round a buffer of N MiB (every page touched each
# pass); every 2 s print the rate to the serial console, which the host's console log keeps.
TOUCH = """
import mmap, sys, time
mib = int(sys.argv[1])
size = mib << 20
buf = mmap.mmap(-1, size)
blocks = [bytes([i]) * (1 << 20) for i in range(7)]
out = open('/dev/ttyS0', 'w')
n = k = 0
last = time.monotonic()
while True:
    for off in range(0, size, 1 << 20):
        buf[off:off + (1 << 20)] = blocks[k % 7]
        n += 1
    k += 1
    now = time.monotonic()
    if now - last >= 2.0:
        out.write('\\nSYMRATE %.2f\\n' % (n / (now - last)))
        out.flush()
        n, last = 0, now
"""

OOM = re.compile(rb"Out of memory|oom-kill|invoked oom-killer")
RATE = re.compile(rb"SYMRATE ([0-9.]+)")
CONFIGS = ("stock", "ksm", "balloon", "full")

FIELDS = [
    "config", "n", "active", "idle", "parked", "t_s", "clones_added", "restore_s_mean", "restore_s_max",
    "rss_after_restore_mib", "alone_mibs", "active_mibs", "active_ratio_min", "idle_host_mib",
    "idle_pss_mib", "idle_zram_mib", "idle_rss_mib", "active_host_mib", "host_used_mib", "host_avail_mib",
    "zram_data_mib", "zram_compr_mib", "ksm_pages_sharing", "ksmd_cpu_pct", "daemon_cpu_pct",
    "idle_qemu_cpu_pct", "ping_p50_ms", "ping_p99_ms", "ping_max_ms", "pinged", "ping_failed", "woke", "oom",
    "passed", "failed",
]


# -- measurements (pure where they can be: unit-tested) ------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank: with 100 pings p99 is the 99th slowest, not an average)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def seconds_until(hhmm: str, now: float | None = None) -> float:
    """Seconds from ``now`` (epoch) to the next HH:MM UTC."""
    import datetime as dt

    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", hhmm.strip())
    if not m:
        raise ValueError(f"end_by: {hhmm!r} is not HH:MM (UTC)")
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    end = t.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
    if end <= t:
        end += dt.timedelta(days=1)
    return (end - t).total_seconds()


def zram_share_mib(swap_kib: dict[str, int], used_kib: int, mem_used_total: int) -> dict[str, float]:
    """Each VM's share of the zram tier's compressed size: ``mem_used_total`` (bytes, compressed
    data + allocator overhead) prorated by the VM's swapped KiB over all swapped KiB on the tier."""
    if used_kib <= 0 or mem_used_total <= 0:
        return {k: 0.0 for k in swap_kib}
    return {k: mem_used_total * (v / used_kib) / 2**20 for k, v in swap_kib.items()}


def judge(ratios: list[float], pings: list[float | None], oom: int, min_ratio: float,
          max_ping_s: float) -> str:
    """The first criterion a step fails ("" when it passes): OOM, throughput, then pings."""
    if oom:
        return f"guest OOM ({oom} kill message(s) on the consoles)"
    if ratios and min(ratios) < min_ratio:
        return f"active throughput {min(ratios):.2f} of alone < {min_ratio:.2f}"
    failed = sum(1 for p in pings if p is None)
    if failed:
        return f"{failed} idle VM(s) did not answer a ping"
    answered = [p for p in pings if p is not None]
    if answered and percentile(answered, 99) > max_ping_s:
        return f"ping p99 {percentile(answered, 99):.2f} s > {max_ping_s:g} s"
    return ""


def rates_since(log: Path, offset: int) -> tuple[list[float], int]:
    """The SYMRATE values a console log gained after byte ``offset`` (whole lines only); and the
    new offset."""
    from symbiont_research.lab.console import read_lines

    lines, offset = read_lines(log, offset)
    return [float(m.group(1)) for line in lines for m in RATE.finditer(line)], offset


def proc_mem_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and Swap of a process (``smaps_rollup``, KiB)."""
    roll = read_smaps_rollup(pid)
    return {k: roll[k] for k in ("Rss", "Pss", "Swap") if k in roll}


def zram_tier() -> tuple[int, int, int]:
    """(swapped KiB, original data bytes, mem_used_total bytes) over every zram swap device."""
    used_kib = orig = total = 0
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return 0, 0, 0
    for line in lines:
        parts = line.split()
        if not parts or not parts[0].startswith("/dev/zram"):
            continue
        used_kib += int(parts[3])
        with contextlib.suppress(OSError, ValueError, IndexError):
            mm = Path(f"/sys/block/{parts[0][5:]}/mm_stat").read_text().split()
            orig += int(mm[0])
            total += int(mm[2])
    return used_kib, orig, total


class AgentConn:
    """A host-side client of one agent channel (configs without a daemon), kept open as the
    daemon keeps its links: connect, exchange hellos, ping."""

    def __init__(self, path: Path) -> None:
        from symbiont_agent import protocol as proto

        self.proto = proto
        self.path = path
        self.sock: socket.socket | None = None
        self.reader = proto.FrameReader()
        self.mid = 0

    def connect(self, timeout: float) -> float:
        """Connect and wait for the agent's hello; seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
            except OSError:
                s.close()
                time.sleep(0.1)
                continue
            self.sock, self.reader = s, self.proto.FrameReader()
            self.reader.hunt()
            s.sendall(self.proto.encode(self.proto.hello("host", "overcommit", [])))
            greeted = time.monotonic()
            while time.monotonic() < deadline:
                for msg in self._recv(min(1.0, deadline - time.monotonic())):
                    if msg.type == "hello" and msg.header.get("role") == "agent":
                        return time.monotonic() - t0
                if time.monotonic() - greeted > 2.0:  # the agent may have opened its port after us
                    s.sendall(self.proto.encode(self.proto.hello("host", "overcommit", [])))
                    greeted = time.monotonic()
            self.close()
        raise TimeoutError(f"no agent hello on {self.path} within {timeout:.0f} s")

    def _recv(self, timeout: float) -> list[Any]:
        assert self.sock is not None
        self.sock.settimeout(max(0.01, timeout))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        if not data:
            raise ConnectionError(f"{self.path}: closed")
        return self.reader.feed(data)

    def ping(self, timeout: float) -> float | None:
        """Seconds for a ``core.ping`` round trip; None when no answer within ``timeout``."""
        if self.sock is None:
            return None
        self.mid += 1
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        try:
            self.sock.sendall(self.proto.encode(self.proto.request(self.mid, "core.ping", {})))
            while time.monotonic() < deadline:
                for msg in self._recv(deadline - time.monotonic()):
                    if msg.type == "resp" and msg.header.get("id") == self.mid:
                        return time.perf_counter() - t0 if msg.header.get("ok") else None
        except (OSError, ConnectionError, self.proto.ProtocolError):
            return None
        return None

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class KsmTuned(threading.Thread):
    """ksmtuned's loop (its ``adjust()`` ported in symbiont.dedup.policy), every ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True, name="ksmtuned")
        from symbiont.dedup.policy import KsmtunedParams

        self.params = KsmtunedParams(monitor_interval_s=interval_s)
        self.stop_event = threading.Event()
        self.npages = 0
        self.last: dict[str, Any] = {}

    def run(self) -> None:
        from symbiont.dedup.policy import KsmtunedInputs, ksmtuned_step
        from symbiont.host.ksm import Ksm, meminfo_kib, qemu_committed_kib

        ksm = Ksm()
        while not self.stop_event.is_set():
            m = meminfo_kib()
            d = ksmtuned_step(KsmtunedInputs(m["MemTotal"], m["MemFree"] + m.get("Buffers", 0) + m.get("Cached", 0),
                                             qemu_committed_kib(), self.npages), self.params)
            self.npages = int(d.detail["npages"])
            s = d.settings
            with contextlib.suppress(Exception):
                ksm.write("pages_to_scan", s.pages_to_scan)
                ksm.write("sleep_millisecs", s.sleep_millisecs)
                ksm.write("run", s.run)
            self.last = {"run": s.run, "pages_to_scan": s.pages_to_scan, "sleep_ms": s.sleep_millisecs,
                         "why": d.reason}
            self.stop_event.wait(self.params.monitor_interval_s)


def restore_ksm(ksm: Any, saved: dict[str, int | str], note: Callable[[str], None]) -> list[str]:
    """Every KSM tunable back to ``saved`` (the host's own, read before the run), ``run`` last;
    the names that differed. ksmtuned's port and the daemons write ``pages_to_scan``,
    ``sleep_millisecs``, ``run`` and the advisor's knobs; a host left tuned broke the next
    suite's KSM tests (the last session's finding), so each config ends with the host's own.
    The order and the unmerge are :func:`symbiont.host.ksm.write_plan`'s (the dedup part's rules)."""
    from symbiont.host.ksm import RUN_UNMERGE, write_plan

    current: dict[str, int | str] = {}
    for key in ksm.tunables():
        if key in saved:
            try:
                current[key] = ksm.read(key)
            except Exception as exc:  # noqa: BLE001 - the others still go back
                note(f"KSM {key} not restored to {saved[key]!r}: {exc}")
    order, unmerge = write_plan(current, {k: saved[k] for k in current})
    if unmerge:
        try:
            ksm.write("run", RUN_UNMERGE)  # max_page_sharing, merge_across_nodes refuse while pages are merged
        except Exception as exc:  # noqa: BLE001
            note(f"KSM run=2 (unmerge) before restoring {', '.join(order)}: {exc}")
    changed = []
    for key in order:
        try:
            ksm.write(key, saved[key])
            changed.append(key)
        except Exception as exc:  # noqa: BLE001 - the others still go back
            note(f"KSM {key} not restored to {saved[key]!r}: {exc}")
    return changed


@dataclass
class Fleet:
    """One configuration's VMs: clones of the template, their daemon (if any), their channels."""

    ctx: RunContext
    config: str
    host: Any
    cfg: Any
    tpl: Any
    owner: Any
    prefix: str
    work: Path
    p: dict[str, Any]
    note: Callable[[str], None]
    names: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    conns: dict[str, AgentConn] = field(default_factory=dict)
    daemon: Any = None
    ksmtuned: KsmTuned | None = None
    log_offsets: dict[str, int] = field(default_factory=dict)
    oom: dict[str, int] = field(default_factory=dict)
    clone_rows: list[dict[str, Any]] = field(default_factory=list)
    ksm_saved: dict[str, int | str] = field(default_factory=dict)  # the host's KSM before the run

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        from symbiont.host.ksm import Ksm

        ksm = Ksm()
        ksm.write("run", 2)  # unmerge what an earlier config left merged, then off
        ksm.write("run", 0)
        if self.config == "ksm":
            self.ksmtuned = KsmTuned(self.p["ksmtuned_interval_s"])
            self.ksmtuned.start()
        if self.config in ("balloon", "full"):
            self._start_daemon()

    def _start_daemon(self) -> None:
        import yaml

        from symbiont.config import load_config
        from symbiont_research.lab.session import DaemonProcess

        data: dict[str, Any] = {
            "state_dir": str(self.work / "state"), "socket": str(self.work / "symbiontd.sock"),
            "control": {"period_s": self.p["period_s"]},
            "lab": {"vm_prefix": self.prefix},
        }
        if self.config == "balloon":
            data["memory"] = {"enabled": True, "budget_mib": 0}
        else:
            data["profile"] = "overcommit"
            data["paging"] = {"idle_park": True, "idle_after_s": self.p["idle_after_s"],
                              "idle_cpu_pct": self.p["idle_cpu_pct"], "prefetch": self.p["prefetch"],
                              "park_observe_s": self.p["park_observe_s"]}
        path = self.work / "symbiontd.yaml"
        self.work.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        self.daemon = DaemonProcess(path, load_config(path), self.work / "symbiontd.log")
        self.daemon.start()

    def close(self) -> None:
        """Clones first (a parked VM's pages then leave the tier with its process), then the
        daemon (nothing left for its ledger to resume), KSM off and unmerged."""
        from symbiont.host.ksm import Ksm
        from symbiont_research.lab.clone import remove_clone

        for c in self.conns.values():
            c.close()
        for name in self.names:
            try:
                remove_clone(self.host, self.cfg, name, self.owner)
            except Exception as exc:  # noqa: BLE001 - the others still go
                self.note(f"could not remove {name}: {exc}")
        if self.daemon is not None:
            self.daemon.stop()
        if self.ksmtuned is not None:
            self.ksmtuned.stop_event.set()
            self.ksmtuned.join(5)
        with contextlib.suppress(Exception):
            Ksm().write("run", 2)
            Ksm().write("run", 0)
        restore_ksm(Ksm(), self.ksm_saved, self.note)

    # -- VMs --------------------------------------------------------------------------------------
    def add(self, count: int, active: bool = False, stop: Callable[[], str] = lambda: "") -> str:
        """Restore ``count`` more clones ("" or why it stopped early)."""
        import psutil

        from symbiont_research.lab.clone import restore_clone

        new = []
        for _ in range(count):
            if why := stop():
                return why
            if why := self._room(psutil, stop):
                self._attach(new)
                return why
            name = f"{self.prefix}{len(self.names) + 1:03d}"
            c = restore_clone(self.host, self.cfg, self.tpl, name, self.owner)
            self.names.append(name)
            new.append(name)
            if active:
                self.active.append(name)
            self.log_offsets[name] = 0
            self.clone_rows.append({"config": self.config, "vm": name, "running_before": len(self.names) - 1,
                                    "restore_s": round(c.restore_s, 3), "total_s": round(c.total_s, 3),
                                    "rss_after_restore_mib": None if c.rss_mib is None else round(c.rss_mib, 1)})
        self._attach(new)
        return ""

    def _room(self, psutil: Any, stop: Callable[[], str]) -> str:
        """Wait until one more clone fits (MemAvailable ≥ ``min_avail_mib`` + the clone's size),
        for as long as memory keeps coming back (balloons and parks of VMs added before, which
        run one at a time behind the restores); "" when it fits, else why not. The same rule for
        every config: under stock nothing comes back, and it stops after ``mem_wait_s``."""
        need = self.p["min_avail_mib"] + self.p["memory_mib"]
        best = avail = psutil.virtual_memory().available >> 20
        since = time.monotonic()
        while avail < need:
            if why := stop():
                return why
            if time.monotonic() - since > self.p["mem_wait_s"]:
                return (f"host memory: MemAvailable {avail} MiB < {need} MiB (min_avail_mib + one clone), "
                        f"none freed for {self.p['mem_wait_s']:.0f} s")
            time.sleep(2.0)
            avail = psutil.virtual_memory().available >> 20
            if avail > best + 64:  # progress: the window starts again
                best, since = avail, time.monotonic()
        return ""

    def _attach(self, names: list[str]) -> None:
        """Agents reachable: our own channel connection, or the daemon's registration."""
        if self.daemon is None:
            for n in names:
                conn = AgentConn(Path(self.cfg.lab.channels_dir) / f"{n}.agent.sock")
                conn.connect(self.p["agent_timeout_s"])
                self.conns[n] = conn
            return
        with self.daemon.client() as c:
            for n in names:
                c.post("/v1/vms", {"name": n, "memory": {"min_mib": self.p["min_mib"]}})
            deadline = time.monotonic() + self.p["agent_timeout_s"]
            waiting = set(names)
            while waiting and time.monotonic() < deadline:
                for n in sorted(waiting):
                    v = c.get(f"/v1/vms/{n}")
                    if (v.get("agent") or {}).get("handshakes", 0) >= 1 or v.get("cooperative"):
                        waiting.discard(n)
                if waiting:
                    time.sleep(0.5)
            if waiting:
                raise TimeoutError(f"no agent handshake through the daemon for {', '.join(sorted(waiting))}")

    def start_workload(self) -> None:
        from symbiont_research.lab.console import guest_exec

        b64 = base64.b64encode(TOUCH.encode()).decode()
        for n in self.active:
            r = guest_exec(self.host, n, f"echo {b64} | base64 -d > /root/touch.py && (nohup python3 /root/touch.py "
                                         f"{self.p['work_mib']} >/dev/null 2>&1 &); dmesg -n 4", timeout=120)
            if r.rc != 0:
                raise RuntimeError(f"{n}: workload did not start: {r.output[-300:]}")

    def idle(self) -> list[str]:
        return [n for n in self.names if n not in self.active]

    def parked(self) -> set[str]:
        if self.daemon is None or self.config != "full":
            return set()
        with self.daemon.client() as c:
            st = c.get("/v1/status")
        return set(((st.get("parts") or {}).get("paging") or {}).get("parked") or [])

    # -- one step's measurements ---------------------------------------------------------------------
    def rates(self, seconds: float) -> dict[str, float]:
        """Each active VM's mean rate (MiB/s) over the next ``seconds``."""
        for n in self.active:
            _, self.log_offsets[n] = rates_since(self._vm(n).console_log, self.log_offsets[n])
        time.sleep(seconds)
        out = {}
        for n in self.active:
            vals, self.log_offsets[n] = rates_since(self._vm(n).console_log, self.log_offsets[n])
            out[n] = sum(vals) / len(vals) if vals else 0.0
        return out

    def pings(self, names: list[str]) -> tuple[list[float | None], int]:
        """One ping per VM named, sequentially: (seconds or None each, how many woke a parked VM)."""
        out: list[float | None] = []
        woke = 0
        if self.daemon is None:
            for n in names:
                out.append(self.conns[n].ping(self.p["ping_timeout_s"]))
            return out, 0
        from symbiont.client import ApiError, Client

        with Client(self.daemon.cfg.socket, timeout=self.p["ping_timeout_s"] + 15) as c:
            for n in names:
                t0 = time.perf_counter()
                try:
                    r = c.post(f"/v1/vms/{n}/ping", {})
                    out.append(time.perf_counter() - t0 if time.perf_counter() - t0 <= self.p["ping_timeout_s"]
                               else None)
                    woke += bool(r.get("woke"))
                except (ApiError, OSError) as exc:
                    self.note(f"ping {n}: {exc}")
                    out.append(None)
        return out, woke

    def oom_kills(self) -> int:
        total = 0
        for n in self.names:
            log = self._vm(n).console_log
            with contextlib.suppress(OSError):
                data = log.read_bytes()
                self.oom[n] = len(OOM.findall(data))
            total += self.oom.get(n, 0)
        return total

    def memory(self) -> dict[str, Any]:
        """Host memory per VM: PSS + zram share; RSS alongside."""
        pids = {n: self.host.qemu_pid(n) for n in self.names}
        mem = {n: proc_mem_kib(pid) if pid else {} for n, pid in pids.items()}
        used_kib, orig, total = zram_tier()
        share = zram_share_mib({n: m.get("Swap", 0) for n, m in mem.items()}, used_kib, total)
        host = {n: mem[n].get("Pss", 0) / 1024 + share[n] for n in self.names}
        idle = self.idle()

        def mean(vals: list[float]) -> float | None:
            return round(sum(vals) / len(vals), 1) if vals else None

        return {"idle_host_mib": mean([host[n] for n in idle]),
                "idle_pss_mib": mean([mem[n].get("Pss", 0) / 1024 for n in idle]),
                "idle_zram_mib": mean([share[n] for n in idle]),
                "idle_rss_mib": mean([mem[n].get("Rss", 0) / 1024 for n in idle]),
                "active_host_mib": mean([host[n] for n in self.active]),
                "zram_data_mib": round(orig / 2**20, 1), "zram_compr_mib": round(total / 2**20, 1),
                "pids": pids}

    def _vm(self, name: str) -> Any:
        from symbiont_research.lab import vms

        return vms.lab_vm(self.cfg, name)


class CpuWatch:
    """CPU seconds of ksmd, the daemon and the idle VMs' QEMUs between two reads (% of a core)."""

    def __init__(self) -> None:
        from symbiont.host.ksm import KsmdCpu

        self.ksmd = KsmdCpu()
        self.t = time.monotonic()
        self.base: dict[str, float] = {}

    @staticmethod
    def _cpu(pid: int | None) -> float:
        import psutil

        if not pid:
            return 0.0
        try:
            t = psutil.Process(pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def read(self, daemon_pid: int | None, idle_pids: list[int | None]) -> dict[str, float]:
        return {"ksmd": self.ksmd.seconds() or 0.0, "daemon": self._cpu(daemon_pid),
                "idle": sum(self._cpu(p) for p in idle_pids), "t": time.monotonic()}

    @staticmethod
    def pct(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        dt = max(1e-6, b["t"] - a["t"])
        return {k: round(100.0 * (b[k] - a[k]) / dt, 1) for k in ("ksmd", "daemon", "idle")}


@experiment(
    "overcommit-density",
    "N 512 MiB lab VMs (a few busy, the rest idle) per config (stock, KSM, balloon, symbiont full) "
    "until throughput, ping p99 or OOM fails",
    params={"configs": list(CONFIGS), "steps": [4, 8, 16, 32, 48, 64, 96, 128], "active": 1, "memory_mib": 512,
            "work_mib": 64, "measure_s": 12.0, "settle_s": 8.0, "min_ratio": 0.9, "max_ping_s": 1.0,
            "ping_timeout_s": 5.0, "period_s": 5.0, "idle_after_s": 15.0, "idle_cpu_pct": 5.0, "prefetch": "willneed",
            "park_observe_s": 1.0, "ping_sample": 4,
            "park_wait_s": 90.0, "min_mib": 128, "min_avail_mib": 1536, "mem_wait_s": 45.0, "agent_timeout_s": 60.0,
            "ksmtuned_interval_s": 10.0, "budget_s": 2280.0, "end_by": "", "weights": [1.0, 1.0, 1.0, 2.0],
            "cold_boot": True},
    param_help={"configs": "which configurations, in order: stock, ksm, balloon, full",
                "steps": "N values (total VMs, active included), increasing",
                "active": "VMs running the page-touching workload", "work_mib": "the workload's buffer",
                "measure_s": "throughput window per step", "settle_s": "wait after adding VMs (full: after the last idle VM is parked)",
                "period_s": "daemon configs: control.period_s (the daemon's default)",
                "idle_after_s": "full: paging.idle_after_s", "idle_cpu_pct": "full: paging.idle_cpu_pct",
                "prefetch": "full: paging.prefetch; touch reads every page a parked VM had resident, KSM-shared "
                            "ones included (~500 MiB a clone), willneed only swaps in what was paged out",
                "park_wait_s": "full: how long a step waits for the daemon's next park of its idle VMs",
                "mem_wait_s": "how long adding waits for memory to come back (a park, a balloon) before it stops",
                "park_observe_s": "full: paging.park_observe_s (parks run one at a time: 3 s each by default)",
                "ping_sample": "older idle VMs pinged per step besides the ones the step added",
                "min_avail_mib": "a clone is added only while MemAvailable stays above this plus its size (no host OOM)",
                "ksmtuned_interval_s": "ksm: ksmtuned's monitor interval (60 s in ksmtuned.conf)",
                "budget_s": "whole run's time; each config gets a share by 'weights' of what is left",
                "end_by": "HH:MM (UTC): the budget ends 90 s before then at the latest (teardown)",
                "cold_boot": "also boot one VM cold, for the clone-vs-boot comparison"},
    needs=("root", "libvirt", "vm"),
)
def overcommit_density(ctx: RunContext) -> dict[str, Any]:
    import libvirt

    from symbiont.config import load_config
    from symbiont.host.libvirt_host import LibvirtHost, ensure_libvirtd
    from symbiont_research.lab import vms
    from symbiont_research.lab.clone import build_template
    from symbiont_research.lab.image import build_image, make_recipe

    p = ctx.params
    configs = [c for c in p["configs"] if c]
    if unknown := [c for c in configs if c not in CONFIGS]:
        raise ValueError(f"configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    steps = sorted(int(n) for n in p["steps"])
    if not steps or steps[0] <= p["active"] or p["active"] < 1:
        raise ValueError("steps must exceed 'active' (≥ 1): each step needs idle VMs")
    weights = dict(zip(CONFIGS, list(p["weights"]) + [1.0] * 4, strict=False))
    t_run = time.monotonic()
    budget = min(p["budget_s"], seconds_until(p["end_by"]) - 90.0) if p["end_by"] else p["budget_s"]
    base = load_config(None)
    prefix = f"{base.lab.vm_prefix}oc-{ctx.run_id}-"
    ctx.lab_prefixes.append(prefix)
    cfg = load_config(None, {"lab": {"vm_prefix": prefix, "memory_mib": p["memory_mib"], "vcpus": 1, "max_vcpus": 1}})
    ensure_libvirtd()
    image = build_image(Path(base.lab.images_dir), Path(base.lab.cache_dir), make_recipe(base.lab.mirror),
                        step=lambda s: ctx.note(f"image: {s}"))
    host = LibvirtHost(base.libvirt_uri)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    owner = vms.LabOwner.new_run(ctx.run_id)
    from symbiont.host.ksm import Ksm

    ksm = Ksm()
    ksm.require()
    ksm_saved = ksm.settings()  # each config sets KSM from scratch; the host gets its own back
    summary: dict[str, Any] = {"configs": {}}
    csv_path = ctx.path("density.csv")
    fh = csv_path.open("w", newline="")
    writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    fh.flush()
    clone_rows: list[dict[str, Any]] = []

    def on_term(_sig: int, _frame: Any) -> None:  # stop like ^C: clean up, keep what was measured
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        ctx.stage("template: boot, settle, save (cached by image and memory size)")
        tpl = build_template(host, cfg, image, p["memory_mib"], step=ctx.note)
        summary["template"] = {k: v for k, v in tpl.info().items() if k != "settle_output"}
        if p["cold_boot"]:
            summary["cold_boot_s"] = _cold_boot(host, cfg, image, owner, ctx)
        ctx.stage(f"alone: {p['active']} active VM(s), nothing else, no daemon")
        alone = _alone(ctx, host, cfg, tpl, owner, prefix, p, clone_rows, ksm_saved)
        summary["alone_mibs"] = alone
        ctx.note(f"alone: {', '.join(f'{v:.0f}' for v in alone)} MiB/s")
        for i, config in enumerate(configs):
            left = budget - (time.monotonic() - t_run)
            share = left * weights[config] / sum(weights[c] for c in configs[i:])
            ctx.stage(f"{config}: up to {steps[-1]} VMs ({share / 60:.1f} min of the budget)")
            res = _run_config(ctx, config, host, cfg, tpl, owner, f"{prefix}{config[:2]}", p, steps, alone,
                              time.monotonic() + share, writer, fh, clone_rows, ksm_saved)
            summary["configs"][config] = res
            ctx.note(f"{config}: N = {res['n_reached']} ({res['bound']})")
            if res.get("interrupted"):
                break
    finally:
        signal.signal(signal.SIGTERM, old_term)
        fh.close()
        with contextlib.suppress(Exception):
            ctx.write_csv("clones.csv", clone_rows)
        host.close()
        restore_ksm(ksm, ksm_saved, ctx.note)
    summary["clone"] = _clone_cost(clone_rows, summary)
    full, stock = summary["configs"].get("full"), summary["configs"].get("stock")
    if full and stock:
        summary["full_over_stock"] = round(full["n_reached"] / max(1, stock["n_reached"]), 2)
    _plot(ctx, csv_path, p)
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    ctx.files.append("summary.json")
    return summary


def _cold_boot(host: Any, cfg: Any, image: Any, owner: Any, ctx: RunContext) -> float:
    from symbiont_research.lab import vms

    name = f"{cfg.lab.vm_prefix}cold"
    t0 = time.monotonic()
    vm = vms.create_vm(host, cfg, image, name, owner=owner, vcpus=1, max_vcpus=1)
    try:
        vms.wait_for_agent(vm.channel, timeout=300)
        s = round(time.monotonic() - t0, 2)
    finally:
        vms.remove_vm(host, cfg, name, owner)
    ctx.note(f"cold boot to the agent's hello: {s} s")
    return s


def _alone(ctx: RunContext, host: Any, cfg: Any, tpl: Any, owner: Any, prefix: str, p: dict[str, Any],
           clone_rows: list[dict[str, Any]], ksm_saved: dict[str, int | str]) -> list[float]:
    fleet = Fleet(ctx, "alone", host, cfg, tpl, owner, f"{prefix}al", ctx.out_dir.resolve() / "work-alone", p,
                  ctx.note, ksm_saved=ksm_saved)
    try:
        fleet.start()
        fleet.add(p["active"], active=True)
        fleet.start_workload()
        fleet.rates(p["settle_s"])
        rates = fleet.rates(p["measure_s"] * 2)
        if not all(rates.values()):
            raise RuntimeError(f"an active VM reported no rate alone: {rates}")
        return [round(rates[n], 2) for n in fleet.active]
    finally:
        clone_rows.extend(fleet.clone_rows)
        fleet.close()


def _run_config(ctx: RunContext, config: str, host: Any, cfg: Any, tpl: Any, owner: Any, prefix: str,
                p: dict[str, Any], steps: list[int], alone: list[float], deadline: float,
                writer: csv.DictWriter, fh: Any, clone_rows: list[dict[str, Any]],
                ksm_saved: dict[str, int | str]) -> dict[str, Any]:
    fleet = Fleet(ctx, config, host, cfg, tpl, owner, prefix, ctx.out_dir.resolve() / f"work-{config}", p, ctx.note,
                  ksm_saved=ksm_saved)
    t0 = time.monotonic()
    out: dict[str, Any] = {"n_reached": 0, "failed_at": None, "bound": "", "at_n_reached": None}

    def out_of_time() -> str:
        return "time budget of the run" if time.monotonic() > deadline else ""

    rng = random.Random(f"{config}-{ctx.run_id}")
    try:
        fleet.start()
        fleet.add(p["active"], active=True)
        fleet.start_workload()
        watch = CpuWatch()
        for n in steps:
            k0 = len(fleet.clone_rows)
            ctx.note(f"{config}: adding VMs {len(fleet.names) + 1}..{n}")
            stopped = fleet.add(n - len(fleet.names), stop=out_of_time)
            added = fleet.clone_rows[k0:]
            if stopped:
                out["bound"] = stopped
                out["failed_at"] = n
                ctx.note(f"{config}: stopped adding at {len(fleet.names)} VMs: {stopped}")
                break
            parked = _settle(fleet, p)
            mem_pids = fleet.memory()["pids"]
            a = watch.read(fleet.daemon.proc.pid if fleet.daemon else None, [mem_pids[x] for x in fleet.idle()])
            rates = fleet.rates(p["measure_s"])
            b = watch.read(fleet.daemon.proc.pid if fleet.daemon else None, [mem_pids[x] for x in fleet.idle()])
            cpu = CpuWatch.pct(a, b)
            mem = fleet.memory()
            import psutil

            from symbiont.host.ksm import Ksm

            vm_mem = psutil.virtual_memory()
            sharing = Ksm().stats().pages_sharing
            # Every idle VM is pinged in the step that added it, plus a sample of older ones: a
            # wake costs a re-park (seconds of the daemon's time, one VM at a time), so pinging
            # all N each step would make the run's length quadratic in N.
            fresh = [r["vm"] for r in added if r["vm"] in fleet.idle()]
            older = [x for x in fleet.idle() if x not in fresh]
            targets = fresh + rng.sample(older, min(p["ping_sample"], len(older)))
            pings, woke = fleet.pings(targets)
            oom = fleet.oom_kills()
            ratios = [rates[x] / alone[i] if alone[i] else 0.0 for i, x in enumerate(fleet.active)]
            failed = judge(ratios, pings, oom, p["min_ratio"], p["max_ping_s"])
            answered = [x for x in pings if x is not None]
            row = {
                "config": config, "n": n, "active": len(fleet.active), "idle": len(fleet.idle()), "parked": parked,
                "t_s": round(time.monotonic() - t0, 1), "clones_added": len(added),
                "restore_s_mean": round(sum(r["restore_s"] for r in added) / len(added), 3) if added else None,
                "restore_s_max": max((r["restore_s"] for r in added), default=None),
                "rss_after_restore_mib": round(sum(r["rss_after_restore_mib"] or 0 for r in added) / len(added), 1)
                if added else None,
                "alone_mibs": " ".join(f"{x:.0f}" for x in alone),
                "active_mibs": " ".join(f"{rates[x]:.0f}" for x in fleet.active),
                "active_ratio_min": round(min(ratios), 3) if ratios else None,
                **{k: v for k, v in mem.items() if k != "pids"},
                "host_used_mib": (vm_mem.total - vm_mem.available) >> 20, "host_avail_mib": vm_mem.available >> 20,
                "ksm_pages_sharing": sharing, "ksmd_cpu_pct": cpu["ksmd"], "daemon_cpu_pct": cpu["daemon"],
                "idle_qemu_cpu_pct": cpu["idle"],
                "ping_p50_ms": round(1000 * percentile(answered, 50), 1) if answered else None,
                "ping_p99_ms": round(1000 * percentile(answered, 99), 1) if answered else None,
                "ping_max_ms": round(1000 * max(answered), 1) if answered else None,
                "pinged": len(pings), "ping_failed": sum(1 for x in pings if x is None), "woke": woke, "oom": oom,
                "passed": int(not failed), "failed": failed,
            }
            writer.writerow(row)
            fh.flush()
            ctx.note(f"{config} N={n}: ratio {row['active_ratio_min']}, idle VM {row['idle_host_mib']} MiB "
                     f"(PSS {row['idle_pss_mib']} + zram {row['idle_zram_mib']}), ping p50/p99 "
                     f"{row['ping_p50_ms']}/{row['ping_p99_ms']} ms, parked {parked}, ksmd {cpu['ksmd']} %, "
                     f"daemon {cpu['daemon']} %, avail {row['host_avail_mib']} MiB"
                     + (f" -> FAILED: {failed}" if failed else ""))
            if failed:
                out["failed_at"] = n
                out["bound"] = failed
                break
            out["n_reached"] = n
            out["at_n_reached"] = {k: row[k] for k in ("idle_host_mib", "idle_pss_mib", "idle_zram_mib", "idle_rss_mib",
                                                     "ksmd_cpu_pct", "daemon_cpu_pct", "idle_qemu_cpu_pct",
                                                     "ping_p50_ms", "ping_p99_ms", "active_ratio_min", "parked",
                                                     "host_avail_mib")}
        else:
            out["bound"] = f"none up to the largest step ({steps[-1]})"
    except KeyboardInterrupt:
        out["bound"] = out["bound"] or "stopped by the operator (SIGINT/SIGTERM) before a criterion failed"
        out["interrupted"] = True
        ctx.note(f"{config}: interrupted; removing its VMs")
    except Exception as exc:
        out["bound"] = out["bound"] or f"error: {type(exc).__name__}: {exc}"[:300]
        ctx.note(f"{config}: stopped by an error: {exc}")
        if fleet.daemon is not None:
            ctx.note(f"{config}: daemon log tail: {fleet.daemon.log_tail(8)}")
    finally:
        clone_rows.extend(fleet.clone_rows)
        t1 = time.monotonic()
        fleet.close()
        out["teardown_s"] = round(time.monotonic() - t1, 1)
        out["duration_s"] = round(time.monotonic() - t0, 1)
    return out


def _settle(fleet: Fleet, p: dict[str, Any]) -> int:
    """Wait for the step's steady state: ``settle_s``; with the full profile, until the daemon
    has parked every idle VM (or none more for ``park_wait_s``). Returns how many are parked."""
    if fleet.config == "full":
        # Parks run one at a time: a step that added 32 VMs needs minutes; wait while they progress.
        since, done = time.monotonic(), -1
        want = set(fleet.idle())
        while time.monotonic() - since < p["park_wait_s"]:
            now = len(fleet.parked() & want)
            if now == len(want):
                break
            if now > done:
                since, done = time.monotonic(), now
            time.sleep(2.0)
    time.sleep(p["settle_s"])  # the last park's (or restore's) work done: measure the steady state
    return len(fleet.parked() & set(fleet.idle()))


def _clone_cost(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    if not rows:
        return {}
    quiet = [r for r in rows if r["running_before"] < 8]
    rs = sorted(r["restore_s"] for r in rows)
    out = {"clones": len(rows), "restore_s_median": rs[len(rs) // 2], "restore_s_max": rs[-1],
           "restore_s_median_quiet": sorted(r["restore_s"] for r in quiet)[len(quiet) // 2] if quiet else None,
           "rss_after_restore_mib_median": sorted(r["rss_after_restore_mib"] or 0 for r in rows)[len(rows) // 2]}
    if summary.get("cold_boot_s") and out["restore_s_median_quiet"]:
        out["boot_over_clone"] = round(summary["cold_boot_s"] / out["restore_s_median_quiet"], 1)
    return out


def _plot(ctx: RunContext, csv_path: Path, p: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for config in CONFIGS:
        rs = [r for r in rows if r["config"] == config]
        if not rs:
            continue
        n = [int(r["n"]) for r in rs]

        def col(key: str, rs: list[dict[str, str]] = rs) -> list[float]:
            return [float(r[key]) if r[key] not in ("", "None") else float("nan") for r in rs]

        axes[0].plot(n, col("active_ratio_min"), "o-", label=config)
        axes[1].plot(n, col("idle_host_mib"), "o-", label=config)
        axes[2].plot(n, [x / 1000 for x in col("ping_p99_ms")], "o-", label=config)
        for ax, key in ((axes[0], "active_ratio_min"),):
            bad = [(int(r["n"]), float(r[key]) if r[key] not in ("", "None") else 0) for r in rs if r["passed"] == "0"]
            if bad:
                ax.plot(*zip(*bad, strict=True), "x", color="red", ms=10)
    axes[0].axhline(p["min_ratio"], color="grey", ls=":")
    axes[0].set_ylabel("active VMs' throughput / alone (min)")
    axes[1].set_ylabel("host memory per idle VM (MiB: PSS + zram share)")
    axes[1].axhline(64, color="grey", ls=":")
    axes[2].axhline(p["max_ping_s"], color="grey", ls=":")
    axes[2].set_ylabel("idle VMs' ping p99 (s, wake included)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("VMs on the host (N)")
        ax.legend(fontsize=8)
    fig.suptitle(f"overcommit-density: {p['memory_mib']} MiB TCG VMs, {p['active']} busy, the rest idle; "
                 "red x: the step that failed")
    ctx.savefig(fig, "density.png")
