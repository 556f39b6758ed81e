"""A multi-host lab on one machine: H hosts, each a network namespace with its own libvirtd and
its own ``symbiontd``, joined by a bridge inside a lab namespace.

Why: consolidation, hotspot relief and idle-VM parking only mean something across hosts, and
the controller must talk to hosts the way it would on real machines: libvirt over
``qemu+tcp://<address>/system`` and migration streams over a network, not a shared socket.

Layout (``name`` defaults to ``symc``; the subnet is private and exists only in namespaces)::

    <name>-lab   bridge <name>br0, 10.213.0.1/24 (where the controller runs)
      |-- veth --  <name>-h1   eth0 10.213.0.11/24, libvirtd --listen (auth none), symbiontd
      |-- veth --  <name>-h2   eth0 10.213.0.12/24, ...

Each host's libvirtd is :class:`symbiont.host.libvirt_instance.LibvirtInstance` (private mount
namespace, own host UUID) started inside the host's network namespace, so that the QEMUs it
starts listen for incoming migrations on that host's address; its unix socket lies in the
root mount namespace, which is how the host's ``symbiontd`` (a process inside the host's
network namespace) reaches it. VMs come from the lab's golden image (:mod:`symbiont_research.lab.vms`)
and carry the persistent-lab owner mark of the cluster's prefix, so ``cluster down`` removes
exactly them, wherever migrations have taken them.

The state of a lab that is up lives in ``<work_dir>/cluster.yaml`` (hosts, addresses, sockets,
process ids), which ``cluster down``, the controller (``--cluster``) and the tests read, and an
Ansible inventory is written beside it (``inventory.ini``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from pyroute2 import IPRoute, NetNS, netns

log = logging.getLogger(__name__)

DEFAULT_NAME = "symc"
DEFAULT_SUBNET = "10.213.0.0/24"
STATE_FILE = "cluster.yaml"


class ClusterError(Exception):
    """The lab could not be brought up or down; the message says why."""


def _research(module: str) -> Any:
    """The lab's VM code (``symbiont_research.<module>``): the cluster lab boots lab VMs, which
    only an install with the research package has."""
    from symbiont.plugins import research

    mod = research(module)
    if mod is None:
        raise ClusterError("the cluster lab needs the research package symbiont_research (not installed)")
    return mod


def _check_name(name: str) -> None:
    if not (1 <= len(name) <= 8 and name.isalnum() and name.islower()):
        raise ClusterError(f"cluster name {name!r} must be 1-8 lowercase letters/digits (it names links)")


@dataclass(frozen=True)
class HostSpec:
    """One lab host: its namespace, address and where its libvirtd and daemon live."""

    index: int
    name: str  # the cluster's name
    address: str
    work_dir: Path

    @property
    def id(self) -> str:
        return f"h{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.name}-h{self.index}"

    @property
    def instance(self) -> str:
        return f"{self.name}-h{self.index}"

    @property
    def veth(self) -> tuple[str, str]:
        """(end inside the host's namespace, end on the lab bridge)."""
        return f"{self.name}{self.index}a", f"{self.name}{self.index}b"

    @property
    def dir(self) -> Path:
        return self.work_dir / self.id

    @property
    def socket(self) -> Path:
        return self.dir / "symbiontd.sock"

    @property
    def tcp_uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def migrate_uri(self) -> str:
        return f"tcp://{self.address}"


@dataclass
class ClusterNet:
    """The lab's namespaces, bridge and veth pairs (pyroute2); nothing in the root namespace."""

    name: str = DEFAULT_NAME
    subnet: str = DEFAULT_SUBNET

    def __post_init__(self) -> None:
        _check_name(self.name)
        net = ipaddress.ip_network(self.subnet)
        if not net.is_private or net.version != 4 or net.prefixlen > 26:
            raise ClusterError(f"subnet {self.subnet}: must be a private IPv4 network of at least /26")

    @property
    def lab_ns(self) -> str:
        return f"{self.name}-lab"

    @property
    def bridge(self) -> str:
        return f"{self.name}br0"

    def address(self, i: int) -> str:
        """Host ``i``'s address (1-based); the bridge has .1."""
        return str(ipaddress.ip_network(self.subnet).network_address + (1 if i == 0 else 10 + i))

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def namespaces(self) -> list[str]:
        return sorted(n for n in netns.listnetns() if n == self.lab_ns or n.startswith(f"{self.name}-h"))

    def create_lab(self) -> None:
        if self.lab_ns in netns.listnetns():
            raise ClusterError(f"namespace {self.lab_ns} exists: a cluster {self.name!r} is up ('cluster down' first)")
        netns.create(self.lab_ns)
        with NetNS(self.lab_ns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("add", ifname=self.bridge, kind="bridge")
            br = ns.link_lookup(ifname=self.bridge)[0]
            ns.addr("add", index=br, address=self.address(0), prefixlen=self.prefixlen)
            ns.link("set", index=br, state="up")

    def add_host(self, h: HostSpec) -> None:
        """The host's namespace and a veth pair: one end there (eth0), the other on the bridge. The
        pair is created inside the lab namespace, so it never exists in the root one."""
        if h.netns in netns.listnetns():
            raise ClusterError(f"namespace {h.netns} exists already")
        netns.create(h.netns)
        inner, outer = h.veth
        with NetNS(self.lab_ns) as ns:
            ns.link("add", ifname=outer, kind="veth", peer={"ifname": inner, "net_ns_fd": h.netns})
            idx = ns.link_lookup(ifname=outer)[0]
            ns.link("set", index=idx, master=ns.link_lookup(ifname=self.bridge)[0])
            ns.link("set", index=idx, state="up")
        with NetNS(h.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            idx = ns.link_lookup(ifname=inner)[0]
            ns.link("set", index=idx, ifname="eth0")
            ns.addr("add", index=idx, address=h.address, prefixlen=self.prefixlen)
            ns.link("set", index=idx, state="up")

    def remove(self) -> list[str]:
        """Delete the lab's namespaces (their links go with them)."""
        gone = []
        for n in self.namespaces():
            with contextlib.suppress(Exception):
                netns.remove(n)
                gone.append(n)
        return gone


def root_addresses() -> list[str]:
    """Every IPv4 address of the root namespace (a test asserts the lab's are not among them)."""
    with IPRoute() as ipr:
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)]


class NetnsDaemon:
    """``symbiontd`` as a child process inside a network namespace (nsenter), own config and socket."""

    def __init__(self, config_path: Path, socket: Path, log_path: Path, ns: str) -> None:
        self.config_path, self.socket, self.log_path, self.ns = config_path, socket, log_path, ns
        self.pid: int | None = None

    def start(self, timeout: float = 60.0) -> int:
        from symbiont.client import ApiError, Client

        logf = self.log_path.open("ab")
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", sys.executable, "-m", "symbiont.daemon",
             "--config", str(self.config_path)],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        logf.close()
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"symbiontd in {self.ns} exited with {proc.returncode}; see {self.log_path}")
            try:
                with Client(str(self.socket), timeout=5.0) as c:
                    c.get("/v1/health")
                return proc.pid
            except ApiError:
                time.sleep(0.2)
        raise ClusterError(f"symbiontd in {self.ns} did not answer within {timeout:.0f} s; see {self.log_path}")


