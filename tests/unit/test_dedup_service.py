"""The dedup part around the engine, without root: the KSM adapter and controller on a fake sysfs
tree, the part (through a host port over that tree) and its API (opt-in, save-before-change, restore, crash recovery,
decisions logged), reading a live process's memory through /proc, and the CLI."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi import FastAPI

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from symbiont.dedup.api import router
from symbiont.dedup.backends import PAGE_SIZE
from symbiont.dedup.cli import group as cli_group
from symbiont.dedup.engine import Engine
from symbiont.dedup.ksm_controller import KsmController, LedgerKnobStore, MemoryKnobStore
from symbiont.dedup.memsource import ProcessMemorySource, find_guest_ram, parse_smaps, read_smaps
from symbiont.dedup.part import DedupPart
from symbiont.dedup.policy import KsmSettings
from symbiont.dedup.service import Mode, ModeError, vm_settings
from symbiont.host.fake import FakeHost
from symbiont.host.ksm import Ksm, KsmError, ksmd_pid, process_cpu_seconds, process_ksm_stat
from symbiont.knobs import KnobLedger
from symbiont.state import StateStore
from tests.fakes import Env

SYSFS = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "max_page_sharing": "256", "use_zero_pages": "0",
    "advisor_mode": "[none] scan-time", "pages_shared": "0", "pages_sharing": "0", "pages_unshared": "0",
    "pages_volatile": "0", "full_scans": "3", "ksm_zero_pages": "0",
}  # fmt: skip


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    d = tmp_path / "ksm"
    d.mkdir()
    for k, v in SYSFS.items():
        (d / k).write_text(v + "\n")
    return d


def _files(d: Path) -> dict[str, str]:
    return {k: (d / k).read_text().strip() for k in SYSFS}


class BusyKsm(Ksm):
    """Like the kernel: max_page_sharing refuses to change while pages are merged; run=2 unmerges."""

    def write(self, name: str, value: int | str) -> None:
        if name == "max_page_sharing" and self.read_int("pages_shared") > 0:
            raise KsmError("busy")
        super().write(name, value)
        if name == "run" and int(value) == 2:
            (self.root / "pages_shared").write_text("0\n")


# -- adapter and controller -----------------------------------------------------------------------
def test_adapter_reads_settings_and_counters(sysfs: Path) -> None:
    k = Ksm(sysfs)
    assert k.available() and k.read("advisor_mode") == "none" and k.read_int("pages_to_scan") == 100
    assert k.tunables()[-1] == "run" and "smart_scan" not in k.tunables()
    st = k.stats()
    assert st.full_scans == 3 and st.pages_scanned is None and st.saved_bytes == 0
    k.write("pages_to_scan", 777)
    assert (sysfs / "pages_to_scan").read_text() == "777\n"
    with pytest.raises(KsmError, match="not a KSM tunable"):
        k.write("pages_shared", 1)
    with pytest.raises(KsmError, match="no KSM file"):
        k.read("nonexistent")
    (sysfs / "full_scans").unlink()
    with pytest.raises(KsmError, match="full_scans is missing"):
        k.stats()
    assert not Ksm(sysfs / "nope").available()


def test_controller_saves_first_originals_durably_and_restores_them(sysfs: Path, tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    ctl = KsmController(Ksm(sysfs), LedgerKnobStore(KnobLedger(store)))
    assert ctl.apply(KsmSettings(1, 1000, 10)) == {"pages_to_scan": (100, 1000), "sleep_millisecs": (20, 10),
                                                   "run": (0, 1)}  # fmt: skip
    ctl.apply(KsmSettings(1, 2000, 10))
    assert ctl.set("use_zero_pages", 1) and not ctl.set("use_zero_pages", 1)
    assert ctl.originals == {"pages_to_scan": 100, "sleep_millisecs": 20, "run": 0, "use_zero_pages": 0}
    # a "crash": a new controller on the same database still knows the originals
    ctl2 = KsmController(Ksm(sysfs), LedgerKnobStore(KnobLedger(store)))
    assert ctl2.originals == ctl.originals
    res = ctl2.restore()
    assert all("restored" in v for v in res.values()), res
    assert _files(sysfs) == SYSFS
    assert KsmController(Ksm(sysfs), LedgerKnobStore(KnobLedger(store))).originals == {}


def test_restore_unmerges_for_busy_knobs_only_if_ksm_was_off(sysfs: Path) -> None:
    ctl = KsmController(BusyKsm(sysfs), MemoryKnobStore())
    ctl.set("max_page_sharing", 512)
    ctl.apply(KsmSettings(1, 100, 20))
    (sysfs / "pages_shared").write_text("42\n")  # pages got merged meanwhile
    res = ctl.restore()  # KSM was off before: unmerging to restore is what the host had
    assert res["max_page_sharing"] == {"restored": 256, "was": 512}
    assert _files(sysfs)["run"] == "0" and _files(sysfs)["pages_shared"] == "0"
    # KSM was running before we came: do not unmerge; report and keep the original saved
    (sysfs / "run").write_text("1\n")
    ctl = KsmController(BusyKsm(sysfs), MemoryKnobStore())
    ctl.set("max_page_sharing", 128)
    (sysfs / "pages_shared").write_text("42\n")
    res = ctl.restore()
    assert "error" in res["max_page_sharing"] and ctl.originals == {"max_page_sharing": 256}
    assert _files(sysfs)["run"] == "1" and _files(sysfs)["pages_shared"] == "42"
    # setting a busy knob with unmerge=True unmerges first (and remembers run)
    ctl2 = KsmController(BusyKsm(sysfs), MemoryKnobStore())
    assert ctl2.set("max_page_sharing", 64, unmerge=True)
    assert ctl2.originals["run"] == 1 and (sysfs / "max_page_sharing").read_text().strip() == "64"


def test_unmerge_on_restore_leaves_nothing_merged(sysfs: Path) -> None:
    ctl = KsmController(BusyKsm(sysfs), MemoryKnobStore(), unmerge_on_restore=True)
    ctl.apply(KsmSettings(1, 5000, 10))
    (sysfs / "pages_shared").write_text("7\n")
    ctl.restore()
    assert _files(sysfs) == SYSFS


def test_proc_parsers(tmp_path: Path) -> None:
    (tmp_path / "37").mkdir()
    (tmp_path / "37" / "comm").write_text("ksmd\n")
    (tmp_path / "37" / "stat").write_text("37 (ksmd) S 2 0 0 0 -1 2129984 0 0 0 0 250 130 0 0 25 5 1 0 6 0 0\n")
    (tmp_path / "400").mkdir()
    (tmp_path / "400" / "comm").write_text("qemu\n")
    (tmp_path / "400" / "stat").write_text("400 (qemu) S 1 0 0 0 -1 0 0 0 0 0 10 10 0 0 20 0 1 0 6 0 0\n")
    (tmp_path / "400" / "ksm_stat").write_text("ksm_rmap_items 10\nksm_merging_pages 7\nksm_mergeable: yes\n")
    assert ksmd_pid(tmp_path) == 37
    assert process_cpu_seconds(37, tmp_path) == pytest.approx(380 / os.sysconf("SC_CLK_TCK"))
    assert process_ksm_stat(400, tmp_path) == {"ksm_rmap_items": 10, "ksm_merging_pages": 7, "ksm_mergeable": True}
    assert process_ksm_stat(999, tmp_path) is None


SMAPS = """\
55be3429b000-55be356e1000 rw-p 00000000 00:00 0                          [heap]
Rss:                5644 kB
VmFlags: rd wr mr mw me ac
7ff1afe00000-7ff1bfe00000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              196608 kB
VmFlags: rd wr mr mw me dc ac dd hg mg
7ff1c0000000-7ff1d0000000 rwxp 00000000 00:00 0
Rss:               32764 kB
VmFlags: rd wr ex mr mw me ac hg
7ff1e0000000-7ff1f0000000 rw-p 00000000 00:00 0
Rss:                   4 kB
VmFlags: rd wr mr mw me ac
7ff200000000-7ff200001000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
VmFlags: rd mr mw me
"""


def test_guest_ram_is_the_mapping_of_the_guest_size_not_the_largest() -> None:
    maps = parse_smaps(SMAPS)
    assert len(maps) == 5 and maps[4].path == "/usr/lib/libc.so.6" and not maps[4].anonymous
    ram = find_guest_ram(maps, 256 << 20)
    assert ram is not None and ram.start == 0x7FF1AFE00000 and ram.mergeable and ram.rss_kib == 196608
    # the executable TCG buffer is as large, and a plain rw anonymous mapping too: size match + no exec wins
    assert find_guest_ram(maps, 512 << 20) is None
    assert find_guest_ram(maps, None).size == 256 << 20  # type: ignore[union-attr]


def test_process_memory_source_reads_this_process() -> None:
    n = 64
    m = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=np.uint8).reshape(n, PAGE_SIZE)
    rng = np.random.default_rng(9)
    a[:] = rng.integers(0, 256, size=a.shape, dtype=np.uint8)
    a[40:50] = a[3]  # 10 copies of page 3
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        maps = [x for x in read_smaps(os.getpid()) if x.start <= addr < x.end]
        assert maps and maps[0].anonymous
        src = ProcessMemorySource("me", os.getpid(), [(addr, addr + n * PAGE_SIZE)])
        assert src.npages == n and src.range_pages == n
        rep = Engine(batch_pages=16, confirm_pages=8).scan([src])
        assert rep.saveable == 10 and rep.regions[0]["pages"] == 10
        assert np.array_equal(src.read(np.array([45, 3])), a[[45, 3]])
        src.close()
    finally:
        del a
        m.close()


# -- the daemon service and its API ---------------------------------------------------------------
class KsmDirHost(FakeHost):
    """The shared fake host with KSM's sysfs from a directory (the kernel's files as written)."""

    def __init__(self, ksm: Ksm) -> None:
        super().__init__()
        self.k = ksm

    def ksm_available(self) -> bool:
        return self.k.available()

    def ksm_has(self, name: str) -> bool:
        return self.k.has(name)

    def ksm_read(self, name: str) -> int | str:
        return self.k.read(name)

    def ksm_write(self, name: str, value: int | str) -> None:
        self.k.write(name, value)

    def ksm_settings(self) -> dict[str, int | str]:
        return self.k.settings()

    def ksm_stats(self) -> Any:
        return self.k.stats()


def _part(tmp_path: Path, sysfs: Path) -> tuple[Env, DedupPart]:
    """A daemon's dedup part over ``sysfs``, started (a second call: the daemon restarted)."""
    import asyncio

    env = Env(tmp_path, host=KsmDirHost(Ksm(sysfs)))
    part = env.add(DedupPart)
    asyncio.run(env.start())
    return env, part


