"""``FakeHost``: the one test double of :class:`symbiont.host.port.HostPort`.

Fed recorded answers (plain dicts: what a real host answered, see ``tests/fakes.py``) and
recording every call that changes something in ``calls``, so a unit test can say "the balloon
moved to 384 MiB" without a VM. Writes change the recorded state the way the real host would
(a balloon target moves ``memory_kib``; a hot-plug moves ``vcpus``), so a controller that
reads back what it wrote sees it. ``fail[call] = HostError(...)`` makes one call fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from symbiont.host.port import DomainInfo, HostError


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
    merging_pages: int | None = None
    schedinfo: dict[str, int] = field(default_factory=lambda: {"cpu_shares": 1024, "vcpu_period": 100000,
                                                                "vcpu_quota": -1})
    memtune: dict[str, int] = field(default_factory=lambda: {"hard_limit": 9007199254740991,
                                                              "soft_limit": 9007199254740991,
                                                              "swap_hard_limit": 9007199254740991})
    qmp: dict[str, Any] = field(default_factory=dict)  # command → recorded "return"
    channel: str | None = None


class FakeHost:
    """A :class:`HostPort` over recorded answers."""

    def __init__(self, *domains: FakeDomain, mem_total_bytes: int = 24 << 30, ksm_running: bool = False,
                 host: dict[str, Any] | None = None) -> None:
        self.domains: dict[str, FakeDomain] = {d.name: d for d in domains}
        self._mem_total = mem_total_bytes
        self._ksm_running = ksm_running
        self.host = host or {"cpu_percent": 10.0, "cpus": 2, "loadavg": [0.1, 0.1, 0.1],
                             "mem_total": mem_total_bytes, "mem_available": mem_total_bytes // 2,
                             "mem_used": mem_total_bytes // 2, "swap_used": 0, "psi": {}}
        self.calls: list[tuple[Any, ...]] = []  # every call that changes something, in order
        self.fail: dict[str, Exception] = {}
        self.cgroup: dict[str, str] = {}  # cgroupfs files by path

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

    def process_merging_pages(self, pid: int) -> int | None:
        d = self._by_pid(pid)
        return d.merging_pages if d else None

    def ksm_running(self) -> bool:
        return self._ksm_running

    def close(self) -> None:
        pass

    def snapshot(self, vm: str) -> dict[str, Any]:
        """The domain's recorded state, for assertions."""
        return dataclasses.asdict(self.domains[vm])
