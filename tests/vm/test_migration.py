"""Container migration between two real VMs with CRIU: relay (Portkey) and guest network paths.

Two VMs booted from the golden image with a point-to-point guest link, a real ``symbiontd``,
the real agents. What the container does is checked over the serial consoles, independently
of the agents: its counter file (written by a second process through a pipe), its cgroup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from symbiont.migration.workload import counter_command, echo_command, parse_counter
from symbiont_research.lab.console import guest_exec
from symbiont_research.lab.session import LabSession

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]

CT = "/sys/fs/cgroup/symbiont-ct"
WORK = "/var/lib/symbiont-work"
MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(libvirtd, tmp_path_factory):
    with LabSession(count=2, prefix="symb-mig-", period_s=1.0, memory_mib=512, max_vcpus=2,
                    peer_link=True, work_dir=tmp_path_factory.mktemp("miglab"),
                    daemon_overrides={"control": {"agent_timeout_s": 15.0}}) as s:  # fmt: skip
        for name in s.names:
            s.wait_for(
                lambda n=name: s.client().get(f"/v1/vms/{n}")["cooperative"], 120, f"{name} cooperative"
            )
        yield s


def gx(lab: LabSession, vm: str, cmd: str) -> str:
    r = guest_exec(lab.host, vm, cmd, timeout=90)
    assert r.rc == 0, (vm, cmd, r.output)
    return r.output.strip()


def counter(lab: LabSession, vm: str, ct: str) -> list[int]:
    out = gx(lab, vm, f"cat {WORK}/{ct}/out 2>/dev/null || true")
    return [n for n, _ in parse_counter(out + "\n")]


def create(lab: LabSession, vm: str, ct: str, mib: int = 16, netns: bool = False) -> None:
    with lab.client() as c:
        c.post(f"/v1/cpu/vms/{vm}/containers", {
            "name": ct, "command": counter_command(ct, mib, f"{WORK}/{ct}/out"),
            "limits": {"memory_max": "192M", "cpu_weight": 250, "pids_max": 64}, "netns": netns,
        })  # fmt: skip
    lab.wait_for(lambda: len(counter(lab, vm, ct)) >= 5, 90, f"{ct} counting on {vm}", interval=2)


def migrate(lab: LabSession, vm: str, ct: str, dest: str, timeout: float = 400, **kw) -> dict:
    with lab.client() as c:
        m = c.post("/v1/migration", {"vm": vm, "ct": ct, "to": dest, **kw})

    def ended():
        with lab.client() as c:
            cur = c.get(f"/v1/migration/{m['id']}")
        return cur if cur["phase"] in ("done", "aborted") and not cur["running"] else None

    return lab.wait_for(ended, timeout, f"migration {m['id']}", interval=1)


def cgroup_state(lab: LabSession, vm: str, ct: str) -> dict[str, str]:
    out = gx(
        lab,
        vm,
        f"d={CT}/{ct}; if [ -d $d ]; then echo procs=$(cat $d/cgroup.procs | wc -l); "
        f"echo frozen=$(grep frozen $d/cgroup.events | cut -d' ' -f2); "
        f"echo mem=$(cat $d/memory.max); echo weight=$(cat $d/cpu.weight); else echo procs=0; fi",
    )
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def assert_counts_on(lab: LabSession, vm: str, ct: str, other: str) -> list[int]:
    """Running on ``vm`` (advancing, consecutive from 1: never restarted), not on ``other``."""
    a = counter(lab, vm, ct)
    time.sleep(3)
    b = counter(lab, vm, ct)
    assert b[-1] > a[-1], f"{ct} does not advance on {vm}"
    assert b == list(range(1, len(b) + 1)), f"{ct} counter restarted or skipped on {vm}: {b}"
    st = cgroup_state(lab, vm, ct)
    assert int(st["procs"]) >= 2 and st["frozen"] == "0", st
    assert int(cgroup_state(lab, other, ct)["procs"]) == 0, f"a second copy of {ct} runs on {other}"
    return b


def test_relay_migration_keeps_counting_with_limits_pipe_and_open_file(lab: LabSession) -> None:
    vm1, vm2 = lab.names
    create(lab, vm1, "ctr")
    before = counter(lab, vm1, "ctr")[-1]
    m = migrate(lab, vm1, "ctr", vm2, path="relay", rate="adaptive", predumps=4)
    assert m["phase"] == "done", m
    t = m["timings"]
    for key in ("predump1_s", "predump2_s", "dump_s", "transfer_final_s", "restore_s", "downtime_s"):
        assert t[key] > 0, (key, t)
    # Pre-copy converged: the second pre-dump holds only what was written meanwhile, the
    # final dump (frozen) moves a small delta, not the container's 16 MiB again.
    pre = m["progress"]["predump_bytes"]
    assert pre[0] > 16 * MiB and pre[-1] < pre[0] / 4, pre
    assert m["progress"]["precopy_stop"] in ("below-threshold", "not-shrinking", "max-predumps"), m["progress"]
    assert m["progress"]["final_bytes"] < 4 * MiB, m["progress"]
    assert m["result"]["restore"]["pid"] > 0 and m["progress"]["moved"] > 8 * MiB  # 16 MiB of memory moved
    relay = m["result"]["relay"]
    assert sum(r["relay_bytes"] for r in relay) == m["progress"]["moved"]
    cpu = m["result"]["host_cpu"]
    assert cpu["source_qemu_cpu_s"] > 0 and cpu["dest_qemu_cpu_s"] > 0 and cpu["daemon_cpu_s"] > 0
    after = assert_counts_on(lab, vm2, "ctr", vm1)
    assert after[-1] > before  # continued from where it was (and the list is 1..n: no restart)
    st = cgroup_state(lab, vm2, "ctr")
    assert int(st["mem"]) == 192 * MiB and st["weight"] == "250"  # the same limits
    # Own PID namespace on the destination: the restored init is PID 1 there.
    ns = gx(lab, vm2, f"for p in $(cat {CT}/ctr/cgroup.procs); do grep NSpid /proc/$p/status; done")
    assert any(line.split()[-1] == "1" for line in ns.splitlines()), ns
    with lab.client() as c:
        names = [x["name"] for x in c.get(f"/v1/cpu/vms/{vm2}/containers")["containers"]]
        assert "ctr" in names
        assert "ctr" not in [x["name"] for x in c.get(f"/v1/cpu/vms/{vm1}/containers")["containers"]]


def test_network_path_migrates_back(lab: LabSession) -> None:
    vm1, vm2 = lab.names
    # the guests' network exists only inside the lab's namespace: taps and bridge live there
    from pyroute2 import IPRoute, NetNS

    link = lab._link
    assert link is not None
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=link.tap(0)) and not ipr.link_lookup(ifname="symbr0")
    with NetNS(link.netns) as ns:
        br = ns.link_lookup(ifname="symbr0")
        assert br and all(
            ns.get_links(ns.link_lookup(ifname=t)[0])[0].get_attr("IFLA_MASTER") == br[0]
            for t in (link.tap(0), link.tap(1))
        )
    m = migrate(lab, vm2, "ctr", vm1, path="network", predumps=1)
    assert m["phase"] == "done", m
    assert m["result"]["network"] and m["progress"]["moved"] > 8 * MiB
    assert_counts_on(lab, vm1, "ctr", vm2)


def test_lazy_restore_runs_the_container_before_its_memory_is_back(lab: LabSession) -> None:
    """CRIU lazy pages in the destination guest (userfaultfd): the restored copy runs at once,
    its memory faulted in and pushed by ``criu lazy-pages`` from the received images, which the
    destination keeps until that is done; there and back, the counter never restarts."""
    vm1, vm2 = lab.names
    for src, dst in ((vm1, vm2), (vm2, vm1)):
        m = migrate(lab, src, "ctr", dst, path="relay", predumps=1, lazy=True)
        assert m["phase"] == "done", m
        assert m["result"]["restore"]["lazy"] is True, m["result"]["restore"]
        assert m["timings"]["lazy_fill_wait_s"] >= 0, m["timings"]
        assert_counts_on(lab, dst, "ctr", src)
        assert gx(lab, dst, "pgrep -f 'criu lazy-pages' || true") == ""
        assert gx(lab, dst, f"ls /var/lib/symbiont-mig/{m['id']} 2>/dev/null || true") == ""  # images gone after the fill


def test_shm_channel_migrates_with_one_region_per_vm_and_no_file_left(lab: LabSession) -> None:
    """The relay's shm channel (the default): a region hot-plugged into each guest
    (ivshmem-plain) at its first shm migration (here or in a test before), the restored copy
    runs, no region file is left under /dev/shm, and the way back reuses the two regions (one
    per VM, never one in two guests)."""
    vm1, vm2 = lab.names
    create(lab, vm2, "shmc", mib=8)
    regions: dict[str, str] = {}
    for src, dst, back in ((vm2, vm1, False), (vm1, vm2, True)):
        m = migrate(lab, src, "shmc", dst, path="relay", channel="shm", predumps=1)
        assert m["phase"] == "done", m
        shm = m["result"]["shm"]
        assert m["result"]["channel"] == "shm", m["result"]
        assert shm["plugged"] == [] if back else set(shm["plugged"]) <= {vm1, vm2}, shm
        relay = m["result"]["relay"]
        assert relay and all(r["channel"] == "shm" and r["sender"]["channel"] == "shm" for r in relay), relay
        assert sum(r["relay_bytes"] for r in relay) == m["progress"]["moved"] > 4 * MiB
        assert_counts_on(lab, dst, "shmc", src)
        assert not set(shm["regions"]) & set(os.listdir("/dev/shm"))
        for vm, name in zip((src, dst), shm["regions"], strict=True):
            assert regions.setdefault(vm, name) == name  # the same region each time
            xml = lab.host.domain(vm).XMLDesc(0)
            assert xml.count("<shmem ") == 1 and f"name='{name}'" in xml, vm
    assert regions[vm1] != regions[vm2]
    with lab.client() as c:
        c.call("DELETE", f"/v1/cpu/vms/{vm2}/containers/shmc")


@pytest.mark.parametrize("fault,words", [("corrupt", "checksum"), ("truncate", "truncated")])
def test_damaged_stream_is_detected_and_source_keeps_running(lab: LabSession, fault: str, words: str) -> None:
    vm1, vm2 = lab.names
    m = migrate(lab, vm1, "ctr", vm2, path="relay", predumps=0, fault=fault)
    assert m["phase"] == "aborted" and words in m["error"], m
    assert_counts_on(lab, vm1, "ctr", vm2)
    assert gx(lab, vm2, "ls /var/lib/symbiont-mig | grep -v aborted || true") == ""


def test_daemon_killed_mid_transfer_leaves_exactly_one_copy(lab: LabSession) -> None:
    vm1, vm2 = lab.names
    with lab.client() as c:  # slow fixed rate: the final transfer takes several seconds
        m = c.post("/v1/migration", {"vm": vm1, "ct": "ctr", "to": vm2, "path": "relay", "rate": "fixed",
                                     "rate_mbps": 8, "predumps": 0})  # fmt: skip

    def in_final_transfer():
        with lab.client() as c:
            cur = c.get(f"/v1/migration/{m['id']}")
        assert cur["phase"] not in ("done", "aborted"), cur
        return cur["phase"] == "transfer" and "dump_bytes" in cur["progress"]

    lab.wait_for(in_final_transfer, 300, "the final transfer", interval=0.3)
    assert cgroup_state(lab, vm1, "ctr")["frozen"] == "1"  # mid-downtime: the source copy is frozen
    lab.daemon.stop(sig=signal.SIGKILL)
    lab.daemon.start()

    def settled():
        with lab.client() as c:
            return c.get(f"/v1/migration/{m['id']}")["phase"] == "aborted"

    lab.wait_for(settled, 180, "recovery of the interrupted migration", interval=1)
    with lab.client() as c:
        decisions = [
            d for d in c.get("/v1/decisions") if d["part"] == "migration" and d["action"] == "recover"
        ]
    assert decisions and decisions[-1]["outcome"]["action"] == "abort"
    assert_counts_on(lab, vm1, "ctr", vm2)


# The client: one connection, a counter sent and echoed every 0.2 s; it prints each echo,
# and dies (printing why) if the connection breaks or an echo is wrong.
CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.settimeout(90)
f = s.makefile("rwb", buffering=0)
print("connected", s.getsockname(), flush=True)
n = 0
while True:
    n += 1
    f.write(b"%d\n" % n)
    line = f.readline()
    if line.strip() != b"%d" % n:
        print("BAD", n, line, flush=True)
        sys.exit(1)
    print(n, round(time.time(), 3), flush=True)
    time.sleep(0.2)
"""
SERVER_IP = "10.211.200.1"
CLIENT_IP = "10.211.255.254"


