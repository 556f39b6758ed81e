"""``FakeHost``: the one test double of :class:`symbiont.host.port.HostPort`.

Fed recorded answers (plain dicts: what a real host answered, see ``tests/fakes.py``) and
recording every call that changes something in ``calls``, so a unit test can say "the balloon
moved to 384 MiB" without a VM. Writes change the recorded state the way the real host would
(a balloon target moves ``memory_kib``; a hot-plug moves ``vcpus``), so a controller that
reads back what it wrote sees it. ``fail[call] = HostError(...)`` makes one call fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from symbiont.host import nbddisk, vhostdisk
from symbiont.host.ksm import COUNTERS, TUNABLES, KsmError, KsmStats
from symbiont.host.pageout import PAGE_SIZE
from symbiont.host.port import DomainInfo, HostError
from symbiont.host.procmem import Mapping


@dataclass
class FakeDomain:
    """One domain as recorded: libvirt's facts plus the QEMU process's."""

    name: str
    state: str = "running"
    memory_kib: int = 512 * 1024
    max_memory_kib: int = 512 * 1024
    vcpus: int = 1
    max_vcpus: int = 4
    uuid: str = ""
    domain_type: str = "qemu"
    memstats_kib: dict[str, int] = field(default_factory=dict)
    qemu_pid: int | None = 4242
    qemu_rss: int | None = 200 << 20
    qemu_cpu_percent: float | None = 5.0
    cpu_seconds: float | None = None  # the QEMU process's CPU time (user + system)
    merging_pages: int | None = None
    schedinfo: dict[str, int] = field(default_factory=lambda: {"cpu_shares": 1024, "vcpu_period": 100000,
                                                                "vcpu_quota": -1})
    memtune: dict[str, int] = field(default_factory=lambda: {"hard_limit": 9007199254740991,
                                                              "soft_limit": 9007199254740991,
                                                              "swap_hard_limit": 9007199254740991})
    qmp: dict[str, Any] = field(default_factory=dict)  # command → recorded "return"
    channel: str | None = None
    guest_ram: dict[str, Any] | None = None  # the QEMU process's guest-RAM mapping: start, end, mergeable
    resident_bytes: int = 0  # of that mapping (pagemap, zero page excluded)
    ksm_stat: dict[str, int | bool] | None = None  # /proc/PID/ksm_stat
    vcpu_seconds: float | None = None  # the vCPU threads' CPU time so far (libvirt)
    interfaces: list[str] = field(default_factory=list)  # host tap devices
    pss_kib: int | None = None  # the QEMU process's PSS


class FakeHost:
    """A :class:`HostPort` over recorded answers."""

    def __init__(self, *domains: FakeDomain, mem_total_bytes: int = 24 << 30, ksm_running: bool = False,
                 host: dict[str, Any] | None = None, ksm: dict[str, int | str] | None = None) -> None:
        self.domains: dict[str, FakeDomain] = {d.name: d for d in domains}
        self._mem_total = mem_total_bytes
        self._ksm_running = ksm_running
        self.host = host or {"cpu_percent": 10.0, "cpus": 2, "loadavg": [0.1, 0.1, 0.1],
                             "mem_total": mem_total_bytes, "mem_available": mem_total_bytes // 2,
                             "mem_used": mem_total_bytes // 2, "swap_used": 0, "psi": {}}
        self.calls: list[tuple[Any, ...]] = []  # every call that changes something, in order
        self.fail: dict[str, Exception] = {}
        self.cgroup: dict[str, str] = {}  # cgroupfs files by path
        # KSM's sysfs files (tunables and counters) as read; None: a kernel without KSM. Writes act
        # as the kernel's: max_page_sharing/merge_across_nodes are EBUSY while pages are merged,
        # run=2 unmerges, pages_to_scan is refused while the advisor is on.
        self.ksm: dict[str, int | str] | None = ksm
        self.ksmd_cpu_s: float | None = 1.5
        self.meminfo: dict[str, int] = {"MemTotal": mem_total_bytes >> 10, "MemFree": mem_total_bytes >> 11,
                                        "Buffers": 0, "Cached": 0}
        self.mergeable_pages = 0
        # host paging: zram devices by number (what zram_probe answers), and per QEMU pid its
        # mappings with a page-present mask each (pageout clears, touch sets)
        self.zram: dict[int, dict[str, Any]] = {}
        self.procs: dict[int, list[Mapping]] = {}
        self.present: dict[tuple[int, int], np.ndarray] = {}
        self.net: dict[str, int] = {}  # tap device -> rx + tx packets so far
        self.tap_watches: dict[str, tuple[list[str], Callable[[str, str], None]]] = {}  # vm -> (devs, callback)

    def add(self, dom: FakeDomain) -> FakeDomain:
        self.domains[dom.name] = dom
        return dom

    def _dom(self, vm: str, call: str) -> FakeDomain:
        if call in self.fail:
            raise self.fail[call]
        d = self.domains.get(vm)
        if d is None:
            raise HostError(f"no domain {vm!r}")
        return d

    # -- libvirt ----------------------------------------------------------------------------
    def info(self, vm: str) -> DomainInfo:
        d = self._dom(vm, "info")
        return DomainInfo(d.name, d.uuid or f"uuid-{d.name}", d.state, d.memory_kib, d.max_memory_kib, d.vcpus,
                          d.max_vcpus, d.domain_type)

    def exists(self, vm: str) -> bool:
        return vm in self.domains

    def memory_stats(self, vm: str) -> dict[str, int]:
        d = self._dom(vm, "memory_stats")
        return dict(d.memstats_kib) if d.state == "running" else {}

    def set_balloon(self, vm: str, kib: int) -> None:
        d = self._dom(vm, "set_balloon")
        self.calls.append(("set_balloon", vm, kib))
        d.memory_kib = kib
        if "actual" in d.memstats_kib:
            d.memstats_kib["actual"] = kib

    def set_vcpus(self, vm: str, count: int) -> None:
        d = self._dom(vm, "set_vcpus")
        if not 1 <= count <= d.max_vcpus:
            raise HostError(f"{vm}: setting {count} vCPUs failed: out of range 1..{d.max_vcpus}")
        self.calls.append(("set_vcpus", vm, count))
        d.vcpus = count

    def channel_path(self, vm: str, target: str) -> str | None:
        return self._dom(vm, "channel_path").channel

    # -- the QEMU process -------------------------------------------------------------------
    def qemu_pid(self, vm: str) -> int | None:
        d = self._dom(vm, "qemu_pid")
        return d.qemu_pid if d.state in ("running", "paused") else None

    def qmp(self, vm: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        d = self._dom(vm, "qmp")
        self.calls.append(("qmp", vm, command, arguments))
        if command not in d.qmp:
            raise HostError(f"{vm}: QMP {command}: no recorded answer")
        return d.qmp[command]

    def schedinfo(self, vm: str) -> dict[str, int]:
        return dict(self._dom(vm, "schedinfo").schedinfo)

    def set_schedinfo(self, vm: str, params: dict[str, int]) -> None:
        d = self._dom(vm, "set_schedinfo")
        unknown = set(params) - set(d.schedinfo)
        if unknown:
            raise HostError(f"{vm}: schedinfo has no {sorted(unknown)}")
        self.calls.append(("set_schedinfo", vm, dict(params)))
        d.schedinfo.update(params)

    def memtune(self, vm: str) -> dict[str, int]:
        return dict(self._dom(vm, "memtune").memtune)

    def set_memtune(self, vm: str, params: dict[str, int]) -> None:
        d = self._dom(vm, "set_memtune")
        self.calls.append(("set_memtune", vm, dict(params)))
        d.memtune.update(params)

    def read_cgroup(self, path: str) -> str:
        if path not in self.cgroup:
            raise HostError(f"{path}: no such file")
        return self.cgroup[path]

    def write_cgroup(self, path: str, value: str) -> None:
        if "write_cgroup" in self.fail:
            raise self.fail["write_cgroup"]
        self.calls.append(("write_cgroup", path, value))
        self.cgroup[path] = value

    # -- processes and the host --------------------------------------------------------------
    def _by_pid(self, pid: int | None) -> FakeDomain | None:
        return next((d for d in self.domains.values() if pid is not None and d.qemu_pid == pid), None)

    def host_sample(self) -> dict[str, Any]:
        return dict(self.host)

    def mem_total_bytes(self) -> int:
        return self._mem_total

    def process_cpu_percent(self, pid: int | None) -> float | None:
        d = self._by_pid(pid)
        return d.qemu_cpu_percent if d else None

    def process_rss(self, pid: int | None) -> int | None:
        d = self._by_pid(pid)
        return d.qemu_rss if d else None

    def process_cpu_seconds(self, pid: int | None) -> float | None:
        d = self._by_pid(pid)
        return d.cpu_seconds if d else None

    def process_merging_pages(self, pid: int) -> int | None:
        d = self._by_pid(pid)
        return d.merging_pages if d else None

    def ksm_running(self) -> bool:
        return self._ksm_running

    # -- KSM and the QEMU processes' memory ------------------------------------------------------
    def _ksm_files(self) -> dict[str, int | str]:
        if self.ksm is None:
            raise KsmError("KSM is not available (this fake host has none)")
        return self.ksm

    def ksm_available(self) -> bool:
        return self.ksm is not None

    def ksm_has(self, name: str) -> bool:
        return self.ksm is not None and name in self.ksm

    def ksm_read(self, name: str) -> int | str:
        files = self._ksm_files()
        if name not in files:
            raise KsmError(f"this kernel has no KSM file {name!r}")
        return files[name]

    def ksm_write(self, name: str, value: int | str) -> None:
        files = self._ksm_files()
        if "ksm_write" in self.fail:
            raise self.fail["ksm_write"]
        if name not in TUNABLES or name not in files:
            raise KsmError(f"{name!r} is not a KSM tunable of this kernel")
        if name in ("max_page_sharing", "merge_across_nodes") and int(files.get("pages_shared", 0)) > 0:
            raise KsmError(f"writing {value!r} to {name}: busy")
        if name == "pages_to_scan" and files.get("advisor_mode", "none") != "none":
            raise KsmError(f"writing {value!r} to {name}: invalid value")
        self.calls.append(("ksm_write", name, value))
        if name == "advisor_mode" and value == "none" and files[name] != "none":
            files["pages_to_scan"] = 100  # the kernel resets it when the advisor goes off
        files[name] = value
        if name == "run" and int(value) == 2:
            files["pages_shared"] = files["pages_sharing"] = 0

    def ksm_settings(self) -> dict[str, int | str]:
        files = self._ksm_files()
        return {t: files[t] for t in TUNABLES if t in files}

    def ksm_stats(self) -> KsmStats:
        files = self._ksm_files()
        return KsmStats(**{c: int(files[c]) if c in files else (0 if i < 5 else None)  # type: ignore[arg-type]
                           for i, c in enumerate(COUNTERS)})

    def ksmd_cpu_seconds(self) -> float | None:
        return self.ksmd_cpu_s

    def process_ksm_stat(self, pid: int) -> dict[str, int | bool] | None:
        d = self._by_pid(pid)
        return dict(d.ksm_stat) if d is not None and d.ksm_stat is not None else None

    def guest_ram(self, pid: int, ram_bytes: int | None) -> dict[str, Any] | None:
        d = self._by_pid(pid)
        if d is None:
            raise HostError(f"process {pid} does not exist")
        return dict(d.guest_ram) if d.guest_ram is not None else None

    def resident_bytes(self, pid: int, start: int, end: int) -> int:
        d = self._by_pid(pid)
        if d is None:
            raise HostError(f"process {pid} does not exist")
        return d.resident_bytes

    def host_mergeable_pages(self) -> int:
        return self.mergeable_pages

    def meminfo_kib(self) -> dict[str, int]:
        return dict(self.meminfo)

    def qemu_committed_kib(self) -> int:
        return sum((d.qemu_rss or 0) >> 10 for d in self.domains.values() if d.qemu_pid is not None)


    # -- host paging ------------------------------------------------------------------------
    def suspend(self, vm: str) -> None:
        d = self._dom(vm, "suspend")
        self.calls.append(("suspend", vm))
        d.state = "paused"

    def resume(self, vm: str) -> None:
        d = self._dom(vm, "resume")
        self.calls.append(("resume", vm))
        d.state = "running"

    def zram_create(self, size_bytes: int, compressor: str, label: str, priority: int,
                    on_added: Callable[[int], None] | None = None, mem_limit_bytes: int | None = None) -> int:
        if "zram_create" in self.fail:
            raise self.fail["zram_create"]
        num = max(self.zram, default=-1) + 1
        if on_added is not None:
            on_added(num)
        self.zram[num] = {"label": label, "disksize": size_bytes, "is_swap": True, "compressor": compressor,
                          "mem_limit": size_bytes if mem_limit_bytes is None else mem_limit_bytes,
                          "swap": {"size_kib": size_bytes >> 10, "used_kib": 0, "priority": priority},
                          "stats": None}
        self.calls.append(("zram_create", num, size_bytes, compressor, label, priority))
        return num

    def zram_remove(self, num: int) -> None:
        self.calls.append(("zram_remove", num))
        self.zram.pop(num, None)

    def zram_probe(self, num: int) -> dict[str, Any] | None:
        return self.zram.get(num)

    def add_process(self, pid: int, regions: list[Mapping]) -> None:
        """A QEMU process's mappings, every page of each resident at first."""
        self.procs[pid] = regions
        for r in regions:
            self.present[(pid, r.start)] = np.ones(r.size // PAGE_SIZE, dtype=bool)

    def _region(self, pid: int, addr: int) -> Mapping:
        for r in self.procs.get(pid, []):
            if r.start <= addr < r.end:
                return r
        raise HostError(f"pid {pid}: no mapping at {addr:#x}")

    def _mark(self, pid: int, ranges: Sequence[tuple[int, int]], value: bool) -> int:
        done = 0
        for a, n in ranges:
            r = self._region(pid, a)
            self.present[(pid, r.start)][(a - r.start) // PAGE_SIZE:(a - r.start + n) // PAGE_SIZE] = value
            done += n
        return done

    def process_smaps(self, pid: int) -> list[Any]:
        if pid not in self.procs:
            raise HostError(f"pid {pid}: no such process")
        return [dataclasses.replace(r, rss_kib=int(self.present[(pid, r.start)].sum()) * PAGE_SIZE >> 10,
                                    swap_kib=int((~self.present[(pid, r.start)]).sum()) * PAGE_SIZE >> 10)
                for r in self.procs[pid]]

    def process_status_kib(self, pid: int) -> dict[str, int]:
        regs = self.process_smaps(pid) if pid in self.procs else []
        return {"VmRSS": sum(r.rss_kib for r in regs), "VmSwap": sum(r.swap_kib for r in regs)}

    def process_residency(self, pid: int, start: int, length: int) -> Any:
        r = self._region(pid, start)
        return self.present[(pid, r.start)][(start - r.start) // PAGE_SIZE:(start - r.start + length) // PAGE_SIZE].copy()

    def process_pageout(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int:
        self.calls.append(("pageout", pid, sum(n for _, n in ranges)))
        return self._mark(pid, ranges, False)

    def process_willneed(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int:
        self.calls.append(("willneed", pid, sum(n for _, n in ranges)))
        return self._mark(pid, ranges, True)

    def process_touch(self, pid: int, ranges: Sequence[tuple[int, int]]) -> int:
        self.calls.append(("touch", pid, sum(n for _, n in ranges)))
        return self._mark(pid, ranges, True)

    def process_pss_kib(self, pid: int) -> int | None:
        d = self._by_pid(pid)
        return d.pss_kib if d else None

    # -- idle VMs ---------------------------------------------------------------------------
    def vcpu_seconds(self, vm: str) -> float | None:
        return self._dom(vm, "vcpu_seconds").vcpu_seconds

    def interfaces(self, vm: str) -> list[str]:
        return list(self._dom(vm, "interfaces").interfaces)

    def net_packets(self, dev: str) -> int | None:
        return self.net.get(dev)

    def watch_taps(self, vm: str, devs: list[str], on_frame: Callable[[str, str], None]) -> list[str]:
        self.calls.append(("watch_taps", vm, tuple(devs)))
        self.tap_watches[vm] = (list(devs), on_frame)
        return list(devs)

    def unwatch_taps(self, vm: str) -> None:
        if self.tap_watches.pop(vm, None) is not None:
            self.calls.append(("unwatch_taps", vm))

    def frame(self, dev: str) -> bool:
        """A frame toward the guest on ``dev``: the watch of the VM owning it fires once."""
        for vm, (devs, cb) in list(self.tap_watches.items()):
            if dev in devs:
                del self.tap_watches[vm]
                cb(vm, dev)
                return True
        return False

    def close(self) -> None:
        pass

    def snapshot(self, vm: str) -> dict[str, Any]:
        """The domain's recorded state, for assertions."""
        return dataclasses.asdict(self.domains[vm])

    # -- ssdcache: the elastic disk (the QMP path runs host.nbddisk over the recorded monitor) --
    def attach_disk(self, vm: str, xml: str, persist: bool = True) -> None:
        self._dom(vm, "attach_disk")
        self.calls.append(("attach_disk", vm, xml))

    def detach_disk(self, vm: str, xml: str) -> None:
        self._dom(vm, "detach_disk")
        self.calls.append(("detach_disk", vm, xml))

    def attach_nbd_disk(self, vm: str, socket: str, export: str, target: str, serial: str,
                        reconnect_delay_s: int) -> str:
        return nbddisk.attach(lambda c, a: self.qmp(vm, c, a), socket, export, target, serial, reconnect_delay_s)

    def nbd_disk_attached(self, vm: str, target: str) -> bool:
        return nbddisk.attached(lambda c, a: self.qmp(vm, c, a), target)

    def detach_nbd_disk(self, vm: str, target: str) -> None:
        nbddisk.detach(lambda c, a: self.qmp(vm, c, a), target, timeout_s=0)

    def attach_vhost_disk(self, vm: str, socket: str, target: str) -> str:
        return vhostdisk.attach(lambda c, a: self.qmp(vm, c, a), socket, target)

    def detach_vhost_disk(self, vm: str, target: str) -> None:
        vhostdisk.detach(lambda c, a: self.qmp(vm, c, a), target, timeout_s=0)

    # -- migration: the relay's shm channel (regions are files in a folder of the test's) -------
    shm_dir: str | None = None  # set by a test (tmp_path); else a temporary folder on first use

    def _shm_path(self, region: str) -> str:
        import os
        import tempfile

        if self.shm_dir is None:
            self.shm_dir = tempfile.mkdtemp(prefix="fake-shm-")
        return os.path.join(self.shm_dir, region)

    def attach_shmem(self, vm: str, region: str, size_bytes: int) -> str:
        """As QEMU does: the file is created (sparse) at attach; the address is the next free slot."""
        d = self._dom(vm, "attach_shmem")
        self.calls.append(("attach_shmem", vm, region, size_bytes))
        with open(self._shm_path(region), "wb") as fh:
            fh.truncate(size_bytes)
        plugged = self.__dict__.setdefault("shmem", {})
        plugged[(d.name, region)] = f"0000:00:{7 + len(plugged):02x}.0"
        return plugged[(d.name, region)]  # type: ignore[no-any-return]

    def detach_shmem(self, vm: str, region: str) -> bool:
        if "detach_shmem" in self.fail:
            raise self.fail["detach_shmem"]
        self.calls.append(("detach_shmem", vm, region))
        return self.__dict__.setdefault("shmem", {}).pop((vm, region), None) is not None

    def open_shmem(self, region: str, size_bytes: int) -> Any:
        import mmap
        import os

        try:
            fd = os.open(self._shm_path(region), os.O_RDWR)
        except OSError as exc:
            raise HostError(f"region {region}: {exc.strerror}") from None
        try:
            return mmap.mmap(fd, size_bytes)
        finally:
            os.close(fd)

    def remove_shmem(self, region: str) -> bool:
        import os

        self.calls.append(("remove_shmem", region))
        try:
            os.unlink(self._shm_path(region))
            return True
        except FileNotFoundError:
            return False
