"""CPU used by symbiontd per VM per control period.

The daemon runs with N registered VMs for a number of periods; its process CPU time
(psutil: user+system, all threads) is divided by periods × VMs. Baseline in the same run:
the same daemon with 0 VMs (its idle loop per period), subtracted to give the per-VM cost.
By default each VM is a libvirt domain (defined, not booted) whose channel is answered by
a well-behaved fake agent thread in this process, so N can be large; --real boots real VMs
(slower, shows the same per-VM cost including libvirt's dommemstat). Run as root:

    .venv/bin/python benchmarks/bench_daemon_cpu.py --vms 1 4 16 --periods 20 --period 0.5
    .venv/bin/python benchmarks/bench_daemon_cpu.py --real --vms 2 --periods 20 --period 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import _common  # noqa: F401
import libvirt
import psutil
import yaml

from symbiont.config import load_config
from symbiont.host.libvirt_host import LibvirtHost, ensure_libvirtd
from symbiont_research.lab.image import Image
from symbiont_research.lab.session import DaemonProcess, LabSession
from symbiont_research.lab.vms import domain_xml, lab_vm, remove_vm
from tests.host.fakeguest import FakeGuest


def run_daemon(tmp: Path, names: list[str], periods: int, period: float) -> tuple[float, int]:
    cfgd = {"state_dir": str(tmp / f"state-{len(names)}"), "socket": str(tmp / f"api-{len(names)}.sock"),
            "control": {"period_s": period}}
    p = tmp / f"d-{len(names)}.yaml"
    p.write_text(yaml.safe_dump(cfgd))
    d = DaemonProcess(p, load_config(p), tmp / "d.log")
    d.start()
    try:
        with d.client() as c:
            for n in names:
                c.post("/v1/vms", {"name": n})
            deadline = time.monotonic() + 60
            while names and time.monotonic() < deadline and c.get("/v1/status")["cooperative"] < len(names):
                time.sleep(0.2)
            proc = psutil.Process(d.proc.pid)
            it0 = c.get("/v1/status")["loop_iterations"]
            c0 = sum(proc.cpu_times()[:2])
            time.sleep(periods * period)
            c1 = sum(proc.cpu_times()[:2])
            it1 = c.get("/v1/status")["loop_iterations"]
        return c1 - c0, it1 - it0
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--periods", type=int, default=20)
    ap.add_argument("--period", type=float, default=0.5)
    ap.add_argument("--real", action="store_true", help="boot real VMs (one size: the first --vms value)")
    args = ap.parse_args()
    ensure_libvirtd()
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        base_cpu, base_it = run_daemon(tmp, [], args.periods, args.period)
        base = base_cpu / max(1, base_it)
        print(f"baseline: 0 VMs, {base_it} periods, {1000 * base:.2f} ms CPU per period")
        sizes = args.vms[:1] if args.real else args.vms
        for n in sizes:
            if args.real:
                with LabSession(count=n, prefix="symbiont-bench-", register=False, period_s=args.period) as lab:
                    lab.daemon.stop()
                    cpu, it = run_daemon(tmp, lab.names, args.periods, args.period)
                kind = "real VMs"
            else:
                cpu, it = fake_run(tmp, n, args.periods, args.period)
                kind = "fake agents"
            per_period = cpu / max(1, it)
            per_vm = (per_period - base) / n
            print(f"{n:3d} {kind}: {it} periods, {1000 * per_period:.2f} ms CPU per period, "
                  f"{1000 * per_vm:.2f} ms per VM per period above baseline "
                  f"({100 * per_vm / args.period:.2f}% of one core per VM at period {args.period}s); "
                  f"ratio to baseline {per_period / base:.1f}x")


def fake_run(tmp: Path, n: int, periods: int, period: float) -> tuple[float, int]:
    chans = tmp / f"ch-{n}"
    chans.mkdir(exist_ok=True)
    cfg = load_config(None, {"lab": {"channels_dir": str(chans), "vms_dir": str(tmp / "vms")}})
    host = LibvirtHost()
    img = Image(tmp, tmp / "none.qcow2", tmp / "k", tmp / "i", "bench", info={})
    tag = uuid.uuid4().hex[:6]
    names = [f"symbiont-bench-{tag}-{i}" for i in range(n)]
    guests = []
    try:
        for name in names:
            host.conn.defineXML(domain_xml(cfg, lab_vm(cfg, name), img))
            g = FakeGuest(lab_vm(cfg, name).channel)
            g.behave()
            guests.append(g)
        return run_daemon(tmp, names, periods, period)
    finally:
        for g in guests:
            g.close()
        for name in names:
            remove_vm(host, cfg, name)
        host.close()


if __name__ == "__main__":
    main()
