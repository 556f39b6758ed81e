"""What bounding TCG's translation-code cache costs a busy guest (issue 15 item 4).

Two lab VMs (512 MiB, 1 vCPU, TCG) from the golden image, booted together: one with the
lab's bound (``<tcg><tb-cache unit='MiB'>32</tb-cache></tcg>``, QEMU's ``tb-size``), one with
QEMU's default (no bound). The same CPU-bound workloads run in each over the serial console,
alternating VM by VM so that both see the same host load:

* python: a loop of ``zlib.compress`` of 256 KiB + an arithmetic generator, for 10 s (ops/s);
* compile: ``python3 -m compileall -f`` of the standard library's ``email`` and ``json``
  packages (lots of distinct interpreter code: translated code that must fit the cache).

Prints medians per VM, the throughput ratio bounded / default, and QEMU's RSS and resident
code cache (anonymous ``rwxp`` mappings) for each after the runs. Root, libvirtd; boots two
VMs (hold the VM lock):

    flock /tmp/symbiont-vm.lock .venv/bin/python benchmarks/bench_tbcache.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import _common  # noqa: F401  (repo root on sys.path)

from symbiont.config import load_config
from symbiont.host import pageout as po

MIB = 1 << 20
PY_LOOP = ("python3 -c \"import time, zlib; d = bytes(range(256)) * 1024; t = time.time(); "
           "n = sum(1 for _ in iter(lambda: time.time() - t < 10 and zlib.compress(d) and "
           "sum(i * i for i in range(2000)), False)); print('RATE', n / (time.time() - t))\"")
COMPILE = ("python3 -c \"import compileall, glob, time; t = time.time(); "
           "[compileall.compile_dir(p, force=True, quiet=1) for p in "
           "glob.glob('/usr/lib/python3*/email') + glob.glob('/usr/lib/python3*/json')]; "
           "print('SECS', time.time() - t)\"")


def number(tag: str, text: str) -> float:
    m = re.search(rf"{tag} ([0-9.]+)", text)
    if not m:
        raise RuntimeError(f"no {tag} in the guest's output: {text[-300:]!r}")
    return float(m.group(1))


def memory(pid: int) -> dict[str, float]:
    regions = po.read_smaps(pid)
    rss = po.status_kib(pid)["VmRSS"] / 1024
    cc = sum(r.rss_kib for r in po.code_cache(regions)) / 1024
    size = sum(r.size for r in po.code_cache(regions)) / MIB
    return {"rss_mib": round(rss, 1), "code_cache_resident_mib": round(cc, 1), "code_cache_mapped_mib": round(size, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tb-mib", type=int, default=32, help="the bounded VM's tb-cache")
    a = ap.parse_args()

    import libvirt

    from symbiont.host.libvirt_host import LibvirtHost, ensure_libvirtd, stop_started_libvirtd
    from symbiont_research.lab import vms
    from symbiont_research.lab.console import SerialConsole, console_pty
    from symbiont_research.lab.image import build_image, make_recipe

    base = load_config(None)
    owner = vms.LabOwner.new_run()
    prefix = f"symbiont-btb-{owner.run}-"
    cfgs = {
        "default": load_config(None, {"lab": {"vm_prefix": prefix + "d", "max_vcpus": 1, "tcg_tb_cache_mib": 0,
                                              "memory_mib": 512}}),
        f"tb {a.tb_mib} MiB": load_config(None, {"lab": {"vm_prefix": prefix + "b", "max_vcpus": 1,
                                                        "tcg_tb_cache_mib": a.tb_mib, "memory_mib": 512}}),
    }
    started = ensure_libvirtd()
    image = build_image(Path(base.lab.images_dir), Path(base.lab.cache_dir), make_recipe(base.lab.mirror))
    host = LibvirtHost(base.libvirt_uri)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    made: dict[str, str] = {}
    try:
        for label, cfg in cfgs.items():
            name = vms.lab_names(cfg, 1)[0]
            vm = vms.create_vm(host, cfg, image, name, owner=owner)
            made[label] = name
            assert vms.resolve_domain_type(cfg.lab.domain_type) == "qemu", "TCG only: KVM has no code cache"
            xml = host.domain(name).XMLDesc(0)
            assert ("tb-cache" in xml) == (cfg.lab.tcg_tb_cache_mib > 0), xml
            vm_channel = vm.channel
            made[label + ":channel"] = str(vm_channel)
        for label in cfgs:
            vms.wait_for_agent(Path(made[label + ":channel"]), timeout=300)
        consoles = {}
        for label in cfgs:
            con = SerialConsole(console_pty(host, made[label]))
            con.login()
            consoles[label] = con
        time.sleep(5)
        res: dict[str, dict[str, list[float]]] = {k: {"python": [], "compile": []} for k in cfgs}
        for i in range(a.runs):
            order = list(cfgs) if i % 2 == 0 else list(reversed(cfgs))
            for label in order:
                con = consoles[label]
                r = con.run(PY_LOOP, timeout=120)
                res[label]["python"].append(number("RATE", r.output))
                r = con.run(COMPILE, timeout=300)
                res[label]["compile"].append(number("SECS", r.output))
                print(f"run {i + 1} {label:<12} python {res[label]['python'][-1]:7.1f} ops/s  "
                      f"compile {res[label]['compile'][-1]:6.2f} s", flush=True)
        mem = {label: memory(host.qemu_pid(made[label])) for label in cfgs}  # type: ignore[arg-type]
        for con in consoles.values():
            con.close()
        d, b = list(cfgs)
        print(f"\n{'VM':<12} {'python ops/s':>13} {'compile s':>10} {'QEMU RSS':>10} {'code cache res/mapped':>22}")
        for label in cfgs:
            m = mem[label]
            print(f"{label:<12} {statistics.median(res[label]['python']):13.1f} "
                  f"{statistics.median(res[label]['compile']):10.2f} {m['rss_mib']:7.0f} MiB "
                  f"{m['code_cache_resident_mib']:9.0f} / {m['code_cache_mapped_mib']:.0f} MiB")
        py = statistics.median(res[b]["python"]) / statistics.median(res[d]["python"])
        comp = statistics.median(res[d]["compile"]) / statistics.median(res[b]["compile"])
        print(f"throughput {b} / default: python {py:.2f}x, compile {comp:.2f}x (n={a.runs} each, medians); "
              f"RSS {mem[b]['rss_mib']:.0f} vs {mem[d]['rss_mib']:.0f} MiB")
    finally:
        for label, name in made.items():
            if ":" in label:
                continue
            try:
                vms.remove_vm(host, cfgs[label], name, owner)
            except Exception as exc:  # noqa: BLE001 - the other still goes
                print(f"could not remove {name}: {exc}")
        host.close()
        if started and os.environ.get("SYMBIONT_KEEP_LIBVIRTD") != "1":
            stop_started_libvirtd()


if __name__ == "__main__":
    main()
