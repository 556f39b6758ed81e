"""The real :class:`symbiont.host.port.HostPort`: libvirt (reopened on demand), QMP through
libvirt's monitor passthrough, the QEMU cgroup through libvirt's schedinfo/memtune, psutil and
/proc, KSM's sysfs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt
import psutil

from symbiont.host import ksm, nbddisk, procmem, tapwatch, vhostdisk, zram
from symbiont.host import libvirt_host as shmem
from symbiont.host import pageout as po
from symbiont.host.ksm import KSM_DIR, RUN_MERGE, Ksm, KsmdCpu, KsmStats
from symbiont.host.ksm import process_merging_pages as _merging_pages
from symbiont.host.libvirt_host import LibvirtError, LibvirtHost
from symbiont.host.port import DomainInfo, HostError
from symbiont.host.procstats import ProcessCpu
from symbiont.host.procstats import host_sample as _host_sample

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def quiet_libvirt_errors() -> None:
    """libvirt prints every error to stderr by default; the daemon reports its own."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class SystemHost:
    """The host as it is. The libvirt connection is (re)opened on demand."""

    def __init__(self, libvirt_uri: str = "qemu:///system") -> None:
        self.uri = libvirt_uri
        self._libvirt: LibvirtHost | None = None
        self._lock = threading.Lock()
        self._proc_cpu = ProcessCpu()
        self._ksm = Ksm()
        self._ksmd: KsmdCpu | None = None  # found on first use (walks /proc)
        self._taps: tapwatch.TapWatcher | None = None  # started on the first watch
        self._mergeable: dict[int, tuple[int, int, float]] = {}  # host_mergeable_pages' per-process figures

    # -- the connection ---------------------------------------------------------------------
    @property
    def libvirt(self) -> LibvirtHost:
        """The connection, reopened when it died; raises :class:`HostError` when libvirt is down."""
        with self._lock:
            if self._libvirt is not None:
                try:
                    if self._libvirt.conn.isAlive():
                        return self._libvirt
                except libvirt.libvirtError:
                    pass
                self._libvirt.close()
                self._libvirt = None
            self._libvirt = LibvirtHost(self.uri)  # raises LibvirtError (a HostError)
            return self._libvirt

    def close(self) -> None:
        if self._taps is not None:
            self._taps.close()
            self._taps = None
        with self._lock:
            if self._libvirt is not None:
                self._libvirt.close()
                self._libvirt = None

    # -- libvirt ----------------------------------------------------------------------------
    def info(self, vm: str) -> DomainInfo:
        return self.libvirt.info(vm)

    def exists(self, vm: str) -> bool:
        return self.libvirt.exists(vm)

    def memory_stats(self, vm: str) -> dict[str, int]:
        return self.libvirt.memory_stats(vm)

    def set_balloon(self, vm: str, kib: int) -> None:
        self.libvirt.set_balloon(vm, kib)

    def set_vcpus(self, vm: str, count: int) -> None:
        self.libvirt.set_vcpus(vm, count)

    def channel_path(self, vm: str, target: str) -> str | None:
        return self.libvirt.channel_path(vm, target)

    # -- the QEMU process -------------------------------------------------------------------
    def qemu_pid(self, vm: str) -> int | None:
        return self.libvirt.qemu_pid(vm)

    def qmp(self, vm: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command through libvirt's monitor passthrough; returns its ``return``."""
        import libvirt_qemu

        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuMonitorCommand(self.libvirt.domain(vm), json.dumps(msg), 0)
        except libvirt.libvirtError as exc:
            raise HostError(f"{vm}: QMP {command} failed: {exc.get_error_message()}") from None
        try:
            out = json.loads(reply)
        except ValueError:
            raise HostError(f"{vm}: QMP {command} answered no JSON") from None
        if "error" in out:
            raise HostError(f"{vm}: QMP {command}: {out['error'].get('desc', out['error'])}")
        return out.get("return")

    def _params(self, vm: str, what: str, getter: str) -> dict[str, int]:
        dom = self.libvirt.domain(vm)
        try:
            got = getattr(dom, getter)(libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise HostError(f"{vm}: reading {what} failed: {exc.get_error_message()}") from None
        return {k: int(v) for k, v in got.items() if isinstance(v, (int, float))}

    def _set_params(self, vm: str, what: str, setter: str, params: dict[str, int]) -> None:
        dom = self.libvirt.domain(vm)
        try:
            getattr(dom, setter)(params, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise HostError(f"{vm}: setting {what} {params} failed: {exc.get_error_message()}") from None

    def schedinfo(self, vm: str) -> dict[str, int]:
        """The QEMU cgroup's CPU values (cpu_shares, vcpu_quota, ...), cgroup v1 or v2 alike."""
        return self._params(vm, "schedinfo", "schedulerParametersFlags")

    def set_schedinfo(self, vm: str, params: dict[str, int]) -> None:
        self._set_params(vm, "schedinfo", "setSchedulerParametersFlags", params)

    def memtune(self, vm: str) -> dict[str, int]:
        """The QEMU cgroup's memory limits (hard_limit, soft_limit, swap_hard_limit; KiB)."""
        return self._params(vm, "memtune", "memoryParameters")

    def set_memtune(self, vm: str, params: dict[str, int]) -> None:
        self._set_params(vm, "memtune", "setMemoryParameters", params)

    def _cgroup_file(self, path: str) -> Path:
        p = Path(path)
        if not p.is_absolute() or ".." in p.parts or not str(p).startswith(str(CGROUP_ROOT) + "/"):
            raise HostError(f"{path}: not a file under {CGROUP_ROOT}")
        return p

    def read_cgroup(self, path: str) -> str:
        try:
            return self._cgroup_file(path).read_text().strip()
        except OSError as exc:
            raise HostError(f"{path}: {exc.strerror}") from None

    def write_cgroup(self, path: str, value: str) -> None:
        try:
            self._cgroup_file(path).write_text(value)
        except OSError as exc:
            raise HostError(f"{path}: writing {value!r} failed: {exc.strerror}") from None

    # -- processes and the host --------------------------------------------------------------
    def host_sample(self) -> dict[str, Any]:
        return _host_sample()

    def mem_total_bytes(self) -> int:
        return int(psutil.virtual_memory().total)

    def process_cpu_percent(self, pid: int | None) -> float | None:
        return self._proc_cpu.percent(pid)

    def process_rss(self, pid: int | None) -> int | None:
        return self._proc_cpu.rss(pid)

    def process_cpu_seconds(self, pid: int | None) -> float | None:
        """CPU seconds (user + system, all threads) a process has used; None if it is gone."""
        if not pid:
            return None
        try:
            t = psutil.Process(pid).cpu_times()
        except (psutil.Error, OSError):
            return None
        return t.user + t.system

    def process_merging_pages(self, pid: int) -> int | None:
        return _merging_pages(pid)

    def ksm_running(self) -> bool:
        try:
            return int((KSM_DIR / "run").read_text().strip()) == RUN_MERGE
        except (OSError, ValueError):
            return False

    # -- KSM and the QEMU processes' memory (the dedup part) --------------------------------------
    def ksm_available(self) -> bool:
        return self._ksm.available()

    def ksm_has(self, name: str) -> bool:
        return self._ksm.has(name)

    def ksm_read(self, name: str) -> int | str:
        return self._ksm.read(name)

    def ksm_write(self, name: str, value: int | str) -> None:
        self._ksm.write(name, value)

    def ksm_settings(self) -> dict[str, int | str]:
        return self._ksm.settings()

    def ksm_stats(self) -> KsmStats:
        return self._ksm.stats()

    def ksmd_cpu_seconds(self) -> float | None:
        if self._ksmd is None:
            self._ksmd = KsmdCpu()
        return self._ksmd.seconds()

    def process_ksm_stat(self, pid: int) -> dict[str, int | bool] | None:
        return ksm.process_ksm_stat(pid)

    def guest_ram(self, pid: int, ram_bytes: int | None) -> dict[str, Any] | None:
        m = procmem.find_guest_ram(procmem.read_smaps(pid), ram_bytes)
        return None if m is None else {"start": m.start, "end": m.end, "mergeable": m.mergeable}

    def resident_bytes(self, pid: int, start: int, end: int) -> int:
        return procmem.resident_bytes(pid, start, end)

    def host_mergeable_pages(self) -> int:
        return procmem.host_mergeable_pages(cache=self._mergeable)

    def meminfo_kib(self) -> dict[str, int]:
        return ksm.meminfo_kib()

    def qemu_committed_kib(self) -> int:
        return ksm.qemu_committed_kib()


    # -- ssdcache: the elastic disk --------------------------------------------------------
    def _device(self, vm: str, xml: str, attach: bool, persist: bool = True) -> None:
        """Hot-(un)plug a device into the running domain and (``persist``) its persistent
        definition, if it has one, so the disk also survives a VM restart."""
        dom = self.libvirt.domain(vm)
        try:
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
            if persist and dom.isPersistent():
                flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
            (dom.attachDeviceFlags if attach else dom.detachDeviceFlags)(xml, flags)
        except libvirt.libvirtError as exc:
            raise HostError(f"{vm}: libvirt refused to {'attach' if attach else 'detach'} the disk: "
                            f"{exc.get_error_message()}") from None

    def attach_disk(self, vm: str, xml: str, persist: bool = True) -> None:
        self._device(vm, xml, True, persist)

    def detach_disk(self, vm: str, xml: str) -> None:
        self._device(vm, xml, False)

    # -- migration: the relay's shm channel (libvirt_host) ------------------------------------
    def attach_shmem(self, vm: str, region: str, size_bytes: int) -> str:
        return self.libvirt.attach_shmem(vm, region, size_bytes)

    def detach_shmem(self, vm: str, region: str) -> bool:
        return self.libvirt.detach_shmem(vm, region)

    def open_shmem(self, region: str, size_bytes: int) -> Any:
        return shmem.open_shmem(region, size_bytes)

    def remove_shmem(self, region: str) -> bool:
        return shmem.remove_shmem(region)

    def attach_nbd_disk(self, vm: str, socket: str, export: str, target: str, serial: str,
                        reconnect_delay_s: int) -> str:
        return nbddisk.attach(lambda c, a: self.qmp(vm, c, a), socket, export, target, serial, reconnect_delay_s)

    def nbd_disk_attached(self, vm: str, target: str) -> bool:
        return nbddisk.attached(lambda c, a: self.qmp(vm, c, a), target)

    def detach_nbd_disk(self, vm: str, target: str) -> None:
        nbddisk.detach(lambda c, a: self.qmp(vm, c, a), target)

    def attach_vhost_disk(self, vm: str, socket: str, target: str) -> str:
        return vhostdisk.attach(lambda c, a: self.qmp(vm, c, a), socket, target)

    def detach_vhost_disk(self, vm: str, target: str) -> None:
        vhostdisk.detach(lambda c, a: self.qmp(vm, c, a), target)

    # -- host paging ------------------------------------------------------------------------
    def suspend(self, vm: str) -> None:
        try:
            self.libvirt.domain(vm).suspend()
        except libvirt.libvirtError as exc:
            raise HostError(f"{vm}: suspend failed: {exc.get_error_message()}") from None

    def resume(self, vm: str) -> None:
        try:
            self.libvirt.domain(vm).resume()
        except libvirt.libvirtError as exc:
            raise HostError(f"{vm}: resume failed: {exc.get_error_message()}") from None

    def zram_create(self, size_bytes: int, compressor: str, label: str, priority: int,
                    on_added: Callable[[int], None] | None = None, mem_limit_bytes: int | None = None) -> int:
        with _paging_errors():
            return zram.create_swap(size_bytes, compressor, label, priority, on_added=on_added,
                                    mem_limit_bytes=mem_limit_bytes)

    def zram_remove(self, num: int) -> None:
        with _paging_errors():
            zram.remove(num)

    def zram_probe(self, num: int) -> dict[str, Any] | None:
        with _paging_errors():
            if not zram.exists(num):
                return None
            return {"label": zram.swap_label(num), "disksize": zram.disksize(num), "is_swap": zram.is_swap(num),
                    "swap": zram.swaps().get(zram.dev_path(num), {}), "stats": zram.stats(num)}

    def process_smaps(self, pid: int) -> list[Any]:
        with _paging_errors():
            return po.read_smaps(pid)

    def process_status_kib(self, pid: int) -> dict[str, int]:
        return po.status_kib(pid)

    def process_residency(self, pid: int, start: int, length: int) -> Any:
        with _paging_errors():
            return po.residency(po.pagemap(pid, start, length))[0]

    def process_pageout(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int:
        with _paging_errors():
            return po.pageout(pid, ranges)

    def process_willneed(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int:
        with _paging_errors():
            return po.willneed(pid, ranges)

    def process_touch(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int:
        with _paging_errors():
            return po.touch(pid, ranges)

    def process_pss_kib(self, pid: int) -> int | None:
        return procmem.read_smaps_rollup(pid).get("Pss")

    # -- idle VMs ---------------------------------------------------------------------------
    def vcpu_seconds(self, vm: str) -> float | None:
        """Sum of the vCPU threads' CPU time (virDomainGetVcpus); None when not readable."""
        try:
            infos, _maps = self.libvirt.domain(vm).vcpus()
        except (libvirt.libvirtError, HostError):
            return None
        return sum(int(v[2]) for v in infos) / 1e9

    def interfaces(self, vm: str) -> list[str]:
        try:
            return tapwatch.interfaces_from_xml(self.libvirt.domain(vm).XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise HostError(f"{vm}: reading its interfaces failed: {exc.get_error_message()}") from None

    def net_packets(self, dev: str) -> int | None:
        return tapwatch.net_packets(dev)

    def watch_taps(self, vm: str, devs: list[str], on_frame: Callable[[str, str], None]) -> list[str]:
        with self._lock:
            if self._taps is None:
                self._taps = tapwatch.TapWatcher()
            taps = self._taps
        return taps.watch(vm, devs, on_frame)

    def unwatch_taps(self, vm: str) -> None:
        if self._taps is not None:
            self._taps.unwatch(vm)


@contextmanager
def _paging_errors() -> Iterator[None]:
    """zram's and page-out's own errors cross the port as :class:`HostError` (same message)."""
    try:
        yield
    except (zram.ZramError, po.PageoutError) as exc:
        raise HostError(str(exc)) from None


__all__ = ["HostError", "LibvirtError", "SystemHost", "quiet_libvirt_errors"]
