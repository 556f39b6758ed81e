"""Thin, typed adapter over libvirt-python: the balloon, vCPUs, domain facts.

Also starts ``virtlogd``/``libvirtd`` when they are not running (a host without systemd as
PID 1), and remembers that it did, so that only what we started is stopped.
"""

from __future__ import annotations

import grp
import logging
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from symbiont.host.port import DomainInfo, HostError

log = logging.getLogger(__name__)

LIBVIRT_SOCK = Path("/var/run/libvirt/libvirt-sock")
STARTED_MARK = Path("/run/symbiont/started-daemons")

# libvirt's virDomainState names.
STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


class LibvirtError(HostError):
    """A libvirt operation failed; the message says which and why."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _running(name: str) -> bool:
    res = subprocess.run(["pgrep", "-x", name], capture_output=True)
    return res.returncode == 0


def fix_kvm_device_group() -> bool:
    """Give /dev/kvm Debian's udev ownership (root:kvm 0660) where udev did not run.

    Without it libvirt's QEMU capability cache says "kvm" (probed as root) while QEMU's user
    cannot open /dev/kvm, so libvirt judges the cache stale and re-probes QEMU — a minute
    under TCG — on every domain definition. Returns True when it changed something.
    """
    dev = Path("/dev/kvm")
    try:
        st = dev.stat()
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return False
    if st.st_gid == kvm_gid and st.st_mode & 0o060 == 0o060:
        return False
    os.chown(dev, 0, kvm_gid)
    os.chmod(dev, 0o660)
    log.info("set /dev/kvm to root:kvm 0660 (as Debian's udev rule does)")
    return True


def ensure_libvirtd(timeout: float = 20.0) -> list[str]:
    """Start virtlogd and libvirtd when they are absent; return the names started."""
    fix_kvm_device_group()
    started: list[str] = []
    for name, path in (("virtlogd", "/usr/sbin/virtlogd"), ("libvirtd", "/usr/sbin/libvirtd")):
        if _running(name):
            continue
        if not Path(path).exists() and shutil.which(name) is None:
            raise LibvirtError(f"{name} is not installed (apt-get install libvirt-daemon-system)")
        log.info("starting %s -d", name)
        subprocess.run([path, "-d"], check=True)
        started.append(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if LIBVIRT_SOCK.exists():
            try:
                libvirt.open("qemu:///system").close()
                break
            except libvirt.libvirtError:
                pass
        time.sleep(0.2)
    else:
        raise LibvirtError(f"libvirtd did not come up within {timeout:.0f} s")
    if started:
        STARTED_MARK.parent.mkdir(parents=True, exist_ok=True)
        prev = set(STARTED_MARK.read_text().split()) if STARTED_MARK.exists() else set()
        STARTED_MARK.write_text("\n".join(sorted(prev | set(started))) + "\n")
    return started


def stop_started_libvirtd(timeout: float = 15.0) -> list[str]:
    """Stop the daemons :func:`ensure_libvirtd` started (and nothing else), and wait until they exited."""
    if not STARTED_MARK.exists():
        return []
    names = STARTED_MARK.read_text().split()
    for name in ("libvirtd", "virtlogd"):
        if name in names:
            subprocess.run(["pkill", "-x", name], check=False)
            # Wait for the exit: a caller that runs next (the README's demo after a test run)
            # found the dying libvirtd still there, started none, and timed out on its socket.
            deadline = time.monotonic() + timeout
            while _running(name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _running(name):
                subprocess.run(["pkill", "-KILL", "-x", name], check=False)
    STARTED_MARK.unlink()
    return names


def cpu_has_hw_virt() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M)) and Path("/dev/kvm").exists()


def resolve_domain_type(configured: str) -> str:
    """``auto`` → ``kvm`` where the CPU has vmx/svm and /dev/kvm exists, else ``qemu`` (TCG)."""
    if configured == "auto":
        return "kvm" if cpu_has_hw_virt() else "qemu"
    return configured


class LibvirtHost:
    """One libvirt connection with the few calls the daemon needs."""

    def __init__(self, uri: str = "qemu:///system") -> None:
        self.uri = uri
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"cannot connect to {uri}: {exc}") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"no domain {name!r}: {exc.get_error_message()}") from None

    def exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
            return True
        except libvirt.libvirtError:
            return False

    def list_names(self, prefix: str = "") -> list[str]:
        return sorted(d.name() for d in self.conn.listAllDomains() if d.name().startswith(prefix))

    def info(self, name: str) -> DomainInfo:
        dom = self.domain(name)
        state, max_kib, mem_kib, vcpus, _cpu_time = dom.info()
        running = state == libvirt.VIR_DOMAIN_RUNNING
        max_vcpus = dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        live_vcpus = dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) if running else vcpus
        root = ET.fromstring(dom.XMLDesc(0))
        return DomainInfo(
            name=name,
            uuid=dom.UUIDString(),
            state=STATE_NAMES.get(state, str(state)),
            memory_kib=mem_kib,
            max_memory_kib=max_kib,
            vcpus=live_vcpus,
            max_vcpus=max_vcpus,
            domain_type=root.get("type", ""),
        )

    def memory_stats(self, name: str) -> dict[str, int]:
        """virDomainMemoryStats: ``actual``, ``available``, ``unused``, ``rss``, ... (KiB)."""
        dom = self.domain(name)
        if not dom.isActive():
            return {}
        try:
            return {k: int(v) for k, v in dom.memoryStats().items()}
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"{name}: memoryStats failed: {exc.get_error_message()}") from None

    def set_balloon(self, name: str, kib: int) -> None:
        dom = self.domain(name)
        try:
            dom.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"{name}: balloon to {kib} KiB failed: {exc.get_error_message()}") from None

    def set_vcpus(self, name: str, count: int) -> None:
        dom = self.domain(name)
        try:
            dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"{name}: setting {count} vCPUs failed: {exc.get_error_message()}") from None

    def channel_path(self, name: str, target: str) -> str | None:
        """Host path of the unix socket behind the virtio-serial channel ``target``."""
        root = ET.fromstring(self.domain(name).XMLDesc(0))
        for ch in root.iterfind("./devices/channel"):
            t = ch.find("target")
            s = ch.find("source")
            if ch.get("type") == "unix" and t is not None and t.get("name") == target and s is not None:
                return s.get("path")
        return None

    # -- a shared-memory region per VM (the migration relay's shm channel) -----------------------
    def attach_shmem(self, name: str, region: str, size_bytes: int) -> str:
        """Hot-plug an ivshmem-plain device backed by ``/dev/shm/<region>`` (QEMU creates the
        file) into the running domain; its guest PCI address (``0000:00:06.0``)."""
        _check_region(region, size_bytes)
        dom = self.domain(name)
        xml = (f"<shmem name='{region}'><model type='ivshmem-plain'/>"
               f"<size unit='B'>{size_bytes}</size></shmem>")  # fmt: skip
        try:
            dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"{name}: libvirt refused to attach the region {region}: "
                               f"{exc.get_error_message()}") from None  # fmt: skip
        addr = self.shmem_address(name, region)
        if addr is None:
            raise LibvirtError(f"{name}: the region {region} is attached but has no PCI address")
        return addr

    def shmem_address(self, name: str, region: str) -> str | None:
        """The guest PCI address of the domain's ``<shmem name=region>``; None: not attached."""
        root = ET.fromstring(self.domain(name).XMLDesc(0))
        for sh in root.iterfind("./devices/shmem"):
            a = sh.find("address")
            if sh.get("name") == region and a is not None and a.get("type") == "pci":
                d, b, sl, f = (int(a.get(k, "0"), 16) for k in ("domain", "bus", "slot", "function"))
                return f"{d:04x}:{b:02x}:{sl:02x}.{f:x}"
        return None

    def detach_shmem(self, name: str, region: str, wait_s: float = 30.0) -> bool:
        """Unplug the region's device and wait until it is gone from the domain; False: the
        domain or the device was not there. The unplug is an ACPI request the guest answers
        (0.07 s for an idle TCG guest, seconds for a busy one; libvirt itself waits 5 s and then
        reports success while the removal is still pending): a guest that never lets go is an
        error, and the caller keeps the region on its books."""
        if not self.exists(name):
            return False
        # libvirt finds the device by name, model and size: hand it the live definition itself
        root = ET.fromstring(self.domain(name).XMLDesc(0))
        found = [sh for sh in root.iterfind("./devices/shmem") if sh.get("name") == region]
        if not found:
            return False
        xml = ET.tostring(found[0], encoding="unicode")
        try:
            self.domain(name).detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"{name}: libvirt refused to detach the region {region}: "
                               f"{exc.get_error_message()}") from None  # fmt: skip
        deadline = time.monotonic() + wait_s
        while self.exists(name) and self.shmem_address(name, region) is not None:
            if time.monotonic() > deadline:
                raise LibvirtError(f"{name}: the region {region} is still plugged in {wait_s:.0f} s after the "
                                   "unplug request (the guest has not released it)")  # fmt: skip
            time.sleep(0.1)
        return True

    def qemu_pid(self, name: str) -> int | None:
        # A second libvirtd (host/libvirt_instance.py) has its /run/libvirt at <socket dir>/run.
        sock = re.search(r"[?&]socket=([^&]+)", self.uri)
        run = Path(sock.group(1)).parent / "run" if sock else Path("/run/libvirt")
        pidfile = run / "qemu" / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None


