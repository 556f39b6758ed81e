"""The guest floor (issue 16 item 12): no path may balloon a guest below what it needs to live."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.errors import Invalid
from symbiont.host.fake import FakeDomain
from symbiont.memory.config import MemoryConfig
from symbiont.memory.floor import (
    ABSOLUTE_FLOOR_MIB,
    MAX_MIB,
    GuestFloor,
    enforce_floor,
    floor_of,
    guest_floor,
    kernel_reserve_mib,
    margin_mib,
    min_free_kbytes,
    observed_reserve_mib,
)
from symbiont.memory.part import MemoryPart
from tests.fakes import Env

MIB = 1 << 20


def snap(boot=512, target=512, actual=512, memtotal_kib=480512, avail_mib=407.0) -> dict:
    """A daemon snapshot as the lab guest reported it (full size: MemTotal 480512 kB)."""
    return {"libvirt": {"state": "running", "max_memory_mib": boot, "memory_mib": target,
                        "memstats_kib": {"actual": actual * 1024}},
            "agent": {"meminfo": {"MemTotal": memtotal_kib * 1024, "MemAvailable": int(avail_mib * MIB)}}}


def enforce(latest: dict, name: str, mem_policy: dict | None, target_mib: int) -> int:
    """What MemoryPart.set_balloon checks, for a VM whose reserve was never recorded."""
    s = latest.get(name, {})
    return enforce_floor(floor_of(s, None, mem_policy), s, name, target_mib)


def test_min_free_kbytes_is_the_kernels_default() -> None:
    # The lab guest (480512 kB MemTotal) runs with min_free_kbytes 2704; the kernel computes it
    # from its low memory, a little below MemTotal: our estimate is within 3 %.
    assert abs(min_free_kbytes(480512) - 2704) / 2704 < 0.03
    assert min_free_kbytes(0) == 128 and min_free_kbytes(1 << 40) == 262144


def test_kernel_reserve_from_the_lab_guest() -> None:
    """Measured on the lab guest: boot 512, MemTotal 469 MiB at full size and 341 MiB at a
    384 MiB balloon target: MemTotal shrinks with the balloon, so actual − MemTotal is the reserve
    at any size; with deflate-on-oom MemTotal stays, and boot − MemTotal is."""
    assert kernel_reserve_mib(512, 512, 469.25) == pytest.approx(42.75)
    assert kernel_reserve_mib(512, 384, 341.25) == pytest.approx(42.75)
    assert kernel_reserve_mib(512, 384, 469.25, deflate_on_oom=True) == pytest.approx(42.75)
    assert kernel_reserve_mib(512, 512, 900) == 0.0 and kernel_reserve_mib(512, 512, -5) == 512
    assert observed_reserve_mib(snap()) == pytest.approx(42.75)
    assert observed_reserve_mib(snap(target=384, actual=384, memtotal_kib=349440)) == pytest.approx(42.75)
    # While the balloon moves, MemTotal and QEMU's actual are read at different moments: no reading.
    assert observed_reserve_mib(snap(target=256, actual=384, memtotal_kib=349440)) is None
    assert observed_reserve_mib({"libvirt": {}}) is None


def test_the_item_12_shrink_is_below_the_floor() -> None:
    """A 512 MiB guest with 60 MiB used and a 43 MiB reserve: 75 MiB leaves it 32 MiB of MemTotal
    for 60 MiB of used memory (it panicked). Its floor keeps reserve + used + margin."""
    fl = guest_floor(512, 43, 60)
    assert fl.floor_mib == math.ceil(43 + 60 + margin_mib(512 - 43)) == 141
    assert fl.floor_mib > 75
    assert "kernel reserve 43 + used 60 + margin 37" in fl.reason()
    # An idle guest with little in use still keeps the measured absolute floor.
    assert guest_floor(512, 43, 10).floor_mib == ABSOLUTE_FLOOR_MIB
    # Nothing sampled yet: the default reserve, the absolute floor.
    assert guest_floor(512, None, None).floor_mib == ABSOLUTE_FLOOR_MIB
    # A floor never exceeds the boot memory: such a VM is just not shrunk.
    assert guest_floor(512, 43, 500).floor_mib == 512


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9)
anyf = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), finite)


@settings(max_examples=500, deadline=None)
@given(anyf, anyf, anyf, anyf, finite)
def test_no_target_below_the_floor_for_any_input(boot, reserve, used, min_mib, target) -> None:
    """Whatever the (untrusted) inputs: the floor is a whole MiB, at least the absolute floor and
    reserve + used + margin (capped at a known boot memory), and clamping gives a target ≥ it."""
    fl = guest_floor(boot, reserve, used, min_mib)
    assert isinstance(fl.floor_mib, int)
    b = min(boot, MAX_MIB) if isinstance(boot, float) and math.isfinite(boot) and boot > 0 else None
    want = max(ABSOLUTE_FLOOR_MIB, fl.reserve_mib + (fl.used_mib or 0.0) + fl.margin_mib)
    if b is None:
        assert fl.floor_mib >= want
    else:
        assert fl.floor_mib >= min(want, math.floor(b)) and fl.floor_mib <= b
    assert fl.reserve_mib >= 0 and (fl.used_mib is None or fl.used_mib >= 0)
    assert max(target, fl.floor_mib) >= fl.floor_mib


def test_the_part_floor_uses_the_recorded_reserve_and_the_latest_sample(tmp_path) -> None:
    env = Env(tmp_path)
    env.register("v", {"memory": {"min_mib": 64}}, snapshot=snap())
    part = env.add(MemoryPart, MemoryConfig())
    # First sample after registration, at rest at full size: the reserve is recorded...
    part.record_reserves(["v"])
    assert part.state.vms["v"].kernel_reserve_mib == pytest.approx(42.75)
    # ...and kept while the balloon moves (then nothing is observable), used from the latest.
    env.core.snapshots["v"] = snap(target=200, actual=260, memtotal_kib=300 * 1024, avail_mib=240)
    part.record_reserves(["v"])
    fl = part.floor("v")
    assert fl.reserve_mib == pytest.approx(42.75) and fl.used_mib == pytest.approx(60)
    assert fl.floor_mib == 141
    # Unregistered: forgotten (a new registration of the name may be another guest).
    part.record_reserves([])
    assert "v" not in part.state.vms
    # No reserve recorded: the one observable now.
    assert floor_of(snap(avail_mib=409.25), None).reserve_mib == pytest.approx(42.75)
    env.close()


def test_enforce_refuses_a_shrink_below_the_floor_with_its_make_up() -> None:
    d = {"v": snap(avail_mib=409.25)}  # used 60 MiB
    with pytest.raises(Invalid, match=r"target_mib 75 below the safe floor of VM 'v': guest floor 141 MiB = "
                                      r"max\(absolute 128, kernel reserve 43 \+ used 60 \+ margin 37\)"):
        enforce(d, "v", {"min_mib": 64}, 75)
    assert enforce(d, "v", {}, 141) == 141 and enforce(d, "v", {}, 400) == 141
    # The VM's own minimum counts too.
    assert enforce(d, "v", {"min_mib": 300}, 300) == 300
    with pytest.raises(Invalid):
        enforce(d, "v", {"min_mib": 300}, 200)
    # A guest already below its floor (ballooned before it used more) may grow toward it.
    d["v"] = snap(target=100, actual=100, memtotal_kib=57 * 1024, avail_mib=0)
    assert enforce(d, "v", {}, 120) == 120
    with pytest.raises(Invalid):
        enforce(d, "v", {}, 90)


def test_the_balloon_lever_uses_the_floor(tmp_path) -> None:
    """Every balloon path (PUT /v1/vms/{n}/memory, the policy, the CPU part and plans) ends in
    MemoryPart.set_balloon: 75 MiB is refused with the floor's reason and the balloon never moves."""
    env = Env(tmp_path, FakeDomain("v", memory_kib=512 << 10, max_memory_kib=512 << 10))
    env.register("v", {"memory": {"min_mib": 64}}, snapshot=snap(avail_mib=409.25))
    part = env.add(MemoryPart, MemoryConfig())
    with pytest.raises(Invalid, match="below the safe floor of VM 'v': guest floor 141 MiB"):
        asyncio.run(part.set_balloon("v", 75))
    assert env.host.calls == [] and env.knobs.rows() == []
    env.close()


