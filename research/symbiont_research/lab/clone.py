"""Lab VMs cloned from a saved, booted template: seeds/004's golden imaging extended to memory.

A cold boot under TCG costs ~20 s of a whole core; packing a hundred VMs onto this host that
way would take most of an hour. Instead one *template* VM boots once from the golden image and
settles: caches dropped and the guest's free memory zeroed, so the saved RAM is mostly zero
pages that the migration stream carries as a flag (and that a restore never makes resident).
It is saved with ``virDomainSave`` and its disk overlay frozen read-only. Each clone is then:

* a qcow2 overlay on the frozen template disk (copy-on-write: a clone's writes stay its own);
* the template's domain XML with the clone's name, uuid, MACs, channel socket paths, disk,
  console log and the lab's owner mark rewritten (:func:`clone_xml`);
* that XML written into the save image's header, then ``virDomainRestoreFlags(save, NULL,
  RUNNING|PAUSED)``: QEMU starts and loads the template's RAM. The guest agent in the clone
  is the template's, already running; it greets the host again when a client connects to the
  clone's (new) channel socket.

The template is cached under ``lab.cache_dir/clones/<key>``; the key is a digest of the golden
image's recipe digest (the agent's version is in the template's RAM, so an image change must
rebuild it), the memory size and what else shapes the saved machine (vCPUs, TCG cache, balloon
period, this module's version). Clones are defined (persistent) libvirt domains carrying the same
owner mark as any lab VM, so :func:`symbiont_research.lab.vms.remove_vm` and ``lab down`` remove them.

Why the XML is written into the save image's header rather than passed as ``dxml``: libvirt
9.0 checks a restore's ``dxml`` for ABI stability against the saved definition, and that check
includes the uuid and the name ("Target domain uuid ... does not match source", in libvirt.so's
messages), so ``dxml`` cannot make a second domain from one image. The header (libvirt's
``virQEMUSaveHeader``: magic, version, data_len, was_running, format, cookieOffset; then the XML,
the save cookie and zero padding within data_len, 64 KiB more than the XML it was saved with) is
the layout ``virsh save-image-define`` rewrites too (after its ABI check); here it is rewritten for
each clone (serialised by a lock: a restore reads it before QEMU reads the RAM stream after it)
and the restore is given no ``dxml``. Memory size, vCPUs and the device set stay the template's:
they are part of the template key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from symbiont.config import Config
from symbiont.host.libvirt_host import LibvirtHost
from symbiont_research.lab import vms
from symbiont_research.lab.image import Image

log = logging.getLogger(__name__)

CLONE_VERSION = 1  # bump when the template's preparation changes (the key changes with it)

# Run in the template over its serial console once it is up: wait for boot to finish, drop the
# page cache, then fault in (the guest kernel zeroes them) all free memory but a little and free
# it again, so that the saved RAM is mostly zero pages. ``dmesg -n 4`` leaves kernel errors (an
# OOM kill) on the console, where the clones' console logs show them.
SETTLE = (
    "systemctl is-system-running --wait >/dev/null 2>&1; sync; echo 3 > /proc/sys/vm/drop_caches; "
    "python3 -c \"import mmap;d={l.split(':')[0]:int(l.split()[1]) for l in open('/proc/meminfo')};"
    "n=max(0,d['MemFree']//1024-24)<<20;m=mmap.mmap(-1,n) if n else None;"
    "[m.__setitem__(i,0) for i in range(0,n,4096)];print('zeroed',n>>20)\"; "
    "echo 3 > /proc/sys/vm/drop_caches; dmesg -n 4; grep -E 'MemFree|MemAvailable' /proc/meminfo"
)


class CloneError(vms.LabError):
    """A template or clone operation failed; the message says which and why."""


# libvirt's virQEMUSaveHeader (src/qemu/qemu_saveimage.h): magic[16], version, data_len,
# was_running, format, cookieOffset, unused[14] — 92 bytes, host byte order (x86: little).
SAVE_HEADER = struct.Struct("<16sIIIII56s")
SAVE_MAGIC = b"LibvirtQemudSave"


def read_save_xml(path: Path) -> tuple[str, bytes]:
    """The domain XML and the save cookie in a libvirt save image's header."""
    with open(path, "rb") as fh:
        head = fh.read(SAVE_HEADER.size)
        if len(head) != SAVE_HEADER.size:
            raise CloneError(f"{path}: too short for a libvirt save image")
        magic, version, data_len, _running, _fmt, cookie_off, _ = SAVE_HEADER.unpack(head)
        if magic != SAVE_MAGIC or version != 2 or not 0 < data_len <= 16 << 20 or cookie_off > data_len:
            raise CloneError(f"{path}: not a complete libvirt save image (magic {magic!r}, version {version})")
        data = fh.read(data_len)
    if len(data) != data_len:
        raise CloneError(f"{path}: header data truncated")
    if not data.startswith(b"<domain"):  # the layout is not the one this code knows: touch nothing
        raise CloneError(f"{path}: no domain XML right after the {SAVE_HEADER.size}-byte header")
    xml_part = data[:cookie_off] if cookie_off else data
    cookie = data[cookie_off:].split(b"\0", 1)[0] if cookie_off else b""
    return xml_part.split(b"\0", 1)[0].decode(), cookie


