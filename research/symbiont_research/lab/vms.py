"""Lab VMs through libvirt-python: define, start, list and remove what ``lab up`` made.

Each VM boots the golden image's kernel directly, from its own qcow2 overlay (the golden
image is never written). The domain carries a ``<metadata>`` mark so that ``lab down``
removes exactly the domains ``lab up`` created, and nothing else on the host.

The mark also names the run that made the domain (:class:`LabOwner`: a run id, and the pid,
host and start time of the process that owns it). Two people running the same experiment on
one host used to delete each other's VMs at start; now a run removes or reuses only domains
whose mark carries its own run id, and refuses, naming the domain and its owner, otherwise.
A domain whose owner is *provably* dead (same host, and that pid is gone or is another
process since the start time differs) may be taken over only when the caller asks for it
(``reclaim``): a crashed run's VMs are often what someone is looking at to find out why.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt
import psutil

from symbiont.config import Config
from symbiont.host.libvirt_host import LibvirtError, LibvirtHost, resolve_domain_type
from symbiont_agent import protocol as proto
from symbiont_research.lab.image import Image

log = logging.getLogger(__name__)

LAB_NS = "https://symbiont.dev/xmlns/lab/1"  # an XML namespace name, never fetched


class LabError(Exception):
    """A lab operation failed; the message says which VM and why."""


class NotOwnedError(LabError):
    """A domain belongs to another run: not ours to delete or reuse."""


@dataclass(frozen=True)
class LabOwner:
    """Who made a lab domain: a run id, and the process that owns it.

    ``pid == 0`` is a lab that outlives its process (``symbiont lab up``): its run id is
    ``lab:<vm_prefix>``, so any later ``lab up``/``lab down`` with the same prefix is that lab.
    ``started`` (the process's start time, epoch seconds) tells a reused pid from the owner.
    """

    run: str
    pid: int = 0
    host: str = ""
    started: float = 0.0

    @classmethod
    def new_run(cls, run: str | None = None) -> LabOwner:
        """A fresh run owned by this process (``run``: a short random id unless given)."""
        me = psutil.Process()
        return cls(run or secrets.token_hex(3), me.pid, socket.gethostname(), round(me.create_time(), 2))

    @classmethod
    def this_process(cls) -> LabOwner:
        """The default owner: this process, whatever run it does."""
        me = psutil.Process()
        return cls.new_run(f"pid{me.pid}-{int(me.create_time())}@{socket.gethostname()}")

    @classmethod
    def persistent_lab(cls, prefix: str) -> LabOwner:
        return cls(f"lab:{prefix}", 0, socket.gethostname(), 0.0)

    def describe(self) -> str:
        if not self.run:
            return "an unknown run (made before domains carried an owner)"
        if self.pid == 0:
            return f"the persistent lab {self.run!r} on {self.host or '?'} ('symbiont lab up')"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "?"
        return f"run {self.run!r} (pid {self.pid} on {self.host or '?'}, started {when})"

    def state(self) -> str:
        """``alive``, ``dead`` (provably: same host, pid gone or reused) or ``unknown``."""
        if not self.run:
            return "dead"  # no owner was recorded: nothing to protect
        if self.pid == 0 or self.host != socket.gethostname():
            return "unknown"
        try:
            started = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            return "dead"
        except psutil.Error:
            return "unknown"
        return "dead" if abs(started - self.started) > 1.0 else "alive"


@dataclass(frozen=True)
class LabMark:
    """The ``<metadata>`` mark of a lab domain."""

    image: str
    owner: LabOwner
    peer_link: tuple[int, int] | None = None


def mark_xml(image: str, owner: LabOwner, peer_link: tuple[int, int] | None = None) -> str:
    peer = f" peer-link={quoteattr(f'{peer_link[0]},{peer_link[1]}')}" if peer_link else ""
    return (
        f"<lab:lab xmlns:lab='{LAB_NS}' image={quoteattr(image)} run={quoteattr(owner.run)}"
        f" pid='{int(owner.pid)}' host={quoteattr(owner.host)} started='{float(owner.started):.2f}'{peer}/>"
    )


def parse_mark(xml: str) -> LabMark | None:
    """The mark in a domain's XML (or the bare element libvirt's metadata() returns)."""
    root = ET.fromstring(xml)
    # libvirt's metadata(LAB_NS) returns the element without its namespace.
    el = root if root.tag in ("lab", f"{{{LAB_NS}}}lab") else root.find(f"./metadata/{{{LAB_NS}}}lab")
    if el is None:
        return None
    try:
        owner = LabOwner(el.get("run", ""), int(el.get("pid", "0")), el.get("host", ""),
                         float(el.get("started", "0")))
        peer = el.get("peer-link")
        ids = tuple(int(x) for x in peer.split(",")) if peer else None
    except ValueError:
        owner, ids = LabOwner(""), None  # a mangled mark protects nothing we can prove
    return LabMark(el.get("image", ""), owner, ids if ids and len(ids) == 2 else None)  # type: ignore[arg-type]


def domain_mark(dom: libvirt.virDomain) -> LabMark | None:
    try:
        return parse_mark(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, LAB_NS, 0))
    except libvirt.libvirtError:
        return None


def check_owner(name: str, mark: LabMark | None, owner: LabOwner, reclaim: bool = False, what: str = "delete") -> None:
    """Raise :class:`NotOwnedError` unless ``owner`` made this domain (or may reclaim it)."""
    if mark is None:
        raise NotOwnedError(f"{name}: not created by 'symbiont lab' (no lab mark); leaving it alone")
    if mark.owner.run == owner.run:
        return
    state = mark.owner.state()
    if reclaim and state == "dead":
        log.warning("%s: reclaiming from %s, which is gone", name, mark.owner.describe())
        return
    hint = ("its owner is gone: add --reclaim (reclaim=True) to take it over" if state == "dead"
            else "use another prefix, or stop that run first")
    raise NotOwnedError(f"{name}: belongs to {mark.owner.describe()}, not to {owner.describe()}; "
                        f"refusing to {what} it ({hint})")


@dataclass(frozen=True)
class LabVm:
    name: str
    dir: Path
    overlay: Path
    channel: Path
    console_log: Path
    gpu_channel: Path  # org.symbiont.gpu.0: relayed by the daemon to its GPU endpoint (gpu part)


def lab_vm(cfg: Config, name: str) -> LabVm:
    d = Path(cfg.lab.vms_dir) / name
    return LabVm(
        name=name,
        dir=d,
        overlay=d / "overlay.qcow2",
        channel=Path(cfg.lab.channels_dir) / f"{name}.agent.sock",
        console_log=d / "console.log",
        gpu_channel=Path(cfg.lab.channels_dir) / f"{name}.gpu.sock",
    )


def tcg_features(dtype: str, tb_cache_mib: int, hotplug: bool = False) -> str:
    """TCG's translation-code cache size (libvirt 9.0: QEMU's ``tb-size``): under TCG QEMU
    otherwise keeps up to 1 GiB of translated code resident per VM (320 MiB measured for an
    idle 512 MiB guest). Nothing on the KVM path, nor with 0 (QEMU's default).

    Nor on a domain that can hot-plug vCPUs (``hotplug``): QEMU 7.2 splits the cache into
    regions when the machine starts, and with a 32 MiB cache a hot-plugged vCPU found none left
    and QEMU aborted (``tcg_region_initial_alloc__locked: assertion failed``, seen twice on
    this host); a domain whose vCPU count is fixed keeps the bound."""
    if dtype != "qemu" or tb_cache_mib <= 0 or hotplug:
        return ""
    return f"<tcg><tb-cache unit='MiB'>{int(tb_cache_mib)}</tb-cache></tcg>"


def domain_xml(
    cfg: Config,
    vm: LabVm,
    image: Image,
    memory_mib: int | None = None,
    vcpus: int | None = None,
    max_vcpus: int | None = None,
    nosharepages: bool = False,
    shared_memory: bool = False,
    tap_link: tuple[str, str] | None = None,
    owner: LabOwner | None = None,
    peer_link: tuple[int, int] | None = None,
) -> str:
    """The libvirt domain for one lab VM (``nosharepages``: guest RAM not mergeable by KSM,
    the only way the host can enforce a tenant's opt-out of page sharing; ``shared_memory``: guest
    RAM in a shared memfd, which a vhost-user backend must map to do a disk's I/O straight into it,
    and which KSM cannot merge).

    ``tap_link=(tap, mac)`` adds a virtio NIC on an existing tap device, which
    :mod:`symbiont_research.lab.peerlink` moves into a network namespace of the lab's own once QEMU
    has opened it (the migration part's network path between two guests).

    The ``<metadata>`` mark names ``owner`` (default: this process) and the peer link's ids,
    so that only the run that made the domain removes it, and ``lab down`` its link."""
    lab = cfg.lab
    owner = owner or LabOwner.this_process()
    dtype = resolve_domain_type(lab.domain_type)
    mem = memory_mib or lab.memory_mib
    cur = vcpus or lab.vcpus
    top = max(max_vcpus or lab.max_vcpus, cur)
    cmdline = image.info.get("cmdline", "root=/dev/vda rw console=ttyS0 quiet")
    # TCG has no host CPU to pass through: name a model it emulates.
    cpu = (
        "<cpu mode='host-passthrough'/>"
        if dtype == "kvm"
        else "<cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>"
    )
    return f"""<domain type='{dtype}'>
  <name>{escape(vm.name)}</name>
  <metadata>{mark_xml(image.recipe_digest, owner, peer_link)}</metadata>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  {_memory_backing(nosharepages, shared_memory)}
  <vcpu placement='static' current='{cur}'>{top}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><apic/>{tcg_features(dtype, lab.tcg_tb_cache_mib, hotplug=int(top) > int(cur))}</features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{escape(str(vm.overlay))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <log file='{escape(str(vm.console_log))}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='{escape(str(vm.channel))}'/>
      <target type='virtio' name='{escape(cfg.agent.channel_name)}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{escape(str(vm.gpu_channel))}'/>
      <target type='virtio' name='org.symbiont.gpu.0'/>
    </channel>
    <memballoon model='virtio'><stats period='{lab.balloon_period_s}'/></memballoon>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    {_tap_nic(*tap_link) if tap_link else ""}
  </devices>
</domain>
"""


def _memory_backing(nosharepages: bool, shared_memory: bool) -> str:
    inner = ("<nosharepages/>" if nosharepages else "") + (
        "<source type='memfd'/><access mode='shared'/>" if shared_memory else "")
    return f"<memoryBacking>{inner}</memoryBacking>" if inner else ""


def _tap_nic(tap: str, mac: str) -> str:
    if not re.fullmatch(r"[a-z0-9]{1,15}", tap) or not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
        raise LabError(f"tap_link: bad tap name {tap!r} or MAC {mac!r}")
    return f"""<interface type='ethernet'>
      <mac address='{mac}'/>
      <target dev='{tap}' managed='no'/>
      <model type='virtio'/>
    </interface>"""


def _qemu_owner() -> tuple[int, int] | None:
    """uid/gid QEMU runs as under libvirt on Debian (libvirt-qemu:kvm), if those exist."""
    try:
        return pwd.getpwnam("libvirt-qemu").pw_uid, grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None


def _prepare_dirs(cfg: Config) -> None:
    owner = _qemu_owner()
    for d in (cfg.lab.vms_dir, cfg.lab.channels_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    # QEMU (unprivileged) creates the channel socket; the daemon (root) connects to it.
    if owner:
        os.chown(cfg.lab.channels_dir, owner[0], owner[1])
    os.chmod(cfg.lab.channels_dir, 0o770)


def is_lab_domain(dom: libvirt.virDomain) -> bool:
    return domain_mark(dom) is not None


def create_vm(
    host: LibvirtHost, cfg: Config, image: Image, name: str, start: bool = True, **sizes: Any
) -> LabVm:
    """Make the overlay, define the domain and start it."""
    if host.exists(name):
        raise LabError(f"{name}: a domain of that name already exists")
    vm = lab_vm(cfg, name)
    _prepare_dirs(cfg)
    vm.dir.mkdir(parents=True, exist_ok=True)
    if vm.overlay.exists():
        vm.overlay.unlink()
    res = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.qcow2), str(vm.overlay)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise LabError(f"{name}: qemu-img create failed: {res.stderr.strip()}")
    owner = _qemu_owner()
    if owner:
        os.chown(vm.dir, owner[0], owner[1])
    if vm.channel.exists():
        vm.channel.unlink()
    xml = domain_xml(cfg, vm, image, **sizes)
    try:
        dom = host.conn.defineXML(xml)
        if start:
            dom.create()
    except libvirt.libvirtError as exc:
        raise LabError(f"{name}: libvirt refused the domain: {exc.get_error_message()}") from None
    return vm


def remove_vm(
    host: LibvirtHost, cfg: Config, name: str, owner: LabOwner | None = None, reclaim: bool = False
) -> bool:
    """Destroy and undefine a lab domain and delete its files; refuse non-lab domains and
    domains of another run (``owner``: default this process; see :func:`check_owner`)."""
    try:
        dom = host.conn.lookupByName(name)
    except libvirt.libvirtError:
        dom = None
    if dom is not None:
        check_owner(name, domain_mark(dom), owner or LabOwner.this_process(), reclaim)
        persistent = dom.isPersistent()  # a clone restored from a saved template is transient
        if dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                raise LabError(f"{name}: destroy failed: {exc.get_error_message()}") from None
        if persistent:
            dom.undefine()
    vm = lab_vm(cfg, name)
    existed = dom is not None or vm.dir.exists()
    shutil.rmtree(vm.dir, ignore_errors=True)
    if vm.channel.exists():
        vm.channel.unlink()
    return existed


def list_lab(host: LibvirtHost, cfg: Config) -> list[dict]:
    out = []
    for dom in host.conn.listAllDomains():
        mark = domain_mark(dom)
        if mark is None or not dom.name().startswith(cfg.lab.vm_prefix):
            continue
        info = host.info(dom.name())
        out.append(
            {
                "name": info.name,
                "state": info.state,
                "type": info.domain_type,
                "memory_mib": info.memory_kib // 1024,
                "max_memory_mib": info.max_memory_kib // 1024,
                "vcpus": info.vcpus,
                "max_vcpus": info.max_vcpus,
                "channel": host.channel_path(info.name, cfg.agent.channel_name),
                "owner": mark.owner.describe(),
                "owner_state": "ours" if mark.owner.run == f"lab:{cfg.lab.vm_prefix}" else mark.owner.state(),
            }
        )
    return sorted(out, key=lambda d: d["name"])


def lab_names(cfg: Config, count: int) -> list[str]:
    return [f"{cfg.lab.vm_prefix}{i}" for i in range(1, count + 1)]


def wait_for_agent(channel: Path, timeout: float = 180.0, tick: Callable[[], None] = lambda: None) -> dict:
    """Connect to a channel socket and wait for the agent's hello; return it.

    Used by ``lab up --wait`` and the boot benchmark, before the daemon owns the socket
    (QEMU's chardev accepts one client at a time).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tick()
        if not channel.exists():
            time.sleep(0.2)
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(channel))
        except OSError:
            s.close()
            time.sleep(0.2)
            continue
        reader = proto.FrameReader()
        reader.hunt()
        s.settimeout(1.0)
        try:
            s.sendall(proto.encode(proto.hello("host", "lab", [])))
            greeted = time.monotonic()
            while time.monotonic() < deadline:
                tick()
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    # Greet again now and then: the agent may have opened its port after us.
                    if time.monotonic() - greeted > 2.0:
                        s.sendall(proto.encode(proto.hello("host", "lab", [])))
                        greeted = time.monotonic()
                    continue
                if not data:
                    break
                for msg in reader.feed(data):
                    if msg.type == "hello" and msg.header.get("role") == "agent":
                        return msg.header
        except (OSError, proto.ProtocolError):
            pass
        finally:
            s.close()
        time.sleep(0.2)
    raise LabError(f"no agent hello on {channel} within {timeout:.0f} s")


def lab_peer_ids(prefix: str) -> tuple[int, int]:
    """The peer link ids of ``lab up --peer-link`` for a prefix: stable, so ``lab down`` and a
    second ``lab up`` find the same link; two prefixes that collide get a clear refusal."""
    import hashlib

    a = 1024 + int.from_bytes(hashlib.sha256(prefix.encode()).digest()[:4], "big") % (65534 - 1024)
    return a, a + 1


def lab_up(
    host: LibvirtHost,
    cfg: Config,
    image: Image,
    count: int,
    on_vm: Callable[[str], None] = lambda n: None,
    peer_link: bool = False,
    reclaim: bool = False,
) -> list[LabVm]:
    """Boot ``count`` VMs of the persistent lab (owner ``lab:<vm_prefix>``); reuse its own
    domains, refuse anyone else's. ``peer_link``: VMs 1 and 2 share a private L2 network in a
    namespace of their own (:mod:`symbiont_research.lab.peerlink`), as the migration network path needs."""
    from symbiont_research.lab.peerlink import PeerLink

    owner = LabOwner.persistent_lab(cfg.lab.vm_prefix)
    names = lab_names(cfg, count)
    link: PeerLink | None = None
    if peer_link:
        if count < 2:
            raise LabError("--peer-link needs at least 2 VMs")
        link = PeerLink(lab_peer_ids(cfg.lab.vm_prefix))
    existing = {}
    for name in names:
        if host.exists(name):
            mark = domain_mark(host.domain(name))
            check_owner(name, mark, owner, reclaim, what="reuse")
            existing[name] = mark
    if link is not None:
        linked = [n for n in names[:2] if n in existing and existing[n] and existing[n].peer_link == link.ids]
        if len(linked) == 2 and link.exists():
            link = None  # both VMs and their link are up from an earlier 'lab up --peer-link'
        elif any(n in existing for n in names[:2]):
            raise LabError(f"{', '.join(n for n in names[:2] if n in existing)}: already defined without "
                           "their peer link; 'symbiont lab down' first, then 'lab up --peer-link'")
        else:
            link.prepare()
    made = []
    try:
        for i, name in enumerate(names):
            if name in existing:
                dom = host.domain(name)
                if not dom.isActive():
                    dom.create()
                made.append(lab_vm(cfg, name))
            else:
                extra: dict[str, Any] = {}
                if link is not None and i < 2:
                    extra = {"tap_link": (link.tap(i), link.mac(i)), "peer_link": link.ids}
                made.append(create_vm(host, cfg, image, name, owner=owner, **extra))
            on_vm(name)
        if link is not None:
            link.attach()
    except BaseException:
        if link is not None:
            link.remove()
        raise
    return made


def lab_down(
    host: LibvirtHost, cfg: Config, owner: LabOwner | None = None, reclaim: bool = False
) -> tuple[list[str], list[str]]:
    """Remove the lab's VMs: lab-marked domains with this config's ``vm_prefix`` that
    ``owner`` (default: the persistent lab of that prefix) made, and their peer links.

    Returns (removed, kept): ``kept`` says, per domain of another run, whose it is."""
    from symbiont_research.lab.peerlink import PeerLink

    owner = owner or LabOwner.persistent_lab(cfg.lab.vm_prefix)
    removed, kept, links = [], [], set()
    for dom in host.conn.listAllDomains():
        mark = domain_mark(dom)
        if mark is None or not dom.name().startswith(cfg.lab.vm_prefix):
            continue
        try:
            check_owner(dom.name(), mark, owner, reclaim)
        except NotOwnedError as exc:
            kept.append(str(exc))
            continue
        remove_vm(host, cfg, dom.name(), owner, reclaim)
        removed.append(dom.name())
        if mark.peer_link:
            links.add(mark.peer_link)
    for ids in links:
        PeerLink(ids).remove()
    return sorted(removed), sorted(kept)


def parse_lab_mark(xml: str) -> bool:
    return parse_mark(xml) is not None


__all__ = [
    "LabError",
    "LabMark",
    "LabOwner",
    "LabVm",
    "NotOwnedError",
    "check_owner",
    "LibvirtError",
    "create_vm",
    "domain_xml",
    "lab_down",
    "lab_up",
    "list_lab",
    "remove_vm",
    "wait_for_agent",
]
