"""The daemon asks an idle VM's agent for stats less often (``control.idle_stats_s``, issue 15
item 4): under TCG every request wakes the guest for ~35 ms of a host core."""

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


def daemon(tmp_path, idle_stats_s: float) -> tuple[Daemon, FakeDomain, CountingLink]:
    dom = FakeDomain("vm1", qemu_cpu_percent=1.0)
    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "d.sock"),
                             "control": {"idle_stats_s": idle_stats_s}})
    d = Daemon(cfg, host=FakeHost(dom))
    d.store.add_vm("vm1", "uuid-1", {})
    link = CountingLink()
    d.links["vm1"] = link  # type: ignore[assignment]
    return d, dom, link


def collect(d: Daemon) -> dict[str, Any]:
    asyncio.run(d._collect_vm("vm1"))
    return d.latest["vm1"]


def test_an_idle_vm_keeps_its_last_agent_sample_until_idle_stats_s(tmp_path) -> None:
    d, dom, link = daemon(tmp_path, 30.0)
    try:
        first = collect(d)
        assert link.requests == 1 and first["agent"]["meminfo"]
        again = collect(d)  # idle (1 % of a core) and asked just now: not asked again
        assert link.requests == 1 and again["agent"] is first["agent"] and again["agent_ts"] == first["agent_ts"]
        d.latest["vm1"]["agent_ts"] -= 31  # the sample is older than idle_stats_s: ask
        collect(d)
        assert link.requests == 2
        dom.qemu_cpu_percent = 40.0  # busy: asked every period
        collect(d)
        collect(d)
        assert link.requests == 4
        dom.qemu_cpu_percent = None  # unknown CPU: asked
        collect(d)
        assert link.requests == 5
    finally:
        d.store.close()


def test_off_by_default_every_period_asks(tmp_path) -> None:
    d, _dom, link = daemon(tmp_path, 0.0)
    try:
        for _ in range(3):
            collect(d)
        assert link.requests == 3
    finally:
        d.store.close()
    assert load_config(None).control.idle_stats_s == 0


def test_bad_idle_stats_s_names_the_key() -> None:
    with pytest.raises(ConfigError, match="control.idle_stats_s"):
        load_config(None, {"control": {"idle_stats_s": -1}})
