"""Idle VMs kept, available on demand (issue 15 item 2): the pure idle policy (property tests),
the paging part parking an idle VM on its own with the inputs logged, and every way back — an
agent call through the gateway's hook, a frame on its tap, the ping route — while the daemon's
own periodic calls never wake a parked VM."""

from __future__ import annotations

import asyncio
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.config import Config
from symbiont.errors import AgentError, NoAgent
from symbiont.gateway import AgentGateway
from symbiont.host.fake import FakeDomain, FakeHost
from symbiont.host.procmem import Mapping
from symbiont.paging.config import PagingConfig
from symbiont.paging.part import PagingPart
from symbiont.paging.policy import IdleSample, idle_verdict
from symbiont.part import Period, run_period
from tests.fakes import Env, FakeAgents

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MIB = 1 << 20
RAM = 0x7F0000000000
PID = 4242


# -- the policy ------------------------------------------------------------------------------------
def _series(cpu_pct: list[float], dt: float = 2.0, packets: list[int] | None = None,
            requests: list[int] | None = None, load: float | None = None) -> list[IdleSample]:
    out, vcpu = [], 100.0
    for i in range(len(cpu_pct) + 1):
        if i:
            vcpu += cpu_pct[i - 1] / 100.0 * dt
        out.append(IdleSample(t=i * dt, running=True, vcpu_s=vcpu,
                              net_packets=None if packets is None else packets[i],
                              requests=0 if requests is None else requests[i], load1=load))
    return out


def test_an_idle_window_long_enough_parks_and_says_why() -> None:
    v = idle_verdict(_series([0.5] * 31), idle_after_s=60.0, idle_cpu_pct=2.0)
    assert v.park and "idle for 60 s" in v.reason
    assert v.inputs["vcpu_peak_pct"] == 0.5 and v.inputs["window_s"] == 60.0 and v.inputs["requests"] == 0


def test_too_short_busy_traffic_requests_load_or_unknown_keep_it_running() -> None:
    assert not idle_verdict(_series([0.5] * 29), 60.0, 2.0).park  # 58 s
    v = idle_verdict(_series([0.5] * 20 + [2.5] + [0.5] * 10), 60.0, 2.0)
    assert not v.park and "busy" in v.reason  # one interval over the threshold
    assert not idle_verdict(_series([0.0] * 31, packets=[5] * 31 + [6]), 60.0, 2.0).park
    assert idle_verdict(_series([0.0] * 31, packets=[5] * 32), 60.0, 2.0).park  # counters that do not move
    assert not idle_verdict(_series([0.0] * 31, requests=[0] * 31 + [1]), 60.0, 2.0).park
    assert not idle_verdict(_series([0.0] * 31, load=0.8), 60.0, 2.0).park
    s = _series([0.0] * 31)
    s[10] = IdleSample(s[10].t, True, None, None, 0)
    assert not idle_verdict(s, 60.0, 2.0).park  # a vCPU time not read in the window
    s = _series([0.0] * 40)
    s[15] = IdleSample(s[15].t, False, None, None, 0)  # paused (parked, woken) 50 s ago: window restarts
    assert not idle_verdict(s, 60.0, 2.0).park
    assert not idle_verdict([], 60.0, 2.0).park


samples_st = st.lists(st.tuples(st.floats(0.1, 10.0), st.floats(0.0, 50.0), st.integers(0, 3), st.integers(0, 2),
                                st.booleans()), min_size=1, max_size=40)


def _build(raw: list[tuple[float, float, int, int, bool]]) -> list[IdleSample]:
    t, v, pk, rq, out = 0.0, 0.0, 0, 0, []
    for dt, pct, dp, dr, running in raw:
        t += dt
        v += pct / 100.0 * dt
        pk += dp
        rq += dr
        out.append(IdleSample(t, running, v, pk, rq))
    return out


