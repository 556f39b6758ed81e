"""The ssdcache part against the shared fakes (FakeHost, FakeAgents, a real sqlite store):
the period's phases, a cooperative guest told of a grant through the gateway, a
non-persistent cache freed when its domain stops, and the elastic disk attached through the
host port (libvirt XML, or QMP with reconnect-delay). The pool is a real loop device (root)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from symbiont.errors import NotFound
from symbiont.host.fake import FakeDomain
from symbiont.host.port import HostError
from symbiont.ssdcache.config import SsdCacheConfig
from symbiont.ssdcache.part import SsdCachePart
from tests.fakes import Env, FakeAgents


def _env(tmp_path: Path, agents: FakeAgents | None = None) -> tuple[Env, SsdCachePart]:
    env = Env(tmp_path, FakeDomain("vm1"), agents=agents)
    cfg = SsdCacheConfig(runtime_dir=str(tmp_path / "run"), pool_dir=str(tmp_path / "pools"), reserve_free_mib=0)
    part = env.add(SsdCachePart, cfg)
    assert isinstance(part, SsdCachePart)
    return env, part


def test_decide_is_the_policy_schedule() -> None:
    part = SsdCachePart.__new__(SsdCachePart)
    assert not part.decide(None)
    assert not part.decide({"period": 4, "policy": {"mode": "manual", "every_periods": 1}})
    assert part.decide({"period": 4, "policy": {"mode": "shares", "every_periods": 2}})
    assert not part.decide({"period": 5, "policy": {"mode": "shares", "every_periods": 2}})


def test_without_a_pool_periods_run_and_the_api_gets_clear_refusals(tmp_path: Path) -> None:
    env, part = _env(tmp_path)

    async def run() -> None:
        await env.start()
        period = await env.period()
        assert period.observations["ssdcache"]["caches"] == 0
        assert part.status()["running"] and part.status()["pool"] == {"exists": False}
        await part.stop()
        assert part.status() == {"running": False}
        with pytest.raises(Exception, match="not running"):
            part.require_manager()

    asyncio.run(run())
    env.close()


needs_losetup = pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup")


@pytest.mark.root
@needs_losetup
def test_a_cooperative_guest_is_told_of_a_grant_and_a_stopped_vm_frees_its_cache(tmp_path: Path) -> None:
    agents = FakeAgents({"ssdcache.grant": {"epoch": 1}, "ssdcache.config": {"epoch": 1},
                         "ssdcache.status": {"hits": 1}})
    env, part = _env(tmp_path, agents)

    async def run() -> None:
        await env.start()
        mgr = part.require_manager()
        try:
            await mgr.create_pool("pool.img", None, 16)
            await mgr.register("vm1", 8, 0, False)
            res = await mgr.resize("vm1", 4)
            assert res["guest_told"] is True
            assert ("vm1", "ssdcache.grant") in [(v, op) for v, op, _ in agents.calls]
            await env.period()
            assert mgr.view("vm1")["current_mib"] == 4
            env.host.domains["vm1"].state = "running"
            await env.period()  # seen running
            env.host.domains["vm1"].state = "shutoff"
            await env.period()  # seen stopped: a non-persistent cache's blocks go back
            assert mgr.view("vm1")["current_mib"] == 0
        finally:
            await part.stop()

    asyncio.run(run())
    env.close()


@pytest.mark.root
@needs_losetup
def test_the_elastic_disk_is_attached_through_the_host_port(tmp_path: Path) -> None:
    env, part = _env(tmp_path)
    env.host.domains["vm1"].qmp = {"blockdev-add": {}, "device_add": {}}

    async def run() -> list[Any]:
        await env.start()
        mgr = part.require_manager()
        try:
            await mgr.create_pool("pool.img", None, 16)
            await mgr.register("vm1", 8, 0, True)
            out = await part.attach("vm1", "vdb", "symbiont-cache", 0)
            assert "<serial>symbiont-cache</serial>" in out["xml"]
            out = await part.attach("vm1", "vdd", "symbiont-rc", 30)
            assert out["qmp_node"] == "symbiont-nbd-vdd"
            with pytest.raises(NotFound):
                await part.attach("nope", "vdb", "symbiont-cache", 0)
            env.host.fail["attach_disk"] = HostError("vm1: libvirt refused to attach the disk: busy")
            with pytest.raises(HostError):
                await part.attach("vm1", "vdc", "symbiont-cache", 0)
            return list(env.host.calls)
        finally:
            await part.stop()

    calls = asyncio.run(run())
    env.close()
    assert calls[0][:2] == ("attach_disk", "vm1")
    qmp = [c for c in calls if c[0] == "qmp"]
    assert [c[2] for c in qmp] == ["blockdev-add", "device_add"]
    assert qmp[0][3]["reconnect-delay"] == 30 and qmp[0][3]["server"]["path"].endswith(".sock")


@pytest.mark.root
@needs_losetup
def test_a_vhost_user_attach_serves_the_export_and_a_refusal_leaves_nothing(tmp_path: Path) -> None:
    """transport vhost-user: the backend's socket is served and recorded in sqlite (a restarted
    daemon serves it again), the device goes in over QMP; a refusal (RAM not shared) leaves no
    socket and no record; reconnect_delay_s is for NBD only."""
    from symbiont.errors import Invalid

    env, part = _env(tmp_path)
    dom = env.host.domains["vm1"]
    dom.qmp = {"query-memdev": [{"id": "pc.ram", "share": False}], "chardev-add": {}, "device_add": {}}

    async def run() -> None:
        await env.start()
        mgr = part.require_manager()
        try:
            await mgr.create_pool("pool.img", None, 16)
            await mgr.register("vm1", 8, 0, True)
            with pytest.raises(Invalid, match="reconnect_delay_s"):
                await part.attach("vm1", "vdc", "symbiont-cache", 30, "vhost-user")
            with pytest.raises(HostError, match="shared"):
                await part.attach("vm1", "vdc", "symbiont-cache", 0, "vhost-user")
            assert "vm1" not in mgr.vhosts and not mgr.socket_path("vm1", "vhost-user").exists()
            assert "transport" not in mgr.bmap.cache("vm1").params
            dom.qmp["query-memdev"] = [{"id": "pc.ram", "share": True}]
            out = await part.attach("vm1", "vdc", "symbiont-cache", 0, "vhost-user")
            assert out["qmp_node"] == "symbiont-vhu-vdc" and out["transport"] == "vhost-user"
            assert mgr.socket_path("vm1", "vhost-user").is_socket()
            assert mgr.bmap.cache("vm1").params["transport"] == "vhost-user"
            chardev = [c for c in env.host.calls if c[0] == "qmp" and c[2] == "chardev-add"][-1]
            assert chardev[3]["backend"]["data"]["addr"]["data"]["path"] == str(mgr.socket_path("vm1", "vhost-user"))
            # a restarted manager serves the vhost socket again from what sqlite says
            await part.stop()
            await part.start()
            mgr = part.require_manager()
            assert "vm1" in mgr.vhosts and mgr.socket_path("vm1", "vhost-user").is_socket()
        finally:
            await part.stop()

    asyncio.run(run())
    env.close()