def write_save_xml(path: Path, xml: str) -> None:
    """Replace the domain XML in a save image's header in place (the cookie kept, the rest of
    ``data_len`` zeroed); the RAM stream after it is not touched."""
    _, cookie = read_save_xml(path)
    with open(path, "r+b") as fh:
        magic, version, data_len, running, fmt, cookie_off, unused = SAVE_HEADER.unpack(fh.read(SAVE_HEADER.size))
        body = xml.encode() + b"\0"
        new_off = 0
        if cookie_off:
            new_off = len(body)
            body += cookie + b"\0"
        if len(body) > data_len:
            raise CloneError(f"{path}: the clone's XML ({len(body)} bytes) does not fit the header's {data_len}")
        fh.seek(0)
        fh.write(SAVE_HEADER.pack(magic, version, data_len, running, fmt, new_off, unused))
        fh.write(body + b"\0" * (data_len - len(body)))


@dataclass(frozen=True)
class Template:
    """A saved, settled lab VM that clones restore from."""

    key: str
    dir: Path
    memory_mib: int
    image_digest: str

    @property
    def save(self) -> Path:
        return self.dir / "state.save"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def record(self) -> Path:
        return self.dir / "template.json"

    @property
    def xml(self) -> Path:
        return self.dir / "domain.xml"  # the XML as saved: every clone's starts from it

    def ready(self) -> bool:
        return all(p.exists() for p in (self.record, self.save, self.disk, self.xml))

    def info(self) -> dict[str, Any]:
        return json.loads(self.record.read_text()) if self.record.exists() else {}


