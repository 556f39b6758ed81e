"""Time from `virsh start` (virDomainCreate) to the guest agent's hello, per VM.

Baseline measured in the same boot: the time until the guest's getty prints its login
prompt on the serial console (the guest is "up" to a person). The ratio hello / getty says
how much later than a plain boot the agent is ready. Run as root:

    .venv/bin/python benchmarks/bench_boot.py --vms 2 --runs 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import _common  # noqa: F401
import libvirt

from symbiont.config import load_config
from symbiont.host.libvirt_host import LibvirtHost, ensure_libvirtd, resolve_domain_type
from symbiont_research.lab import vms
from symbiont_research.lab.image import build_image, make_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=1, help="VMs booted at once")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    ensure_libvirtd()
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    cfg = load_config(None, {"lab": {"vm_prefix": "symbiont-bench-"}})
    img = build_image(Path(cfg.lab.images_dir), Path(cfg.lab.cache_dir), make_recipe())
    host = LibvirtHost()
    rows = []
    for run in range(args.runs):
        names = vms.lab_names(cfg, args.vms)
        made = [vms.create_vm(host, cfg, img, n, start=False) for n in names]
        t0 = {}
        for vm in made:
            t0[vm.name] = time.monotonic()
            host.domain(vm.name).create()
        try:
            for vm in made:
                start_ret = time.monotonic() - t0[vm.name]
                getty = None
                hello = None
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and (getty is None or hello is None):
                    if getty is None and vm.console_log.exists() and b"login:" in vm.console_log.read_bytes():
                        getty = time.monotonic() - t0[vm.name]
                    if hello is None:
                        try:
                            vms.wait_for_agent(vm.channel, timeout=1.0)
                            hello = time.monotonic() - t0[vm.name]
                        except vms.LabError:
                            pass
                    time.sleep(0.05)
                rows.append((run, vm.name, start_ret, getty, hello))
                print(f"run {run} {vm.name}: create() returned {start_ret:.2f}s, getty {getty:.1f}s, "
                      f"agent hello {hello:.1f}s, hello/getty {hello / getty:.2f}", flush=True)
        finally:
            for vm in made:
                vms.remove_vm(host, cfg, vm.name)
    hellos = [r[4] for r in rows]
    gettys = [r[3] for r in rows]
    print(f"\n{resolve_domain_type(cfg.lab.domain_type)} domains, {args.vms} VM(s) booting at once, {args.runs} runs")
    print(f"start -> agent hello: median {statistics.median(hellos):.1f}s (min {min(hellos):.1f}, max {max(hellos):.1f})")
    print(f"start -> getty (baseline): median {statistics.median(gettys):.1f}s")
    print(f"ratio hello/getty: {statistics.median(hellos) / statistics.median(gettys):.2f}")


if __name__ == "__main__":
    main()