def test_guest_floor_to_dict() -> None:
    d = GuestFloor(141, 42.75, 60.0, 37.4, 128.0, 512.0).to_dict()
    assert d["floor_mib"] == 141 and d["reason"].startswith("guest floor 141 MiB")


def test_api_refuses_the_item_12_shrink_and_shows_the_floor(tmp_path) -> None:
    """Through the real app and Daemon (libvirt faked, no control loop): PUT 75 MiB is a 422 with
    the floor's make-up and the balloon does not move; GET /v1/memory/vms/{n}/floor shows it."""
    from fastapi.testclient import TestClient

    from symbiont.api import create_app
    from symbiont.config import load_config
    from symbiont.daemon import Daemon
    from symbiont.host.fake import FakeHost

    host = FakeHost(FakeDomain("vm1", memory_kib=512 << 10, max_memory_kib=512 << 10))
    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "api.sock")})
    d = Daemon(cfg, host=host)
    d.store.add_vm("vm1", "uuid-vm1", {"memory": {"min_mib": 64}})
    d.latest["vm1"] = snap(avail_mib=409.25)  # the lab guest with 60 MiB in use
    client = TestClient(create_app(d), raise_server_exceptions=False)
    try:
        r = client.put("/v1/vms/vm1/memory", json={"target_mib": 75})
        assert r.status_code == 422, r.text
        assert "below the safe floor of VM 'vm1': guest floor 141 MiB" in r.text and host.calls == []
        f = client.get("/v1/memory/vms/vm1/floor").json()
        assert f["floor_mib"] == 141 and f["reserve_mib"] == pytest.approx(42.8, abs=0.1) and f["used_mib"] == 60
        assert client.get("/v1/memory/vms/nope/floor").status_code == 404
        assert client.get("/v1/memory").json()["vms"][0]["floor"]["floor_mib"] == 141
        r = client.put("/v1/vms/vm1/memory", json={"target_mib": 141})
        assert r.status_code == 200 and host.calls == [("set_balloon", "vm1", 141 * 1024)]
    finally:
        d.store.close()
