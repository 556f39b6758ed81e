"""Lab VMs through libvirt-python: define, start, list and remove what ``lab up`` made.

Each VM boots the golden image's kernel directly, from its own qcow2 overlay (the golden
image is never written). The domain carries a ``<metadata>`` mark so that ``lab down``
removes exactly the domains ``lab up`` created, and nothing else on the host.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt

from symbiont.config import Config
from symbiont.host.libvirt_host import LibvirtError, LibvirtHost, resolve_domain_type
from symbiont.lab.image import Image
from symbiont_agent import protocol as proto

log = logging.getLogger(__name__)

LAB_NS = "https://symbiont.dev/xmlns/lab/1"  # an XML namespace name, never fetched


class LabError(Exception):
    """A lab operation failed; the message says which VM and why."""


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


def domain_xml(
    cfg: Config,
    vm: LabVm,
    image: Image,
    memory_mib: int | None = None,
    vcpus: int | None = None,
    max_vcpus: int | None = None,
    nosharepages: bool = False,
    tap_link: tuple[str, str] | None = None,
) -> str:
    """The libvirt domain for one lab VM (``nosharepages``: guest RAM not mergeable by KSM,
    the only way the host can enforce a tenant's opt-out of page sharing).

    ``tap_link=(tap, mac)`` adds a virtio NIC on an existing tap device, which
    :mod:`symbiont.lab.peerlink` moves into a network namespace of the lab's own once QEMU
    has opened it (the migration part's network path between two guests)."""
    lab = cfg.lab
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
  <metadata><lab:lab xmlns:lab='{LAB_NS}' image='{escape(image.recipe_digest)}'/></metadata>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  {"<memoryBacking><nosharepages/></memoryBacking>" if nosharepages else ""}
  <vcpu placement='static' current='{cur}'>{top}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
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
    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, LAB_NS, 0)
        return True
    except libvirt.libvirtError:
        return False


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


def remove_vm(host: LibvirtHost, cfg: Config, name: str) -> bool:
    """Destroy and undefine a lab domain and delete its files; refuse non-lab domains."""
    try:
        dom = host.conn.lookupByName(name)
    except libvirt.libvirtError:
        dom = None
    if dom is not None:
        if not is_lab_domain(dom):
            raise LabError(f"{name}: not created by 'symbiont lab up'; leaving it alone")
        if dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                raise LabError(f"{name}: destroy failed: {exc.get_error_message()}") from None
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
        if not is_lab_domain(dom) or not dom.name().startswith(cfg.lab.vm_prefix):
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


def lab_up(
    host: LibvirtHost, cfg: Config, image: Image, count: int, on_vm: Callable[[str], None] = lambda n: None
) -> list[LabVm]:
    made = []
    for name in lab_names(cfg, count):
        if host.exists(name):
            dom = host.domain(name)
            if not is_lab_domain(dom):
                raise LabError(f"{name}: exists and was not made by 'symbiont lab up'")
            if not dom.isActive():
                dom.create()
            made.append(lab_vm(cfg, name))
        else:
            made.append(create_vm(host, cfg, image, name))
        on_vm(name)
    return made


def lab_down(host: LibvirtHost, cfg: Config) -> list[str]:
    """Remove the lab's VMs: lab-marked domains with this config's ``vm_prefix``, only."""
    removed = []
    for dom in host.conn.listAllDomains():
        if is_lab_domain(dom) and dom.name().startswith(cfg.lab.vm_prefix):
            remove_vm(host, cfg, dom.name())
            removed.append(dom.name())
    return sorted(removed)


def parse_lab_mark(xml: str) -> bool:
    root = ET.fromstring(xml)
    return root.find(f"./metadata/{{{LAB_NS}}}lab") is not None


__all__ = [
    "LabError",
    "LabVm",
    "LibvirtError",
    "create_vm",
    "domain_xml",
    "lab_down",
    "lab_up",
    "list_lab",
    "remove_vm",
    "wait_for_agent",
]