def echoes(path) -> list[int]:
    return [int(ln.split()[0]) for ln in path.read_text().splitlines() if ln[:1].isdigit()]


def test_server_with_established_tcp_and_netns_container_migrate(lab: LabSession, tmp_path) -> None:
    """A TCP server keeps its client's connection across the move; a container with its own
    network namespace migrates too (CRIU locks the network with iptables in the guest)."""
    vm1, vm2 = lab.names
    link = lab._link
    assert link is not None
    with lab.client() as c:
        c.post(f"/v1/cpu/vms/{vm1}/containers", {"name": "echo", "command": echo_command("echo", 47900),
                                                 "limits": {"memory_max": "96M"}})  # fmt: skip
    # The server's own address on vm1's link (what a service IP is); the client sits on the
    # lab's bridge in its namespace, outside both guests.
    gx(lab, vm1, "i=$(for f in /sys/class/net/*/address; do grep -q '^52:54:00:5b' $f && basename $(dirname $f); done); "
                 "m=$(cat /sys/class/net/$i/address); ip link set $i up; "
                 "ip addr add 10.211.$((0x$(echo $m | cut -d: -f5))).$((0x$(echo $m | cut -d: -f6)))/16 dev $i || true; "
                 f"ip addr add {SERVER_IP}/32 dev $i")  # fmt: skip
    subprocess.run(["ip", "-n", link.netns, "addr", "replace", f"{CLIENT_IP}/16", "dev", "symbr0"], check=True)
    out = tmp_path / "client.out"
    with open(out, "w") as fh:
        client = subprocess.Popen(["ip", "netns", "exec", link.netns, sys.executable, "-c", CLIENT, SERVER_IP,
                                   "47900"], stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        lab.wait_for(lambda: len(echoes(out)) >= 5, 90, "the client's first echoes", interval=1)
        m = migrate(lab, vm1, "echo", vm2, path="relay", ip=SERVER_IP)
        assert m["phase"] == "done", m
        n0 = len(echoes(out))
        try:
            lab.wait_for(lambda: len(echoes(out)) >= n0 + 10, 90, "echoes after the move", interval=1)
        except TimeoutError:
            diag = {vm: gx(lab, vm, "ip -o addr; iptables -S; ss -tnie; cat /var/log/symbiont-containers/echo.log; "
                                    "ls /var/lib/symbiont-mig/*/img/final/ 2>&1 | head; tail -5 /var/lib/symbiont-mig/*/img/final/restore.log")
                    for vm in (vm1, vm2)}  # fmt: skip
            neigh = subprocess.run(["ip", "-n", link.netns, "neigh"], capture_output=True, text=True).stdout
            raise AssertionError(f"no echo after the move: {m}\nclient: {out.read_text()[-1500:]}\n{diag}\n{neigh}") from None
        assert client.poll() is None, out.read_text()  # the same connection, never broken
        text = out.read_text()
        assert text.count("connected") == 1 and "BAD" not in text, text
        got = echoes(out)
        assert got == list(range(1, len(got) + 1)), got
        assert int(cgroup_state(lab, vm1, "echo")["procs"]) == 0 and int(cgroup_state(lab, vm2, "echo")["procs"]) >= 1
        assert CLIENT_IP in gx(lab, vm2, "ss -Htn state established '( sport = :47900 )'")  # served there now
    finally:
        client.kill()
        client.wait()
    # A container in its own network namespace (lo only): CRIU dumps and recreates the namespace.
    create(lab, vm1, "nsct", mib=8, netns=True)
    m = migrate(lab, vm1, "nsct", vm2, path="relay")
    assert m["phase"] == "done", m
    assert_counts_on(lab, vm2, "nsct", vm1)
    ns = gx(lab, vm2, f"for p in $(cat {CT}/nsct/cgroup.procs); do readlink /proc/$p/ns/net; done; readlink /proc/1/ns/net")
    lines = ns.split()
    assert lines[-1] not in lines[:-1], ns  # not the guest's own namespace
