"""The daemon under guest floods: CPU and RSS of symbiontd while one hostile guest floods its
channel, against an idle baseline measured in the same run (issue 16).

One daemon, two libvirt domains defined but not booted: a good fake agent (answers stats
like a real one) and an attacker (FakeGuest) that greets and then, per phase:

* idle      -- says nothing (the baseline);
* hunting   -- before its hello, 17 MiB of fake frame headers with plausible sizes (the
               amplification of issue 16 item 1);
* events    -- events with 4 KiB of data each, as fast as the daemon takes them;
* frames    -- small valid events, as fast as the daemon takes them.

For each phase: the daemon's CPU (psutil, user+system, as % of one core over the phase),
its peak RSS, what the attacker got through, the log's growth, /v1/health p50, and how
often the good VM was sampled against its period. Run as root:

    .venv/bin/python benchmarks/bench_guest_flood.py --seconds 5 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import threading
import time
import uuid
from pathlib import Path

import _common  # noqa: F401
import libvirt
import psutil
import yaml

from symbiont.config import load_config
from symbiont.host.libvirt_host import LibvirtHost, ensure_libvirtd
from symbiont_agent import protocol as proto
from symbiont_research.lab.image import Image
from symbiont_research.lab.session import DaemonProcess
from symbiont_research.lab.vms import domain_xml, lab_vm, remove_vm
from tests.host.fakeguest import FakeGuest

PERIOD = 0.5
HUNT = (b"SYMB\x01\x00" + struct.pack("!II", 0x7F7F, 16 << 20)) * (int(17.3 * (1 << 20)) // 14)


class Meter:
    """Samples the daemon's RSS and /v1/health latency in a thread during a phase."""

    def __init__(self, d: DaemonProcess, good: FakeGuest) -> None:
        self.proc = psutil.Process(d.proc.pid)
        self.d, self.good = d, good
        self.rss: list[int] = []
        self.health: list[float] = []
        self._stop = threading.Event()

    def __enter__(self) -> Meter:
        self.cpu0 = sum(self.proc.cpu_times()[:2])
        self.t0 = time.monotonic()
        self.samples0 = self.good.stats_answered
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        with self.d.client() as c:
            while not self._stop.is_set():
                self.rss.append(self.proc.memory_info().rss)
                t = time.monotonic()
                c.get("/v1/health")
                self.health.append(time.monotonic() - t)
                self._stop.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.wall = time.monotonic() - self.t0
        self.cpu = sum(self.proc.cpu_times()[:2]) - self.cpu0
        self.samples = self.good.stats_answered - self.samples0

    def row(self) -> dict[str, float]:
        return {
            "cpu_pct": 100 * self.cpu / self.wall,
            "cpu_s": self.cpu,
            "rss_mib": max(self.rss) / (1 << 20),
            "health_p50_ms": 1000 * statistics.median(self.health),
            "sampled_pct": 100 * self.samples / (self.wall / PERIOD),
            "wall_s": self.wall,
        }


def session(g: FakeGuest, hello: bool = True):
    conn = g.accept(30)
    if hello:
        g.handshake(conn)
    return conn


def phase(kind: str, d: DaemonProcess, good: FakeGuest, bad: FakeGuest, seconds: float) -> dict[str, float]:
    log0 = d.log_path.stat().st_size
    sent = 0
    conn = session(bad, hello=kind != "hunting")
    time.sleep(0.5)
    conn.settimeout(30)
    with Meter(d, good) as m:
        if kind == "idle":
            time.sleep(seconds)
        elif kind == "hunting":
            conn.sendall(HUNT)
            sent = len(HUNT)
            bad.handshake(conn)  # answered once the daemon got through the 17 MiB and resynced
            with d.client() as c:
                while not c.get(f"/v1/vms/{bad.name}")["cooperative"]:  # type: ignore[attr-defined]
                    time.sleep(0.05)
        else:
            frame = proto.encode(proto.event("flood", {"d": "x" * (4096 if kind == "events" else 16)}))
            burst = frame * max(1, 65536 // len(frame))
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                conn.sendall(burst)
                sent += len(burst)
    conn.close()
    r = m.row()
    r["sent_mib"] = sent / (1 << 20)
    r["log_kib"] = (d.log_path.stat().st_size - log0) / 1024
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the idle and flood phases")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each phase (medians are printed)")
    args = ap.parse_args()
    ensure_libvirtd()
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        chans = tmp / "ch"
        chans.mkdir()
        cfg = load_config(None, {"lab": {"channels_dir": str(chans), "vms_dir": str(tmp / "vms")}})
        host = LibvirtHost()
        img = Image(tmp, tmp / "none.qcow2", tmp / "k", tmp / "i", "bench", info={})
        tag = uuid.uuid4().hex[:6]
        names = {"good": f"symbiont-bench-good-{tag}", "bad": f"symbiont-bench-bad-{tag}"}
        guests: dict[str, FakeGuest] = {}
        d = None
        try:
            for role, name in names.items():
                host.conn.defineXML(domain_xml(cfg, lab_vm(cfg, name), img))
                guests[role] = FakeGuest(lab_vm(cfg, name).channel)
                guests[role].name = name  # type: ignore[attr-defined]
            dcfg = {"state_dir": str(tmp / "state"), "socket": str(tmp / "api.sock"),
                    "control": {"period_s": PERIOD, "agent_timeout_s": 2.0},
                    "agent": {"frame_timeout_s": 2.0, "reconnect_max_s": 0.5}}
            (tmp / "d.yaml").write_text(yaml.safe_dump(dcfg))
            d = DaemonProcess(tmp / "d.yaml", load_config(tmp / "d.yaml"), tmp / "d.log")
            d.start()
            guests["good"].behave()
            with d.client() as c:
                for name in names.values():
                    c.post("/v1/vms", {"name": name})
            results: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.repeat):
                for kind in ("idle", "hunting", "events", "frames"):
                    results.setdefault(kind, []).append(phase(kind, d, guests["good"], guests["bad"], args.seconds))
            base = statistics.median(r["cpu_pct"] for r in results["idle"])
            print(f"daemon under guest floods: median of {args.repeat} runs; period {PERIOD} s; "
                  f"CPU as % of one core over the phase")
            print(f"{'phase':8} {'sent MiB':>9} {'wall s':>7} {'CPU %':>7} {'CPU s':>6} {'vs idle':>8} "
                  f"{'RSS MiB':>8} {'log KiB':>8} {'health p50 ms':>14} {'good sampled %':>15}")
            for kind, rs in results.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                print(f"{kind:8} {med['sent_mib']:9.1f} {med['wall_s']:7.1f} {med['cpu_pct']:7.1f} "
                      f"{med['cpu_s']:6.2f} {med['cpu_pct'] / max(base, 0.01):7.1f}x {med['rss_mib']:8.1f} "
                      f"{med['log_kib']:8.1f} {med['health_p50_ms']:14.1f} {med['sampled_pct']:15.0f}")
        finally:
            if d is not None:
                d.stop()
            for g in guests.values():
                g.close()
            for name in names.values():
                remove_vm(host, cfg, name)
            host.close()


if __name__ == "__main__":
    main()
