"""The host port: the one door through which parts reach the system.

Parts never import libvirt, libvirt_qemu or a QMP client, nor read cgroupfs, sysfs or another
process's /proc themselves: they call a :class:`HostPort`. The daemon gives them the real one
(:class:`symbiont.host.system.SystemHost`); unit tests give them
:class:`symbiont.host.fake.FakeHost`, fed recorded answers, so every controller is testable
without a VM. The calls are blocking (libvirt's are): a part runs them with
``await asyncio.to_thread(ctx.host.<call>, ...)``.

This module imports nothing of the system, so a part can name the port's types freely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class HostError(Exception):
    """A host operation failed (a libvirt call, a missing domain, a cgroup write); the message
    says which and why."""


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str  # libvirt's state name: running, paused, shutoff, ...
    memory_kib: int  # current balloon target
    max_memory_kib: int  # boot memory: the balloon's ceiling
    vcpus: int  # live vCPU count
    max_vcpus: int
    domain_type: str


@runtime_checkable
class HostPort(Protocol):
    """What a part may ask of the host. Every call may raise :class:`HostError`."""

    # -- libvirt: domains, the balloon, vCPUs ----------------------------------------------
    def info(self, vm: str) -> DomainInfo: ...
    def exists(self, vm: str) -> bool: ...
    def memory_stats(self, vm: str) -> dict[str, int]: ...
    def set_balloon(self, vm: str, kib: int) -> None: ...
    def set_vcpus(self, vm: str, count: int) -> None: ...
    def channel_path(self, vm: str, target: str) -> str | None: ...

    # -- the QEMU process: pid, QMP, its cgroup values through libvirt (v1 and v2 alike) ----
    def qemu_pid(self, vm: str) -> int | None: ...
    def qmp(self, vm: str, command: str, arguments: dict[str, Any] | None = None) -> Any: ...
    def schedinfo(self, vm: str) -> dict[str, int]: ...
    def set_schedinfo(self, vm: str, params: dict[str, int]) -> None: ...
    def memtune(self, vm: str) -> dict[str, int]: ...
    def set_memtune(self, vm: str, params: dict[str, int]) -> None: ...
    def read_cgroup(self, path: str) -> str: ...  # a cgroupfs file (absolute, under /sys/fs/cgroup)
    def write_cgroup(self, path: str, value: str) -> None: ...

    # -- processes and host-wide state (psutil, /proc, sysfs) -------------------------------
    def host_sample(self) -> dict[str, Any]: ...
    def mem_total_bytes(self) -> int: ...
    def process_cpu_percent(self, pid: int | None) -> float | None: ...
    def process_rss(self, pid: int | None) -> int | None: ...
    def process_cpu_seconds(self, pid: int | None) -> float | None: ...  # user + system, all threads
    def process_merging_pages(self, pid: int) -> int | None: ...
    def ksm_running(self) -> bool: ...

    # -- KSM (sysfs) and what the dedup part reads of the QEMU processes -----------------------
    def ksm_available(self) -> bool: ...
    def ksm_has(self, name: str) -> bool: ...  # this kernel has the file (advisor_mode: 6.8+)
    def ksm_read(self, name: str) -> int | str: ...  # KsmError (a HostError) with the reason
    def ksm_write(self, name: str, value: int | str) -> None: ...  # EBUSY/EINVAL as KsmError
    def ksm_settings(self) -> dict[str, int | str]: ...  # the tunables this kernel has
    def ksm_stats(self) -> Any: ...  # symbiont.host.ksm.KsmStats
    def ksmd_cpu_seconds(self) -> float | None: ...
    def process_ksm_stat(self, pid: int) -> dict[str, int | bool] | None: ...  # /proc/PID/ksm_stat
    def guest_ram(self, pid: int, ram_bytes: int | None) -> dict[str, Any] | None: ...  # start, end, mergeable
    def resident_bytes(self, pid: int, start: int, end: int) -> int: ...  # pagemap, zero page excluded
    def host_mergeable_pages(self) -> int: ...  # what ksmd walks in one pass
    def meminfo_kib(self) -> dict[str, int]: ...
    def qemu_committed_kib(self) -> int: ...  # ksmtuned's committed: all QEMUs' RSS

    # -- host paging: domain pause, the zram swap tier, a QEMU process's memory -------------------
    def suspend(self, vm: str) -> None: ...
    def resume(self, vm: str) -> None: ...
    def zram_create(self, size_bytes: int, compressor: str, label: str, priority: int,
                    on_added: Callable[[int], None] | None = None,
                    mem_limit_bytes: int | None = None) -> int: ...  # a swap device, its number
    def zram_remove(self, num: int) -> None: ...  # swapoff (pages go back to their owners), hot_remove
    def zram_probe(self, num: int) -> dict[str, Any] | None: ...  # None: no such device; else label,
    # disksize, is_swap, swap ({size_kib, used_kib, priority} from /proc/swaps), stats (ZramStats)
    def process_smaps(self, pid: int) -> list[Any]: ...  # symbiont.host.procmem.Mapping per mapping
    def process_status_kib(self, pid: int) -> dict[str, int]: ...  # VmRSS, VmSwap
    def process_residency(self, pid: int, start: int, length: int) -> Any: ...  # numpy bool: page present
    def process_pageout(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int: ...  # MADV_PAGEOUT
    def process_willneed(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int: ...  # MADV_WILLNEED
    def process_touch(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int: ...  # fault in (read)
    def process_pss_kib(self, pid: int) -> int | None: ...  # smaps_rollup Pss (KSM-shared pages split)

    # -- idle VMs: vCPU time, taps (paging's idle policy and wake on traffic) ---------------------
    def vcpu_seconds(self, vm: str) -> float | None: ...  # the vCPU threads' CPU time so far (libvirt)
    def interfaces(self, vm: str) -> list[str]: ...  # host tap devices of its <interface>s (live XML)
    def net_packets(self, dev: str) -> int | None: ...  # rx + tx packets so far (sysfs); None: gone
    def watch_taps(self, vm: str, devs: list[str], on_frame: Callable[[str, str], None]) -> list[str]: ...
    # on_frame(vm, dev) once, from a thread, at the first frame toward the guest; returns devs watched
    def unwatch_taps(self, vm: str) -> None: ...

    # -- ssdcache: the elastic disk in a domain (libvirt XML, or QMP with NBD reconnect-delay) ---
    def attach_disk(self, vm: str, xml: str, persist: bool = True) -> None: ...  # live (+ config if defined)
    def detach_disk(self, vm: str, xml: str) -> None: ...
    def attach_nbd_disk(self, vm: str, socket: str, export: str, target: str, serial: str,
                        reconnect_delay_s: int) -> str: ...  # QMP; the node id (host.nbddisk)
    def nbd_disk_attached(self, vm: str, target: str) -> bool: ...
    def detach_nbd_disk(self, vm: str, target: str) -> None: ...  # waits for the guest to let go
    def attach_vhost_disk(self, vm: str, socket: str, target: str) -> str: ...  # QMP (host.vhostdisk)
    def detach_vhost_disk(self, vm: str, target: str) -> None: ...  # waits for the guest to let go

    # -- migration: one shared region per VM (ivshmem-plain), the relay's shm channel ------------
    def attach_shmem(self, vm: str, region: str, size_bytes: int) -> str: ...  # live; guest PCI address
    def detach_shmem(self, vm: str, region: str) -> bool: ...  # False: domain or device not there
    def open_shmem(self, region: str, size_bytes: int) -> Any: ...  # mmap.mmap of the host's side
    def remove_shmem(self, region: str) -> bool: ...  # its file; False: already gone
