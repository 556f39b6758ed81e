"""The daemon asks an idle VM's agent and libvirt for stats less often (``control.idle_stats_s``,
issue 15 item 4): under TCG each agent request, and each dommemstat (QMP), wakes the VM's QEMU."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from symbiont.config import ConfigError, load_config
from symbiont.daemon import Daemon
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont_agent import stats


class CountingLink:
    ready = cooperative = connected = True
    caps = ["core.stats"]
    hello = {"caps": caps}

    def __init__(self) -> None:
        self.requests = 0

    async def request(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
                      timeout: float | None = None) -> tuple[Any, bytes]:
        self.requests += 1
        return stats.collect(), b""

    async def stop(self) -> None:
        pass


class Host(FakeHost):
    """Counts dommemstat calls (QMP: each one wakes QEMU's main loop)."""

    memstats = 0

    def memory_stats(self, vm: str) -> dict[str, int]:
        self.memstats += 1
        return super().memory_stats(vm)


def daemon(tmp_path, idle_stats_s: float) -> tuple[Daemon, FakeDomain, CountingLink]:
    dom = FakeDomain("vm1", qemu_cpu_percent=1.0, memstats_kib={"actual": 512 << 10})
    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "d.sock"),
                             "control": {"idle_stats_s": idle_stats_s}})
    d = Daemon(cfg, host=Host(dom))
    d.store.add_vm("vm1", "uuid-1", {})
    link = CountingLink()
    d.links["vm1"] = link  # type: ignore[assignment]
    return d, dom, link


def collect(d: Daemon) -> dict[str, Any]:
    asyncio.run(d._collect_vm("vm1"))
    return d.latest["vm1"]


def test_an_idle_vm_keeps_its_last_agent_sample_until_idle_stats_s(tmp_path) -> None:
    d, dom, link = daemon(tmp_path, 30.0)
    host: Host = d.host  # type: ignore[assignment]
    try:
        first = collect(d)
        assert link.requests == 1 and first["agent"]["meminfo"] and host.memstats == 1
        again = collect(d)  # idle (1 % of a core) and asked just now: not asked again
        assert link.requests == 1 and again["agent"] is first["agent"] and again["agent_ts"] == first["agent_ts"]
        assert host.memstats == 1 and again["libvirt"]["memstats_kib"] == {"actual": 512 << 10}
        d.latest["vm1"]["agent_ts"] -= 31  # the sample is older than idle_stats_s: ask
        collect(d)
        assert link.requests == 2 and host.memstats == 1
        dom.memory_kib = 256 << 10  # a new balloon target: libvirt's stats are read again
        collect(d)
        assert host.memstats == 2 and link.requests == 2
        d.latest["vm1"]["memstats_ts"] -= 31
        collect(d)
        assert host.memstats == 3
        dom.qemu_cpu_percent = 40.0  # busy: asked every period
        collect(d)
        collect(d)
        assert link.requests == 4 and host.memstats == 5
        dom.qemu_cpu_percent = None  # unknown CPU: asked
        collect(d)
        assert link.requests == 5 and host.memstats == 6
    finally:
        d.store.close()


def test_off_by_default_every_period_asks(tmp_path) -> None:
    d, _dom, link = daemon(tmp_path, 0.0)
    try:
        for _ in range(3):
            collect(d)
        assert link.requests == 3 and d.host.memstats == 3  # type: ignore[attr-defined]
    finally:
        d.store.close()
    assert load_config(None).control.idle_stats_s == 0


def test_bad_idle_stats_s_names_the_key() -> None:
    with pytest.raises(ConfigError, match="control.idle_stats_s"):
        load_config(None, {"control": {"idle_stats_s": -1}})