@settings(max_examples=300, deadline=None)
@given(samples_st, st.floats(1.0, 60.0), st.floats(0.5, 20.0))
def test_a_park_means_every_interval_of_a_long_enough_window_was_quiet(raw, after: float, thr: float) -> None:
    s = _build(raw)
    v = idle_verdict(s, after, thr)
    if not v.park:
        return
    # the window, by its definition: back to the newest sample at least idle_after_s old
    old = [i for i, x in enumerate(s) if s[-1].t - x.t >= after]
    assert old, "parked before idle_after_s of samples"
    win = s[old[-1]:]
    assert all(x.running for x in win)
    for a, b in zip(win, win[1:], strict=False):
        assert (b.vcpu_s - a.vcpu_s) / (b.t - a.t) * 100.0 < thr + 1e-6  # type: ignore[operator]
        assert b.net_packets == a.net_packets and b.requests == a.requests


@settings(max_examples=200, deadline=None)
@given(samples_st, st.floats(1.0, 60.0), st.floats(0.5, 20.0), st.floats(1.0, 3.0))
def test_a_higher_threshold_or_a_shorter_wait_never_turns_a_park_into_a_stay(raw, after, thr, k) -> None:
    s = _build(raw)
    if idle_verdict(s, after, thr).park:
        assert idle_verdict(s, after, thr * k).park
        assert idle_verdict(s, after / k, thr).park


# -- the part -------------------------------------------------------------------------------------
class GatewayAgents(FakeAgents):
    """FakeAgents with the real gateway's hook: ``before_call`` runs before each call."""

    def __init__(self, replies: dict[Any, Any]) -> None:
        super().__init__(replies)
        self.before_call: Any = None

    def set_before_call(self, hook: Any) -> None:
        self.before_call = hook

    async def call(self, vm: str, op: str, args: dict[str, Any] | None = None, **kw: Any) -> tuple[Any, bytes]:
        if self.before_call is not None:
            await self.before_call(vm, op)
        return await super().call(vm, op, args, **kw)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _env(tmp_path: Path, **paging: Any) -> tuple[Env, PagingPart, FakeDomain, Clock]:
    cfg = Config(state_dir=str(tmp_path))
    cfg.paging = PagingConfig(enabled=True, zram_size_mib=256, park_observe_s=0.0, idle_park=True,
                              idle_after_s=10.0, idle_cpu_pct=2.0, **paging)
    dom = FakeDomain("vm1", qemu_pid=PID, vcpu_seconds=50.0, interfaces=["vnet7"])
    host = FakeHost(dom)
    host.net["vnet7"] = 100
    host.add_process(PID, [Mapping(RAM, RAM + 512 * MIB, "rw-p", "")])
    env = Env(tmp_path, cfg=cfg, host=host, agents=GatewayAgents({"core.ping": {"pong": True}}))
    part = env.add(PagingPart)
    clock = Clock()
    part.clock = clock  # type: ignore[method-assign]
    env.register("vm1")
    return env, part, dom, clock  # type: ignore[return-value]


async def _periods(env: Env, clock: Clock, dom: FakeDomain, n: int, cpu_pct: float = 0.5, dt: float = 2.0) -> None:
    for _ in range(n):
        clock.t += dt
        dom.vcpu_seconds = (dom.vcpu_seconds or 0.0) + cpu_pct / 100.0 * dt
        env.core.snapshots["vm1"] = env.snapshot_of("vm1")
        await env.period()
        for t in list(env.parts["paging"]._tasks):  # type: ignore[attr-defined]
            await t


def _actions(env: Env) -> list[str]:
    return [d["action"] for d in env.store.decisions("vm1") if d["part"] == "paging"]