def stop_pid(pid: int, must_contain: str, timeout: float = 60.0) -> bool:
    """SIGTERM (then SIGKILL) the process ``pid`` if its command line still names ``must_contain``
    (a reused pid is someone else's)."""
    try:
        p = psutil.Process(pid)
        if must_contain not in " ".join(p.cmdline()):
            return False
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except psutil.TimeoutExpired:
            p.kill()
            p.wait(10)
        return True
    except psutil.Error:
        return False


def parse_counts(spec: str | int, hosts: int) -> list[int]:
    """``--vms-per-host``: one number for every host, or one per host (``2,0,1``)."""
    parts = [spec] if isinstance(spec, int) else [p for p in str(spec).split(",") if p.strip()]
    try:
        counts = [int(p) for p in parts]
    except ValueError:
        raise ClusterError(f"--vms-per-host {spec!r}: a number or a comma list of numbers") from None
    if len(counts) == 1:
        counts *= hosts
    if len(counts) != hosts or any(c < 0 or c > 16 for c in counts):
        raise ClusterError(f"--vms-per-host {spec!r}: one count (0..16) or {hosts} of them")
    return counts


@dataclass
class ClusterLab:
    """Bring the lab up (:meth:`up`) or down (:meth:`down`); see the module docstring."""

    hosts: int = 2
    vms_per_host: list[int] = field(default_factory=lambda: [1, 0])
    name: str = DEFAULT_NAME
    subnet: str = DEFAULT_SUBNET
    work_dir: Path = Path("results/cluster")
    memory_mib: int = 256
    period_s: float = 1.0
    base_config: str | None = None
    step: Callable[[str], None] = lambda s: None
    # The daemons' placement.overcommit (per resource): a host carries this many vCPUs per core,
    # etc. Idle consolidation needs it: parked VMs keep their vCPUs, and a 2-core lab host at 1.0
    # takes two 1-vCPU VMs.
    overcommit: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not 1 <= self.hosts <= 16:
            raise ClusterError(f"--hosts {self.hosts}: between 1 and 16")
        for r, v in self.overcommit.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 100:
                raise ClusterError(f"overcommit.{r}: {v!r} is not a ratio in (0, 100]")
        self.work_dir = Path(self.work_dir).absolute()
        self.net = ClusterNet(self.name, self.subnet)

    @property
    def prefix(self) -> str:
        return f"{self.name}-"

    def specs(self) -> list[HostSpec]:
        return [HostSpec(i, self.name, self.net.address(i), self.work_dir) for i in range(1, self.hosts + 1)]

    def lab_config(self) -> Any:
        from symbiont.config import load_config

        return load_config(self.base_config, {"lab": {"vm_prefix": self.prefix, "memory_mib": self.memory_mib,
                                                      "max_vcpus": 1}})  # fmt: skip

    def host_entries(self, specs: Sequence[HostSpec]) -> list[dict[str, str]]:
        """``placement.hosts`` as seen from inside the lab (qemu+tcp over the bridge)."""
        return [{"id": h.id, "libvirt_uri": h.tcp_uri, "daemon": str(h.socket), "migrate_uri": h.migrate_uri}
                for h in specs]  # fmt: skip

    def up(self) -> dict[str, Any]:
        """Namespaces, bridge, libvirtds, daemons and VMs; returns (and writes) the cluster state."""
        from symbiont.host.libvirt_host import LibvirtHost
        from symbiont.host.libvirt_instance import LibvirtInstance
        from symbiont.host.migrate import quiet_errors
        vms = _research("lab.vms")
        image = _research("lab.image")
        build_image, make_recipe = image.build_image, image.make_recipe

        if os.geteuid() != 0:
            raise ClusterError("the cluster lab needs root (network namespaces, libvirtd)")
        if len(self.vms_per_host) != self.hosts:
            raise ClusterError(f"vms_per_host has {len(self.vms_per_host)} counts for {self.hosts} hosts")
        if (self.work_dir / STATE_FILE).exists():
            raise ClusterError(f"{self.work_dir / STATE_FILE} exists: a cluster is up ('symbiont cluster down' first)")
        quiet_errors()
        t0 = time.monotonic()
        specs = self.specs()
        state: dict[str, Any] = {
            "name": self.name, "subnet": self.subnet, "netns": self.net.lab_ns, "prefix": self.prefix,
            "bridge_address": self.net.address(0), "work_dir": str(self.work_dir),
            "migrate_unsafe": True,  # the overlays are files every host sees: shared storage
            "hosts": [],
        }  # fmt: skip
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.lab_config()
        base = self.lab_config()
        try:
            self.step(f"network: namespace {self.net.lab_ns}, bridge {self.net.bridge} {self.net.address(0)}"
                      f"/{self.net.prefixlen}")  # fmt: skip
            self.net.create_lab()
            for h in specs:
                self.step(f"{h.id}: namespace {h.netns}, eth0 {h.address}")
                self.net.add_host(h)
            image = None
            if sum(self.vms_per_host):
                self.step("golden image (built once, then reused by recipe hash)")
                image = build_image(Path(base.lab.images_dir), Path(base.lab.cache_dir),
                                    make_recipe(base.lab.mirror), step=lambda s: self.step(f"image: {s}"))  # fmt: skip
            owner = vms.LabOwner.persistent_lab(self.prefix)
            for h, count in zip(specs, self.vms_per_host, strict=True):
                self.step(f"{h.id}: libvirtd in {h.netns} listening on {h.tcp_uri}")
                inst = LibvirtInstance(name=h.instance, netns=h.netns, listen_addr=h.address)
                inst.start()
                entry = {"id": h.id, "netns": h.netns, "address": h.address, "instance": h.instance,
                         "libvirt_uri": h.tcp_uri, "local_libvirt_uri": inst.uri, "daemon": str(h.socket),
                         "migrate_uri": h.migrate_uri, "pids": dict(inst.pids), "vms": []}  # fmt: skip
                state["hosts"].append(entry)
                self._save(state)
                host = LibvirtHost(inst.uri)
                try:
                    for k in range(1, count + 1):
                        vm_name = f"{self.prefix}{h.id}-{k}"
                        self.step(f"{h.id}: booting {vm_name}")
                        if host.exists(vm_name):
                            raise ClusterError(f"{vm_name} exists on {h.id} already")
                        assert image is not None
                        vms.create_vm(host, cfg, image, vm_name, owner=owner, memory_mib=self.memory_mib,
                                      max_vcpus=1)  # fmt: skip
                        entry["vms"].append(vm_name)
                        self._save(state)
                finally:
                    host.close()
            for h, entry in zip(specs, state["hosts"], strict=True):
                for vm_name in entry["vms"]:
                    self.step(f"{h.id}: waiting for {vm_name}'s agent")
                    vms.wait_for_agent(vms.lab_vm(cfg, vm_name).channel, timeout=300)
                self.step(f"{h.id}: symbiontd in {h.netns} at {h.socket}")
                entry["daemon_pid"] = self._start_daemon(h, entry, specs)
                self._save(state)
                from symbiont.client import Client

                with Client(str(h.socket)) as c:
                    for vm_name in entry["vms"]:
                        c.post("/v1/vms", {"name": vm_name, "memory": {"min_mib": 128}})
        except BaseException:
            self.step("bring-up failed: tearing down what was made")
            with contextlib.suppress(Exception):
                self.down()
            raise
        state["up_seconds"] = round(time.monotonic() - t0, 1)
        self._save(state)
        write_inventory(state, self.work_dir / "inventory.ini")
        self.step(f"cluster {self.name} up in {state['up_seconds']} s: {self.work_dir / STATE_FILE}, "
                  f"{self.work_dir / 'inventory.ini'}")  # fmt: skip
        return state

    def _start_daemon(self, h: HostSpec, entry: dict[str, Any], specs: Sequence[HostSpec]) -> int:
        h.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = h.dir / "symbiontd.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "state_dir": str(h.dir / "state"),
            "socket": str(h.socket),
            "libvirt_uri": entry["local_libvirt_uri"],
            "control": {"period_s": self.period_s, "agent_timeout_s": 3.0},
            "lab": {"vm_prefix": self.prefix, "memory_mib": self.memory_mib, "max_vcpus": 1},
            "placement": {"host_id": h.id, "hosts": self.host_entries(specs), "migrate_unsafe": True,
                          "overcommit": dict(self.overcommit)},
        }))  # fmt: skip
        entry["daemon_config"] = str(cfg_path)
        return NetnsDaemon(cfg_path, h.socket, h.dir / "symbiontd.log", h.netns).start()

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.work_dir / (STATE_FILE + ".tmp")
        tmp.write_text(yaml.safe_dump(state, sort_keys=False))
        tmp.replace(self.work_dir / STATE_FILE)

    def down(self) -> dict[str, Any]:
        """Stop the daemons, remove the lab's VMs on every host, stop the libvirtds, remove the
        namespaces. Works from the state file, and on what is left without it."""
        from symbiont.host.libvirt_host import LibvirtHost
        from symbiont.host.libvirt_instance import LibvirtInstance, _read_pid

        vms = _research("lab.vms")

        state = load_state(self.work_dir) or {"hosts": []}
        cfg = self.lab_config()
        owner = vms.LabOwner.persistent_lab(self.prefix)
        out: dict[str, Any] = {"daemons": [], "vms": [], "instances": [], "namespaces": []}
        for e in state.get("hosts", []):
            if e.get("daemon_pid") and stop_pid(int(e["daemon_pid"]), str(e.get("daemon_config", "symbiontd"))):
                out["daemons"].append(e["id"])
        for h in self.specs() if not state["hosts"] else [_spec_of(e, self) for e in state["hosts"]]:
            inst = LibvirtInstance(name=h.instance, netns=h.netns, listen_addr=h.address)
            pids = {d: p for d in ("libvirtd", "virtlogd") if (p := _read_pid(inst._pidfile(d)))}
            if not pids:
                continue
            if inst.socket.exists():
                try:
                    host = LibvirtHost(inst.uri)
                    try:
                        for dom in host.conn.listAllDomains():
                            if dom.name().startswith(self.prefix) and vms.domain_mark(dom) is not None:
                                vms.remove_vm(host, cfg, dom.name(), owner)
                                out["vms"].append(dom.name())
                    finally:
                        host.close()
                except Exception as exc:  # noqa: BLE001 - the rest still goes
                    log.warning("%s: could not remove its VMs: %s", h.id, exc)
            inst.pids, inst.started = pids, True
            inst.stop()
            out["instances"].append(h.instance)
        out["namespaces"] = self.net.remove()
        for f in (STATE_FILE, "inventory.ini"):
            with contextlib.suppress(FileNotFoundError):
                (self.work_dir / f).unlink()
        return out


