"""What an idle TCG guest costs the host, and what wakes it (issue 15 item 4).

One idle lab VM (512 MiB, 1 vCPU, TCG); QEMU's CPU time (utime + stime of its process,
``/proc/PID/stat``) over ``--seconds`` per phase, as % of one host core. The phases change
one waker at a time, in the same run on the same VM:

* old: the daemon collecting every ``control.period_s`` (libvirt stats + an agent ``stats``
  request), virtio-balloon stats every 2 s (the lab's old default), and the old agent's 1 s
  poll timer — emulated by a guest process running the same ``poll(1000)`` loop, since the
  agent in the image now blocks until the host writes;
* no agent timer: the same without that process;
* balloon stats at the new default (``lab.balloon_period_s``);
* daemon off: nothing asks the guest anything (the floor: the guest kernel's own timers);
* the daemon's period apart, from this process: libvirt's ``info`` + ``memoryStats`` alone
  (QMP: QEMU's main loop), then an agent ``core.stats`` request alone, each every period;
* new: the daemon back on with ``control.idle_stats_s`` (an idle VM's agent asked for stats
  every 30 s instead of every period), the agent blocking, the balloon period as above.

Prints each phase and the ratio old / new. Root, libvirtd; boots one VM (hold the VM lock):

    flock /tmp/symbiont-vm.lock .venv/bin/python benchmarks/bench_idle_guest.py --seconds 60
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import _common  # noqa: F401  (repo root on sys.path)
import yaml

from symbiont.config import LabConfig, load_config
from symbiont_agent import protocol as proto

OLD_BALLOON_PERIOD_S = 2
TICK = os.sysconf("SC_CLK_TCK")
# The old agent's loop: poll the port with a 1 s timeout, forever.
OLD_LOOP = 'python3 -c "import select; p = select.poll(); [p.poll(1000) for _ in iter(int, 1)]"'


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def measure(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


class Every:
    """Call ``fn`` every ``period`` seconds in a thread while the block runs."""

    def __init__(self, period: float, fn: Callable[[], object]) -> None:
        self.period, self.fn = period, fn
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self.fn()

    def __enter__(self) -> Every:
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()


class AgentStats:
    """The agent's channel socket (free while the daemon is off): a ``core.stats`` request per call."""

    def __init__(self, channel: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(str(channel))
        self.s.settimeout(10.0)
        self.reader = proto.FrameReader()
        self.reader.hunt()
        self.ids = itertools.count(1)
        self.s.sendall(proto.encode(proto.hello("host", "bench", [])))
        self._until(lambda m: m.type == "hello")

    def _until(self, want: Callable[[proto.Message], bool]) -> proto.Message:
        while True:
            for m in self.reader.feed(self.s.recv(65536)):
                if want(m):
                    return m

    def stats(self) -> None:
        mid = next(self.ids)
        self.s.sendall(proto.encode(proto.request(mid, "core.stats")))
        self._until(lambda m: m.type == "resp" and m.header.get("id") == mid)

    def __enter__(self) -> AgentStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement per phase")
    ap.add_argument("--settle", type=float, default=20.0, help="idle time after boot before the first phase")
    ap.add_argument("--period", type=float, default=None, help="daemon control period (default: the daemon's)")
    ap.add_argument("--balloon", type=int, default=LabConfig().balloon_period_s,
                    help="new virtio-balloon stats period, s (0: off; default: lab.balloon_period_s)")
    ap.add_argument("--idle-stats", type=float, default=30.0,
                    help="new: control.idle_stats_s (an idle VM's agent asked for stats this often)")
    a = ap.parse_args()

    import libvirt

    from symbiont_research.lab.console import guest_exec
    from symbiont_research.lab.session import LabSession

    period = a.period or load_config(None).control.period_s
    new_balloon = a.balloon
    with TemporaryDirectory(prefix="bench-idle-") as tmp, LabSession(
            count=1, prefix="symbiont-bidle-", period_s=period, memory_mib=512, max_vcpus=1,
            work_dir=Path(tmp)) as lab:
        assert lab.host is not None and lab.daemon is not None
        vm = lab.names[0]
        dom = lab.host.domain(vm)
        pid = lab.host.qemu_pid(vm)
        assert pid is not None

        def balloon(period_s: int) -> None:
            dom.setMemoryStatsPeriod(period_s, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        def daemon(on: bool) -> None:
            assert lab.daemon is not None
            if on and lab.daemon.proc is None:
                lab.daemon.start()
            elif not on:
                lab.daemon.stop()

        res = guest_exec(lab.host, vm, f"{OLD_LOOP} >/dev/null 2>&1 & echo PID=$!")
        loop_pid = int(res.output.split("PID=")[1].split()[0])
        balloon(OLD_BALLOON_PERIOD_S)
        time.sleep(a.settle)
        phases: list[tuple[str, float]] = []

        def phase(label: str) -> float:
            v = measure(pid, a.seconds)
            phases.append((label, v))
            print(f"{label:<58} {v:6.2f} % of a core", flush=True)
            return v

        old = phase(f"old: daemon every {period:g} s, balloon stats {OLD_BALLOON_PERIOD_S} s, agent 1 s timer")
        guest_exec(lab.host, vm, f"kill {loop_pid}")
        phase(f"no agent timer (daemon every {period:g} s, balloon {OLD_BALLOON_PERIOD_S} s)")
        balloon(new_balloon)
        phase(f"balloon stats {new_balloon or 'off'}{' s' if new_balloon else ''} (daemon every {period:g} s)")
        daemon(False)
        floor = phase("daemon off (floor: the guest's own timers)")
        # What the daemon's period consists of, one at a time, from this process:
        with Every(period, lambda: (dom.info(), dom.memoryStats())):
            phase(f"libvirt only: info + memoryStats every {period:g} s")
        with AgentStats(lab.vms[0].channel) as ag, Every(period, ag.stats):
            phase(f"agent only: a stats request every {period:g} s")
        data = yaml.safe_load(lab.daemon.config_path.read_text())
        data.setdefault("control", {})["idle_stats_s"] = a.idle_stats
        lab.daemon.config_path.write_text(yaml.safe_dump(data))
        lab.daemon.cfg = load_config(lab.daemon.config_path)
        daemon(True)
        time.sleep(2 * period)
        new = phase(f"new: daemon every {period:g} s (idle: stats every {a.idle_stats:g} s), balloon "
                    f"{new_balloon or 'off'}{' s' if new_balloon else ''}, agent blocking")
        summary: dict[str, Any] = {"phases": phases, "old_over_new": old / new if new else None}
        print(f"idle guest host CPU: old {old:.2f} % / new {new:.2f} % = {old / max(new, 1e-9):.2f}x "
              f"(floor with nothing asking: {floor:.2f} %)")
        print(yaml.safe_dump(summary, default_flow_style=None).strip())


if __name__ == "__main__":
    main()