def test_an_idle_vm_is_parked_by_the_policy_with_its_inputs_and_its_tap_watched(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, dom, clock = _env(tmp_path)
        await env.start()
        await _periods(env, clock, dom, 5)  # 8 s of 10
        assert part.parked_vms() == set() and "idle for 8 of 10 s" in part.idle_last["vm1"].reason
        await _periods(env, clock, dom, 1)
        assert part.parked_vms() == {"vm1"} and dom.state == "paused"
        park = [d for d in env.store.decisions("vm1") if d["action"] == "park"][-1]
        assert park["inputs"]["reason"].startswith("idle policy: idle for 10 s")
        assert park["inputs"]["idle"]["vcpu_peak_pct"] == 0.5 and park["inputs"]["idle"]["tap_packets"] == 0
        assert env.host.tap_watches["vm1"][0] == ["vnet7"]
        await _periods(env, clock, dom, 10)  # parked: sampled no more, not parked twice
        assert _actions(env).count("park") == 1 and part.idle_samples["vm1"] == type(part.idle_samples["vm1"])()
    asyncio.run(go())


def test_a_busy_vm_or_one_with_traffic_stays_running(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, dom, clock = _env(tmp_path)
        await env.start()
        await _periods(env, clock, dom, 8, cpu_pct=3.0)
        assert part.parked_vms() == set() and "busy" in part.idle_last["vm1"].reason
        for _ in range(8):
            env.host.net["vnet7"] += 1
            await _periods(env, clock, dom, 1)
        assert part.parked_vms() == set() and "frames on its tap" in part.idle_last["vm1"].reason
    asyncio.run(go())


def test_an_agent_call_from_outside_wakes_a_parked_vm_first_and_counts_as_activity(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, dom, clock = _env(tmp_path)
        await env.start()
        await _periods(env, clock, dom, 6)
        assert dom.state == "paused"
        reply, _ = await env.agents.call("vm1", "core.ping", {})  # e.g. an API handler's call
        assert reply == {"pong": True} and dom.state == "running" and part.parked_vms() == set()
        wake = [d for d in env.store.decisions("vm1") if d["action"] == "wake"][-1]
        assert wake["inputs"]["reason"] == "agent call core.ping" and wake["outcome"]["answered"]
        assert "vm1" not in env.host.tap_watches and part.requests["vm1"] == 1
        # idle again for idle_after_s: parked again
        await _periods(env, clock, dom, 6)
        assert dom.state == "paused" and _actions(env).count("park") == 2
    asyncio.run(go())


def test_the_control_loops_own_calls_never_wake_a_parked_vm(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, dom, clock = _env(tmp_path)
        await env.start()
        await _periods(env, clock, dom, 6)
        assert dom.state == "paused"

        class Poller:  # a part that polls every VM's agent each period, paused or not
            name = "poller"
            errors: list[Exception] = []

            async def observe(self, period: Period) -> None:
                try:
                    await env.agents.call("vm1", "core.ping", {})
                except AgentError as exc:
                    self.errors.append(exc)

            def decide(self, obs: Any) -> None:
                return None

            async def act(self, d: Any) -> None:
                return None

        poller = Poller()
        await run_period({"poller": poller}, Period(99))  # type: ignore[dict-item]
        assert dom.state == "paused" and part.parked_vms() == {"vm1"}
        assert isinstance(poller.errors[0], NoAgent) and "parked" in str(poller.errors[0])
        assert part.requests.get("vm1", 0) == 0
    asyncio.run(go())


def test_a_frame_on_its_tap_wakes_a_parked_vm(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, dom, clock = _env(tmp_path)
        await env.start()
        await _periods(env, clock, dom, 6)
        assert dom.state == "paused"
        assert env.host.frame("vnet7")  # the watcher's callback, as from its thread
        for _ in range(50):
            await asyncio.sleep(0.01)
            if dom.state == "running" and not part._tasks:
                break
        assert dom.state == "running" and part.parked_vms() == set()
        wake = [d for d in env.store.decisions("vm1") if d["action"] == "wake"][-1]
        assert wake["inputs"]["reason"] == "frame on tap vnet7"
    asyncio.run(go())


def test_concurrent_requests_share_one_wake(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, dom, clock = _env(tmp_path)
        await env.start()
        await _periods(env, clock, dom, 6)
        outs = await asyncio.gather(*(part.ensure_awake("vm1", "test") for _ in range(3)))
        assert outs[0] is not None and all(o is outs[0] for o in outs)
        assert _actions(env).count("wake") == 1 and dom.state == "running"
    asyncio.run(go())


def test_idle_park_without_a_tier_does_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        env, part, dom, clock = _env(tmp_path)
        part.cfg.enabled = False
        await env.start()
        await _periods(env, clock, dom, 10)
        assert part.parked_vms() == set() and dom.state == "running"
    asyncio.run(go())


# -- the ping route ---------------------------------------------------------------------------------
def _client(env: Env) -> TestClient:
    from symbiont.api import create_app

    return TestClient(create_app(types.SimpleNamespace(parts=env.parts)))  # type: ignore[arg-type]


def test_ping_wakes_a_parked_vm_and_answers(tmp_path: Path) -> None:
    env, part, dom, clock = _env(tmp_path)
    asyncio.run(env.start())
    with _client(env) as c:
        r = c.post("/v1/vms/vm1/ping")
        assert r.status_code == 200 and r.json()["woke"] is False and r.json()["wake"] is None
        asyncio.run(_periods(env, clock, dom, 6))
        assert dom.state == "paused"
        r = c.post("/v1/vms/vm1/ping")
        body = r.json()
        assert r.status_code == 200, body
        assert body["vm"] == "vm1" and body["woke"] is True and body["wake"]["answered"] is True
        assert body["seconds"] >= body["wake"]["latency_s"] and dom.state == "running"


def test_ping_of_an_unknown_vm_is_404_and_of_one_without_agent_409(tmp_path: Path) -> None:
    env, part, dom, clock = _env(tmp_path)
    asyncio.run(env.start())
    env.agents.down.add("vm1")
    with _client(env) as c:
        r = c.post("/v1/vms/nope/ping")
        assert r.status_code == 404 and "not registered" in r.json()["detail"]
        r = c.post("/v1/vms/vm1/ping")
        assert r.status_code == 409 and "no agent" in r.json()["detail"]
        r = c.post("/v1/vms/-bad/ping")
        assert r.status_code == 422
    assert [d for d in env.store.decisions() if d["part"] == "paging" and d["vm"]] == []


def test_the_gateway_runs_its_hook_before_looking_at_the_link() -> None:
    seen: list[tuple[str, str]] = []

    async def hook(vm: str, op: str) -> None:
        seen.append((vm, op))
        raise NoAgent(f"{vm}: parked")

    gw = AgentGateway({})
    gw.set_before_call(hook)
    with pytest.raises(NoAgent, match="parked"):
        asyncio.run(gw.call("vm1", "ping", {}))
    assert seen == [("vm1", "core.ping")]  # canonical name, and before the missing link was noticed
    gw.set_before_call(None)
    with pytest.raises(NoAgent, match="no agent channel"):
        asyncio.run(gw.call("vm1", "ping", {}))


def test_the_idle_policy_can_be_changed_for_this_run_and_bad_input_changes_nothing(tmp_path: Path) -> None:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from symbiont.errors import DaemonError
    from symbiont.paging.api import router

    env, part, dom, clock = _env(tmp_path)
    part.cfg.idle_park = False
    app = FastAPI()
    app.state.parts = env.parts

    @app.exception_handler(DaemonError)
    async def _err(_r: Request, exc: DaemonError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    app.include_router(router, prefix="/v1/paging")
    c = TestClient(app)
    for bad in ({"idle_after_s": 0.5}, {"idle_cpu_pct": 0}, {"idle_cpu_pct": 101}, {"idle_park": "yes"},
                {"idle_after_s": 5, "x": 1}):
        r = c.put("/v1/paging/policy", json=bad)
        assert r.status_code == 422, bad
    assert not part.cfg.idle_park and part.cfg.idle_after_s == 10.0 and env.store.decisions() == []
    r = c.put("/v1/paging/policy", json={"idle_park": True, "idle_after_s": 4, "idle_cpu_pct": 5})
    assert r.status_code == 200 and r.json() == {"idle_park": True, "idle_after_s": 4.0, "idle_cpu_pct": 5.0}
    asyncio.run(env.start())
    asyncio.run(_periods(env, clock, dom, 3, cpu_pct=4.0))  # 4 s under 5 %: parked
    assert dom.state == "paused"
    assert [d["action"] for d in env.store.decisions()][0] == "idle-policy"