def _spec_of(e: dict[str, Any], lab: ClusterLab) -> HostSpec:
    return HostSpec(int(str(e["id"]).lstrip("h")), lab.name, str(e["address"]), lab.work_dir)


def load_state(work_dir: Path | str) -> dict[str, Any] | None:
    p = Path(work_dir) / STATE_FILE
    if not p.exists():
        return None
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
        raise ClusterError(f"{p}: not a cluster state file (no hosts list)")
    return data


def write_inventory(state: dict[str, Any], path: Path) -> Path:
    """An Ansible inventory of the lab's hosts. Each host is a local connection (the namespaces are
    on this machine) with the variables a playbook needs to act on that host rather than on the
    machine: its daemon socket, libvirt URIs, namespace and address."""
    lines = ["# Generated by 'symbiont cluster up'; removed by 'symbiont cluster down'.", "[symbiont_cluster]"]
    for e in state["hosts"]:
        lines.append(
            f"{state['name']}-{e['id']} ansible_connection=local ansible_python_interpreter={sys.executable} "
            f"symbiont_socket={e['daemon']} symbiont_netns={e['netns']} symbiont_address={e['address']} "
            f"symbiont_libvirt_uri={e['local_libvirt_uri']} symbiont_libvirt_tcp_uri={e['libvirt_uri']} "
            f"symbiont_host_id={e['id']}"
        )
    lines += ["", "[symbiont_cluster:vars]", f"symbiont_cluster_netns={state['netns']}",
              f"symbiont_cluster_state={Path(state['work_dir']) / STATE_FILE}", ""]  # fmt: skip
    path.write_text("\n".join(lines))
    return path