def template_key(cfg: Config, image: Image, memory_mib: int) -> str:
    """What the saved machine depends on: any change makes a new template."""
    fields = {"image": image.recipe_digest, "memory_mib": int(memory_mib), "vcpus": 1,
              "domain_type": vms.resolve_domain_type(cfg.lab.domain_type),
              "tb_cache_mib": cfg.lab.tcg_tb_cache_mib, "balloon_period_s": cfg.lab.balloon_period_s,
              "channel": cfg.agent.channel_name, "version": CLONE_VERSION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def template_for(cfg: Config, image: Image, memory_mib: int) -> Template:
    key = template_key(cfg, image, memory_mib)
    return Template(key, Path(cfg.lab.cache_dir) / "clones" / key, int(memory_mib), image.recipe_digest)


def _rss_mib(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def build_template(
    host: LibvirtHost,
    cfg: Config,
    image: Image,
    memory_mib: int = 512,
    force: bool = False,
    step: Callable[[str], None] = lambda s: None,
) -> Template:
    """Boot, settle and save the template for (image, memory) unless a saved one is cached.

    One builder at a time per template (a file lock); a second waits and reuses the result."""
    from symbiont_research.lab.console import guest_exec

    tpl = template_for(cfg, image, memory_mib)
    if tpl.ready() and not force:
        return tpl
    tpl.dir.mkdir(parents=True, exist_ok=True)
    with open(tpl.dir.parent / f".{tpl.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tpl.ready() and not force:
            return tpl
        for p in (tpl.record, tpl.save, tpl.disk, tpl.xml):
            with contextlib.suppress(FileNotFoundError):
                p.chmod(0o644)
                p.unlink()
        name = f"{cfg.lab.vm_prefix}template-{tpl.key[:8]}"
        owner = vms.LabOwner.new_run(f"template-{tpl.key[:8]}")
        if host.exists(name):  # a crashed build's: ours by name, reclaim it if its owner is gone
            vms.remove_vm(host, cfg, name, owner, reclaim=True)
        t0 = time.monotonic()
        step(f"template: booting {name} ({memory_mib} MiB) from image {image.recipe_digest}")
        vm = vms.create_vm(host, cfg, image, name, owner=owner, memory_mib=memory_mib, vcpus=1, max_vcpus=1)
        try:
            hello = vms.wait_for_agent(vm.channel, timeout=300)
            boot_s = time.monotonic() - t0
            step(f"template: agent {hello.get('version', '?')} up after {boot_s:.1f} s; settling")
            t1 = time.monotonic()
            res = guest_exec(host, name, SETTLE, timeout=300)
            if res.rc != 0:
                raise CloneError(f"{name}: settling failed (exit {res.rc}): {res.output[-300:]}")
            settle_s = time.monotonic() - t1
            dom = host.domain(name)
            rss_before = _rss_mib(host.qemu_pid(name))
            t2 = time.monotonic()
            try:
                dom.save(str(tpl.save))
            except libvirt.libvirtError as exc:
                raise CloneError(f"{name}: virDomainSave failed: {exc.get_error_message()}") from None
            save_s = time.monotonic() - t2
            shutil.move(str(vm.overlay), str(tpl.disk))
            tpl.disk.chmod(0o444)  # frozen: every clone's overlay is backed by it
            tpl.xml.write_text(read_save_xml(tpl.save)[0])
            record = {"key": tpl.key, "image": image.recipe_digest, "memory_mib": memory_mib,
                      "agent_version": hello.get("version"), "boot_s": round(boot_s, 2),
                      "settle_s": round(settle_s, 2), "save_s": round(save_s, 2),
                      "save_mib": round(tpl.save.stat().st_size / 2**20, 1),
                      "rss_before_save_mib": rss_before, "settle_output": res.output.strip()[-400:],
                      "created": time.time()}
            tmp = tpl.record.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(tpl.record)
            step(f"template: saved {record['save_mib']} MiB in {save_s:.1f} s")
        finally:
            vms.remove_vm(host, cfg, name, owner)
    return tpl


def remove_template(tpl: Template) -> None:
    """Delete a cached template (its clones must be gone: their overlays are backed by it)."""
    shutil.rmtree(tpl.dir, ignore_errors=True)


def _mac_for(seed: str, index: int) -> str:
    h = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def clone_xml(
    template_xml: str,
    name: str,
    uuid: str,
    disk: Path,
    channels: dict[str, Path],
    console_log: Path,
    mark: str,
) -> str:
    """The template's domain XML made into a clone's: name, uuid, every NIC's MAC (derived from
    the uuid), the unix channel sockets (by target name), the first disk's file (its backing
    chain left to libvirt to probe from the overlay), the serial console's log, the lab's owner
    mark. pty paths are dropped (libvirt allocates new ones). Nothing the guest sees as
    hardware changes: libvirt checks that (ABI stability) at restore."""
    root = ET.fromstring(template_xml)
    if root.tag != "domain":
        raise CloneError("template XML: not a <domain>")

    def one(path: str) -> ET.Element:
        el = root.find(path)
        if el is None:
            raise CloneError(f"template XML: no {path}")
        return el

    one("./name").text = name
    uel = root.find("./uuid")
    if uel is None:
        uel = ET.Element("uuid")
        root.insert(list(root).index(one("./name")) + 1, uel)
    uel.text = str(uuidlib.UUID(uuid))
    meta = root.find("./metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in list(meta):
        if old.tag == f"{{{vms.LAB_NS}}}lab" or old.tag.endswith("}lab") or old.tag == "lab":
            meta.remove(old)
    meta.append(ET.fromstring(mark))
    devices = one("./devices")
    disks = [d for d in devices.iterfind("disk") if d.get("device", "disk") == "disk"]
    if not disks:
        raise CloneError("template XML: no disk")
    src = disks[0].find("source")
    if src is None:
        raise CloneError("template XML: the disk has no <source>")
    src.attrib.clear()
    src.set("file", str(disk))
    for child in list(src):
        src.remove(child)
    for bs in disks[0].findall("backingStore"):
        disks[0].remove(bs)
    seen: set[str] = set()
    for ch in devices.iterfind("channel"):
        target, source = ch.find("target"), ch.find("source")
        tname = target.get("name") if target is not None else None
        if ch.get("type") != "unix" or source is None or tname is None:
            continue
        if tname not in channels:
            raise CloneError(f"template XML: no socket path given for channel {tname!r}")
        source.set("path", str(channels[tname]))
        seen.add(tname)
    if missing := set(channels) - seen:
        raise CloneError(f"template XML: no channel {', '.join(sorted(missing))}")
    for tag in ("serial", "console"):
        for dev in devices.iterfind(tag):
            if dev.get("type") == "pty":
                for s in dev.findall("source"):
                    dev.remove(s)
                dev.attrib.pop("tty", None)
            logel = dev.find("log")
            if logel is not None:
                logel.set("file", str(console_log))
    for i, nic in enumerate(devices.iterfind("interface")):
        mac = nic.find("mac")
        if mac is None:
            mac = ET.SubElement(nic, "mac")
        mac.set("address", _mac_for(uuid, i))
    ET.register_namespace("lab", vms.LAB_NS)
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class Clone:
    vm: vms.LabVm
    uuid: str
    restore_s: float  # the restore call (overlay and XML excluded)
    total_s: float  # overlay + XML + restore
    rss_mib: float | None  # the clone's QEMU right after restore


def restore_clone(
    host: LibvirtHost,
    cfg: Config,
    tpl: Template,
    name: str,
    owner: vms.LabOwner | None = None,
    paused: bool = False,
) -> Clone:
    """One clone of ``tpl`` named ``name``: its overlay, its XML, the restore."""
    if not tpl.ready():
        raise CloneError(f"template {tpl.key} is not built (build_template first)")
    if host.exists(name):
        raise CloneError(f"{name}: a domain of that name already exists")
    t0 = time.monotonic()
    vm = vms.lab_vm(cfg, name)
    vms._prepare_dirs(cfg)
    vm.dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        vm.overlay.unlink()
    res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(tpl.disk),
                          str(vm.overlay)], capture_output=True, text=True)
    if res.returncode != 0:
        raise CloneError(f"{name}: qemu-img create failed: {res.stderr.strip()}")
    qowner = vms._qemu_owner()
    if qowner:
        os.chown(vm.dir, qowner[0], qowner[1])
    for sock in (vm.channel, vm.gpu_channel):
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    uid = str(uuidlib.uuid4())
    xml = clone_xml(
        tpl.xml.read_text(), name, uid, vm.overlay,
        {cfg.agent.channel_name: vm.channel, "org.symbiont.gpu.0": vm.gpu_channel},
        vm.console_log, vms.mark_xml(tpl.image_digest, owner or vms.LabOwner.this_process()),
    )
    flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
    with open(tpl.dir / "restore.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the header holds one clone's XML at a time
        t1 = time.monotonic()
        try:
            write_save_xml(tpl.save, xml)
            host.conn.restoreFlags(str(tpl.save), None, flags)
            # Persistent, like every lab VM: libvirt answers config-scope queries (max vCPUs,
            # which the daemon reads) only for a domain that has a persistent definition.
            dom = host.conn.lookupByName(name)
            try:
                host.conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
            except libvirt.libvirtError:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()  # transient: gone with it
                raise
        except (libvirt.libvirtError, CloneError) as exc:
            shutil.rmtree(vm.dir, ignore_errors=True)
            msg = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
            raise CloneError(f"{name}: restore from {tpl.save} failed: {msg}") from None
    done = time.monotonic()
    return Clone(vm, uid, done - t1, done - t0, _rss_mib(host.qemu_pid(name)))


def remove_clone(host: LibvirtHost, cfg: Config, name: str, owner: vms.LabOwner | None = None) -> bool:
    """Destroy and undefine a clone and delete its overlay, log and sockets; refuse a domain of another run (:func:`symbiont_research.lab.vms.check_owner`)."""
    existed = vms.remove_vm(host, cfg, name, owner)
    vm = vms.lab_vm(cfg, name)
    with contextlib.suppress(FileNotFoundError):
        vm.gpu_channel.unlink()
    return existed


__all__ = ["Clone", "CloneError", "Template", "build_template", "clone_xml", "remove_clone", "remove_template",
           "read_save_xml", "restore_clone", "template_for", "template_key", "write_save_xml"]