def _stop(env: Env, part: DedupPart) -> None:
    """The daemon stopping: the part, then the ledger's restore of host-wide knobs."""
    import asyncio

    async def run() -> None:
        await part.stop()
        await env.knobs.restore(vm="", reason="daemon stopping")

    asyncio.run(run())


@pytest.fixture
def app(sysfs: Path, tmp_path: Path):
    env, part = _part(tmp_path, sysfs)
    fa = FastAPI()
    fa.state.parts = env.parts
    fa.include_router(router, prefix="/v1/dedup")
    with TestClient(fa) as c:
        yield c, part, env
    env.close()


def test_plain_start_only_observes(app: Any, sysfs: Path) -> None:
    c, svc, _ = app
    import asyncio

    asyncio.run(svc.start())
    asyncio.run(svc.tick())
    st = c.get("/v1/dedup/status").json()
    assert st["available"] and st["policy"]["policy"] == "off" and not st["active"]
    assert st["ksm"]["full_scans"] == 3 and st["originals"] == {}
    assert _files(sysfs) == SYSFS


def test_api_policy_turns_knobs_logs_and_restores(app: Any, sysfs: Path, tmp_path: Path) -> None:
    c, svc, daemon = app
    r = c.put("/v1/dedup/policy", json={"policy": "fixed", "pages_to_scan": 1234, "sleep_millisecs": 17,
                                        "use_zero_pages": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    f = _files(sysfs)
    assert (f["pages_to_scan"], f["sleep_millisecs"], f["run"], f["use_zero_pages"]) == ("1234", "17", "1", "1")
    assert r.json()["originals"] == {"pages_to_scan": 100, "sleep_millisecs": 20, "run": 0, "use_zero_pages": 0}
    acts = [d["action"] for d in c.get("/v1/dedup/decisions").json()]
    assert "policy" in acts and "ksm-apply" in acts
    apply = next(d for d in c.get("/v1/dedup/decisions").json() if d["action"] == "ksm-apply")
    assert apply["inputs"]["settings"] == {"run": 1, "pages_to_scan": 1234, "sleep_millisecs": 17}
    assert apply["outcome"]["changed"]["pages_to_scan"] == [100, 1234]
    # the daemon is killed here; a new one restores at start, then resumes the persisted policy
    import asyncio

    env2, svc2 = _part(tmp_path, sysfs)
    assert svc2.api_mode is not None and svc2.api_mode.policy == "fixed"
    assert _files(sysfs) == SYSFS
    assert any(d["action"] == "restore" and "previous run" in d["inputs"]["reason"]
               for d in c.get("/v1/dedup/decisions").json())  # fmt: skip
    asyncio.run(svc2.tick())
    assert _files(sysfs)["pages_to_scan"] == "1234"
    _stop(env2, svc2)  # daemon stopping
    assert _files(sysfs) == SYSFS
    env2.close()
    # and through the API: DELETE restores
    c.put("/v1/dedup/policy", json={"policy": "stock"})
    assert _files(sysfs)["run"] == "1"
    assert c.delete("/v1/dedup/policy").status_code == 200
    assert _files(sysfs) == SYSFS and c.get("/v1/dedup/status").json()["policy"]["policy"] == "off"


def test_policy_requests_are_validated(app: Any, sysfs: Path) -> None:
    c, _, _ = app
    bad = [
        {"policy": "fixed"},
        {"policy": "turbo"},
        {"policy": "hint", "hint": {"warp": 9}},
        {"policy": "hint", "hint": {"min_pages": 10, "max_pages": 2}},
        {"policy": "stock", "pages_to_scan": 0},
        {"policy": "stock", "backend": "tpu"},
        {"policy": "stock", "extra": 1},
    ]
    for body in bad:
        r = c.put("/v1/dedup/policy", json=body)
        assert r.status_code == 422, (body, r.text)
    assert _files(sysfs) == SYSFS
    with pytest.raises(ModeError, match="unknown field"):
        Mode.from_dict({"policy": "off", "x": 1})


def test_registration_opt_in_and_per_vm_view(app: Any, sysfs: Path) -> None:
    c, svc, daemon = app
    import asyncio

    daemon.store.add_vm("vm1", "u1", {"extra": {"dedup": {"policy": "stock", "cross_vm": False}}})
    daemon.store.add_vm("vm2", "u2", {"extra": {"dedup": {"policy": "hint", "scan": "yes"}}})
    asyncio.run(svc.tick())
    st = c.get("/v1/dedup/status").json()
    assert st["policy"]["policy"] == "stock" and st["policy"]["source"] == "registration:vm1"
    assert "vm2 asks for hint" in st["notes"][0]
    assert _files(sysfs)["run"] == "1" and _files(sysfs)["pages_to_scan"] == "100"
    vms = {v["name"]: v for v in c.get("/v1/dedup/vms").json()}
    assert vms["vm1"]["running"] is False and vms["vm1"]["cross_vm"] is False
    assert vms["vm2"]["errors"] == ["extra.dedup.scan must be true or false"]
    assert {t["vm"]: t["status"] for t in st["tenants"]} == {"vm1": "stopped", "vm2": "shared"}
    assert c.get("/v1/dedup/vms/nope").status_code == 404
    r = c.post("/v1/dedup/scan", json={"vms": ["vm1"]})
    assert r.status_code == 409 and "not registered and running" in r.json()["detail"]
    assert c.get("/v1/dedup/scan").status_code == 404
    daemon.store.remove_vm("vm1")
    daemon.store.remove_vm("vm2")
    asyncio.run(svc.tick())  # nobody asks any more: off, restored
    assert _files(sysfs) == SYSFS


def test_vm_settings_parsing() -> None:
    assert vm_settings({}) == vm_settings(None) == vm_settings({"extra": {}})
    s = vm_settings({"extra": {"dedup": {"cross_vm": False, "scan": True, "policy": "hint"}}})
    assert (s.cross_vm, s.scan, s.policy, s.errors) == (False, True, "hint", ())
    assert vm_settings({"extra": {"dedup": "on"}}).errors
    assert vm_settings({"extra": {"dedup": {"policy": "x", "foo": 1}}}).errors == (
        "extra.dedup.policy must be one of off, stock, ksmtuned, hint, fixed, advisor", "extra.dedup.foo: unknown option")


def test_api_without_a_running_controller_is_503(tmp_path: Path) -> None:
    fa = FastAPI()
    fa.state.parts = {}
    fa.include_router(router, prefix="/v1/dedup")
    with TestClient(fa) as c:
        assert c.get("/v1/dedup/status").status_code == 503
        assert c.get("/v1/dedup/backends").json()["cpu"]["available"] is True


def test_cli_local_commands() -> None:
    r = CliRunner().invoke(cli_group, ["backends", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["simulated-gpu"]["available"]
    r = CliRunner().invoke(cli_group, ["estimate", "--pid", str(os.getpid())])
    assert r.exit_code != 0 and "no mergeable mappings" in r.output
    r = CliRunner().invoke(cli_group, ["policy", "--help"])
    assert r.exit_code == 0 and "ksmtuned" in r.output


def test_hint_inputs_come_from_the_scan_and_the_vms_own_merging(app: Any) -> None:
    _, svc, _ = app
    from symbiont.dedup.engine import BufferSource
    from symbiont.dedup.ksm_controller import Sample
    from symbiont.host.ksm import KsmStats

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, size=(100, PAGE_SIZE), dtype=np.uint8)
    b = a.copy()  # 100 cross-VM pairs: potential 100, nothing merged (distinct frames)
    c = a.copy()  # a third VM that opted out: its pages do not count
    pf = [np.arange(1, 101, dtype=np.uint64) + k * 1000 for k in range(3)]
    svc.report = Engine().scan([BufferSource("v1", a, pfns=pf[0]), BufferSource("v2", b, pfns=pf[1]),
                                BufferSource("v3", c, pfns=pf[2])])  # fmt: skip
    svc.report_meta = {"merging_pages_at_scan": {"v1": 0, "v2": 0}}
    base = {"running": True, "mergeable": True, "cross_vm": True}
    svc.vms = {"v1": base | {"ksm": {"ksm_merging_pages": 40}}, "v2": base | {"ksm": {"ksm_merging_pages": 40}},
               "v3": base | {"cross_vm": False, "ksm": {}}}  # fmt: skip
    svc.host_mergeable = 500
    sample = Sample(0.0, KsmStats(0, 0, 0, 0, 0), None)
    hi = svc.hint_inputs(sample)
    # 80 of the 200 duplicate pages merged since the scan: 40 frames saved of 100
    assert (hi.potential, hi.remaining, hi.mergeable) == (100, 60, 500)


def test_advisor_policy_writes_its_knobs_and_never_pages_to_scan(sysfs: Path) -> None:
    from symbiont.dedup.policy import AdvisorParams, advisor, stock

    files = {"advisor_target_scan_time": "200", "advisor_max_cpu": "70", "advisor_min_pages_to_scan": "500",
             "advisor_max_pages_to_scan": "30000"}  # fmt: skip
    for k, v in files.items():
        (sysfs / k).write_text(v + "\n")
    ctl = KsmController(Ksm(sysfs), MemoryKnobStore())
    changed = ctl.apply(advisor(AdvisorParams(target_scan_time=60)).settings)
    assert list(changed) == ["advisor_target_scan_time", "advisor_mode", "run"]
    assert (sysfs / "advisor_mode").read_text() == "scan-time\n" and (sysfs / "pages_to_scan").read_text() == "100\n"
    assert ctl.originals["advisor_mode"] == "none"
    ctl.apply(stock().settings)  # back to a plain policy: the advisor goes off
    assert (sysfs / "advisor_mode").read_text() == "none\n"
    ctl.restore()
    assert Ksm(sysfs).read("advisor_mode") == "none" and (sysfs / "advisor_target_scan_time").read_text() == "200\n"
    assert {k: v for k, v in _files(sysfs).items() if k != "advisor_mode"} == {
        k: v for k, v in SYSFS.items() if k != "advisor_mode"}
    # a kernel without the advisor: a clear refusal, nothing written
    (sysfs / "advisor_mode").unlink()
    ctl = KsmController(Ksm(sysfs), MemoryKnobStore())
    with pytest.raises(KsmError, match="no KSM advisor"):
        ctl.apply(advisor().settings)
    assert ctl.originals == {}


def test_mode_advisor_is_validated_and_decided() -> None:
    m = Mode(policy="advisor", advisor={"target_scan_time": 60}).validate()
    assert m.advisor == {"target_scan_time": 60}
    with pytest.raises(ModeError, match="advisor: unknown"):
        Mode(policy="advisor", advisor={"pages": 1}).validate()
    with pytest.raises(ModeError, match="advisor: max_cpu"):
        Mode(policy="advisor", advisor={"max_cpu": 500}).validate()