SHM_DIR = "/dev/shm"
REGION_RE = re.compile(r"^symbiont-mig-[a-z0-9][a-z0-9-]{0,79}$")


def _check_region(region: str, size_bytes: int | None = None) -> None:
    if not REGION_RE.match(region):
        raise HostError(f"region name {region!r} must match {REGION_RE.pattern}")
    if size_bytes is not None and (size_bytes < 1 << 20 or size_bytes > 1 << 30 or size_bytes & (size_bytes - 1)):
        raise HostError(f"region size {size_bytes}: a power of two between 1 MiB and 1 GiB")


def open_shmem(region: str, size_bytes: int) -> mmap.mmap:
    """The host side of a region QEMU created under /dev/shm, mapped read-write (shared)."""
    _check_region(region, size_bytes)
    path = os.path.join(SHM_DIR, region)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise HostError(f"region {region}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_size != size_bytes or not stat.S_ISREG(st.st_mode):
            raise HostError(f"region {region}: {st.st_size} bytes, expected a {size_bytes}-byte file")
        return mmap.mmap(fd, size_bytes)
    finally:
        os.close(fd)


def remove_shmem(region: str) -> bool:
    """Remove a region's file (a mapping that still holds it keeps its pages till it goes)."""
    _check_region(region)
    try:
        os.unlink(os.path.join(SHM_DIR, region))
        return True
    except FileNotFoundError:
        return False


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
