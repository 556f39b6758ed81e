"""The elastic SSD from inside a guest, against a plain virtio disk on the same loop-device region.

    sudo .venv/bin/python benchmarks/bench_ssdcache_guest.py              # ~6 min (boot + 8 cases x 3 disks x 2)
    sudo .venv/bin/python benchmarks/bench_ssdcache_guest.py --seconds 3 --reps 1

One lab VM (TCG), three disks over the same 64 MiB of one pool file, measured from inside the
guest in the same run, interleaved case by case:

* ``plain``: a virtio disk on a loop device (``--direct-io=on``) over that region of the pool
  file, QEMU ``cache='none'`` — what a VM gets without the elastic SSD;
* ``python``: the elastic disk, NBD over a unix socket, served by the Python data path
  (``Export(native=False)``: asyncio + thread pool);
* ``nsync``: the same elastic disk served by the C data path (``nbdfast``: up to 16 workers per
  connection, outside the GIL), each request one synchronous pread/pwrite per piece;
* ``native``: the C data path as the daemon runs it: requests of 512 KiB and more also go to
  the pool as parallel 256 KiB chunks (Linux AIO), a read alone in flight is streamed
  (reply header and chunks sent as they come in), and a read of 64 KiB or more with others in
  flight goes pool -> pipe -> socket by ``splice()`` (no copy through the server);
* ``nosplice``: ``native`` without the splice path (pread into a buffer, then sendmsg);
* ``vhost``: the same C data path (translation, map, rwlock) as a **vhost-user-blk** backend
  (``native/vhostblk.c``): it maps the guest's RAM (the VM is booted with shared memfd memory
  when this disk is measured) and does the pool I/O straight into the guest's buffers, so no
  byte crosses a socket.

``--disks`` and ``--cases`` pick a subset. Beside each figure the CPU time spent per MiB (or
per request) by the QEMU process and by this process (the NBD servers) is printed: where the
time goes.

Both elastic exports map logical block i to physical block 63 - i of the pool (every 1 MiB is
translated) and read and write through the pool's O_DIRECT descriptor on its own loop device;
they are ``Export`` + ``NbdServer`` exactly as the daemon runs them, served from this process.
The guest tool is ``guest_iobench.c`` (fio's libaio engine in miniature: O_DIRECT, native AIO,
IODEPTH in flight), built static here and handed to the guest on a read-only disk: the golden
image has no fio. The ratio elastic / plain is the figure (target: random 4 KiB ≥ 0.8, sequential
1 MiB ≥ 0.95). While the native or vhost disk runs random writes at QD 16, a host thread remaps spare
blocks of its export (unmap + map under the exclusive lock): the resize commit under load.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import libvirt

from symbiont.ssdcache import nbdfast
from symbiont.ssdcache.nbdserver import Export, IoThread, NbdServer
from symbiont.ssdcache.pool import Pool
from symbiont.ssdcache.vhostuser import VhostUserServer
from symbiont_research.lab.console import SerialConsole, console_pty
from symbiont_research.lab.session import LabSession

REGION_MIB = 64  # the data region every disk covers
SPARE = 8  # extra logical blocks of the elastic exports, remapped during the run (not in the span)
CASES = [  # (mode, block size, depth)
    ("randread", 4096, 1), ("randread", 4096, 16), ("randwrite", 4096, 1), ("randwrite", 4096, 16),
    ("read", 1 << 20, 1), ("read", 1 << 20, 16), ("write", 1 << 20, 1), ("write", 1 << 20, 16),
]
DISKS = ("plain", "python", "nsync", "nosplice", "native", "vhost")
DEV = 'dev() { for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && echo /dev/${d##*/}; done; }; '
HERE = Path(__file__).resolve().parent


def build_tool(out: Path) -> int:
    """Static ``iobench`` into ``out`` padded to 1 MiB multiples; returns its size in bytes."""
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "iobench"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(HERE / "guest_iobench.c")], check=True)
        data = exe.read_bytes()
    out.write_bytes(data + bytes(-len(data) % (1 << 20)))
    return len(data)


def disk_xml(kind: str, target: str, src: str, iothread: int = 0) -> str:
    io = f" iothread='{iothread}'" if iothread else ""
    if kind == "plain":
        return (f"<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'{io}/>"
                f"<source dev='{src}'/><target dev='{target}' bus='virtio'/><serial>bench-plain</serial></disk>")
    if kind == "tools":
        return (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{src}'/>"
                f"<target dev='{target}' bus='virtio'/><serial>bench-tools</serial><readonly/></disk>")
    if kind == "vhost":  # no <serial> for vhost-user disks: the backend answers GET_ID itself
        return (f"<disk type='vhostuser' device='disk'><driver name='qemu' type='raw' queues='1' queue_size='256'/>"
                f"<source type='unix' path='{src}'><reconnect enabled='yes' timeout='1'/></source>"
                f"<target dev='{target}' bus='virtio'/></disk>")
    return (f"<disk type='network' device='disk'><driver name='qemu' type='raw' error_policy='report' "
            f"rerror_policy='report'{io}/><source protocol='nbd' name='bench-{kind}'><host transport='unix' "
            f"socket='{src}'/></source><target dev='{target}' bus='virtio'/><serial>bench-{kind}</serial></disk>")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a process so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def qemu_pid_of(name: str) -> int:
    """The QEMU process running domain ``name`` (its command line has ``-name guest=NAME,``)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if f"guest={name},".encode() in (d / "cmdline").read_bytes().replace(b"\0", b" "):
                    return int(d.name)
    raise RuntimeError(f"no QEMU process for {name}")


def remap_loop(exp: Export, stop: threading.Event, out: list[float]) -> None:
    """Unmap and map the spare blocks back, again and again: each commit's time under load."""
    spare = {REGION_MIB + i: REGION_MIB + i for i in range(SPARE)}
    while not stop.is_set():
        t0 = time.perf_counter()
        exp.unmap_blocks(list(spare))
        exp.map_blocks(spare)
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="per case and disk")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--disks", default=",".join(DISKS), help=f"comma-separated subset of {','.join(DISKS)}")
    ap.add_argument("--cases", default="", help='comma-separated substrings of the case names, e.g. "1M QD16"')
    ap.add_argument("--iothreads", action="store_true",
                    help="give each measured disk an I/O thread of its own (QEMU off the main loop)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices, libvirt)")
    disks = tuple(d for d in DISKS if d in args.disks.split(","))
    if "plain" not in disks:
        sys.exit("--disks must include plain (the baseline)")
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    if nbdfast.load() is None:
        sys.exit(f"native data path unavailable: {nbdfast.why()}")
    t_start = time.monotonic()
    run_dir = Path(f"/run/symbiont/bench-ssd-{os.getpid()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for p in (run_dir, run_dir.parent):
        p.chmod(0o755)
    gid = None
    with contextlib.suppress(KeyError):
        gid = grp.getgrnam("kvm").gr_gid
    io = IoThread()
    io.start()
    plain_dev = ""
    pool: Pool | None = None
    servers: list[NbdServer] = []
    vhosts: list[VhostUserServer] = []
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    remaps: dict[str, list[float]] = {}
    try:
        with LabSession(count=1, prefix="symbiont-ssdbench-", register=False, memory_mib=512, max_vcpus=2,
                        shared_memory="vhost" in disks, step=lambda s: print(f"# {s}", flush=True)) as lab:
            assert lab.host is not None
            vm = lab.vms[0]
            print(f"# booted in {lab.boot_seconds[vm.name]:.0f} s", flush=True)
            pool = Pool.create_file(vm.dir / "pool.img", REGION_MIB + SPARE)
            subprocess.run(["qemu-io", "-f", "raw", "-t", "none", pool.device, "-c",
                            f"write -P 0x5a 0 {REGION_MIB + SPARE}M"], check=True, capture_output=True)
            plain_dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", "--sizelimit",
                                        str(REGION_MIB << 20), pool.path], check=True, capture_output=True,
                                       text=True).stdout.strip()  # fmt: skip
            mapping = {i: REGION_MIB - 1 - i for i in range(REGION_MIB)} | {REGION_MIB + i: REGION_MIB + i
                                                                             for i in range(SPARE)}
            exports = {}
            for kind in disks[1:]:
                exp = Export(f"bench-{kind}", REGION_MIB + SPARE, pool, mapping, native=kind != "python")
                if kind in ("nsync", "nosplice"):
                    assert exp.native is not None
                    exp.native.set_splice(False)
                if kind == "nsync":
                    assert exp.native is not None
                    exp.native.set_chunk(0)
                exports[kind] = exp
                if kind == "vhost":
                    vh = VhostUserServer(exp, run_dir / f"{kind}.sock", f"bench-{kind}", socket_gid=gid)
                    vh.start()
                    vhosts.append(vh)
                    continue
                srv = NbdServer(exp, run_dir / f"{kind}.sock", socket_gid=gid, executor=io.executor)
                io.submit(srv.start())
                servers.append(srv)
            tool_size = build_tool(vm.dir / "tools.img")
            dom = lab.host.domain(vm.name)
            attach = [("plain", plain_dev)] + [(k, str(run_dir / f"{k}.sock")) for k in disks[1:]]
            attach.append(("tools", str(vm.dir / "tools.img")))
            qemu_pid = qemu_pid_of(vm.name)
            for i, (kind, src) in enumerate(attach):
                target = "vd" + "bcdefgh"[i]
                iothread = 0
                if args.iothreads and kind not in ("tools", "vhost"):
                    iothread = 10 + i
                    dom.addIOThread(iothread, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                dom.attachDeviceFlags(disk_xml(kind, target, src, iothread), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            with SerialConsole(console_pty(lab.host, vm.name)) as con:
                con.login()
                r = con.run(DEV + f"sleep 2; head -c {tool_size} $(dev bench-tools) > /tmp/iobench && "
                            "chmod +x /tmp/iobench && for s in " + " ".join(f"bench-{d}" for d in disks) + "; do "
                            "echo $s $(dev $s); done", 60)
                print(f"# guest disks: {r.output.strip()!r}", flush=True)
                if r.rc != 0:
                    raise RuntimeError(f"guest setup failed: {r.output}")
                for rep in range(args.reps):
                    for mode, bs, depth in CASES:
                        key = f"{mode} {bs >> 10 if bs < (1 << 20) else bs >> 20}{'K' if bs < (1 << 20) else 'M'} QD{depth}"
                        if wanted and not any(w in key for w in wanted):
                            continue
                        order = disks if rep % 2 == 0 else tuple(reversed(disks))
                        for disk in order:
                            stop = threading.Event()
                            th = None
                            if disk in ("native", "vhost") and mode == "randwrite" and depth == 16:
                                th = threading.Thread(target=remap_loop,
                                                      args=(exports[disk], stop, remaps.setdefault(disk, [])))
                                th.start()
                            try:
                                cmd = (DEV + f"/tmp/iobench $(dev bench-{disk}) {mode} {bs} {depth} {args.seconds} "
                                       f"{REGION_MIB << 20}")
                                q0, s0 = cpu_seconds(qemu_pid), os.times()
                                r = con.run(cmd, args.seconds * 4 + 60)
                                q1, s1 = cpu_seconds(qemu_pid), os.times()
                            finally:
                                stop.set()
                                if th is not None:
                                    th.join()
                            line = [ln for ln in r.output.splitlines() if ln.startswith("{")]
                            if r.rc != 0 or not line:
                                raise RuntimeError(f"{disk} {key}: {r.output}")
                            res = json.loads(line[-1])
                            work = res["mib_s"] if bs >= (1 << 20) else res["iops"] / 1000  # MiB or 1000 requests
                            work *= args.seconds
                            res["qemu_cpu"] = (q1 - q0) / work * 1000  # ms per MiB (or µs per request)
                            res["server_cpu"] = (s1.user + s1.system - s0.user - s0.system) / work * 1000
                            results.setdefault(key, {}).setdefault(disk, []).append(res)
                            print(f"# rep {rep} {key:18} {disk:7} {res['iops']:9.0f} IOPS {res['mib_s']:8.1f} MiB/s "
                                  f"lat {res['lat_us']:8.0f} us  cpu qemu {res['qemu_cpu']:6.3f} server "
                                  f"{res['server_cpu']:6.3f} {'ms/MiB' if bs >= (1 << 20) else 'us/req'}", flush=True)
                stats = {k: exports[k].stats.as_dict() for k in exports}
            for srv in servers:
                io.submit(srv.close())
            servers.clear()
    finally:
        for vh in vhosts:
            vh.close()
        for srv in servers:
            with contextlib.suppress(Exception):
                io.submit(srv.close())
        io.stop()
        if plain_dev:
            subprocess.run(["losetup", "-d", plain_dev], check=False)
        if pool is not None:
            pool.close(detach=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    print(f"# elastic SSD in a TCG guest vs a plain virtio disk on the same loop-device region "
          f"(guest_iobench, O_DIRECT, libaio; {args.seconds:g} s per case, median of {args.reps}; "
          f"{'an I/O thread per disk' if args.iothreads else 'QEMU main loop'})")
    print(f"{'case':18} " + " ".join(f"{d:>9}" for d in disks) + "   ratio to plain: " + " ".join(disks[1:]))
    for key, by in results.items():
        unit = "mib_s" if "M QD" in key else "iops"
        med = {d: statistics.median(x[unit] for x in by[d]) for d in disks}
        print(f"{key:18} " + " ".join(f"{med[d]:9.1f}" for d in disks) + "   "
              + " ".join(f"{med[d] / med['plain']:6.2f}" for d in disks[1:])
              + f"   ({'MiB/s' if unit == 'mib_s' else 'IOPS'})")
        cpu = {d: (statistics.median(x["qemu_cpu"] for x in by[d]), statistics.median(x["server_cpu"] for x in by[d]))
               for d in disks}
        print(f"{'  cpu qemu+server':18} " + " ".join(f"{q:4.2f}+{sv:4.2f}" for q, sv in cpu.values())
              + f"   ({'ms per MiB' if unit == 'mib_s' else 'us per request'})")
    for disk, ms in remaps.items():
        print(f"# remap commit (unmap + map of {SPARE} blocks) during {disk} randwrite QD16: p50 "
              f"{statistics.median(ms):.2f} ms, max {max(ms):.2f} ms (n={len(ms)})")
    print("# reads served: " + ", ".join(f"{k} {v['reads']}" + (f" ({v['spliced_reads']} spliced)" if v.get(
        "spliced_reads") else "") for k, v in stats.items()))
    print(f"# {time.monotonic() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "remap_ms": remaps}, indent=1))


if __name__ == "__main__":
    main()
