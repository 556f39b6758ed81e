"""The guest agent's request handling and CPU onlining (on a sysfs-shaped folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiont_agent import agent, cpus, stats
from symbiont_agent import protocol as proto


def msg(header: dict, payload: bytes = b"") -> proto.Message:
    return proto.FrameReader().feed(proto.encode(header, payload))[0]


def test_ping_echoes_and_counts_payload() -> None:
    reply, payload = agent.handle(msg(proto.request(5, "ping", {"echo": "hi"}), b"abc"))
    assert reply["id"] == 5 and reply["ok"] and reply["result"]["echo"] == "hi"
    assert reply["result"]["payload_len"] == 3 and payload == b""


def test_unknown_op_and_failing_op_answer_with_errors() -> None:
    reply, _ = agent.handle(msg(proto.request(1, "format-disk")))
    assert reply == {"type": "resp", "id": 1, "ok": False,
                     "error": {"code": "unsupported", "message": "unknown op 'format-disk'"}}
    reply, _ = agent.handle(msg(proto.request(2, "online-cpus", {"target": "all"})))
    assert not reply["ok"] and reply["error"]["code"] == "invalid"
    assert "target: expected an integer" in reply["error"]["message"]


def test_host_hello_is_answered_with_agent_hello() -> None:
    reply, _ = agent.handle(msg(proto.hello("host", "0", [])))
    assert reply["type"] == "hello" and reply["role"] == "agent"
    assert {"ping", "stats", "online-cpus"} <= set(reply["caps"])


def test_stats_reads_this_machines_proc() -> None:
    s = stats.collect()
    assert s["meminfo"]["MemTotal"] > 0
    assert s["cpus"]["count_online"] >= 1
    assert "some_avg10" in s["psi"]["cpu"] or s["psi"]["cpu"] == {}


def make_sysfs(root: Path, present: int, online: set[int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(present):
        d = root / f"cpu{i}"
        d.mkdir()
        if i:
            (d / "online").write_text("1\n" if i in online else "0\n")
    (root / "present").write_text(f"0-{present - 1}\n")
    refresh(root)


def refresh(root: Path) -> None:
    on = [0] + [i for i in range(1, 64) if (root / f"cpu{i}" / "online").exists()
                and (root / f"cpu{i}" / "online").read_text().strip() == "1"]
    (root / "online").write_text(",".join(map(str, on)) + "\n")


class SysfsRecorder:
    """Keeps the 'online' list in step with per-CPU writes, as the kernel does."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        orig = cpus._set_online

        def set_online(cpu: int, online: bool, r: str = str(root)) -> bool:
            ok = orig(cpu, online, r)
            refresh(root)
            return ok

        monkeypatch.setattr(cpus, "_set_online", set_online)


def test_online_all_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cpu"
    make_sysfs(root, 4, {1})
    SysfsRecorder(root, monkeypatch)
    r = cpus.online_cpus(None, str(root))
    assert r["onlined"] == [2, 3] and r["online"] == [0, 1, 2, 3]


def test_online_to_target_offlines_highest_first_never_cpu0(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "cpu"
    make_sysfs(root, 4, {1, 2, 3})
    SysfsRecorder(root, monkeypatch)
    r = cpus.online_cpus(1, str(root))
    assert r["offlined"] == [3, 2, 1] and r["online"] == [0]
    with pytest.raises(ValueError, match="outside 1..4"):
        cpus.online_cpus(5, str(root))
    with pytest.raises(ValueError):
        cpus.online_cpus(0, str(root))


def test_parse_cpu_list() -> None:
    assert stats.parse_cpu_list("0-2,5,7-8\n") == [0, 1, 2, 5, 7, 8]
    assert stats.parse_cpu_list("") == []


def test_op_modules_are_discovered(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import symbiont_agent

    mod = Path(symbiont_agent.__file__).parent / "ops_unittest_probe.py"
    mod.write_text(
        "from symbiont_agent.agent import op\n\n\n@op('unittest-probe')\ndef _p(args, payload):\n    return {'ok': 1}\n"
    )
    try:
        assert "ops_unittest_probe" in agent.load_op_modules()
        assert "unittest-probe" in agent.hello_frame()["caps"]
        reply, _ = agent.handle(msg(proto.request(9, "unittest-probe")))
        assert reply["result"] == {"ok": 1}
    finally:
        mod.unlink()
        agent.OPS.pop("unittest-probe", None)


# -- the dispatcher validates with the shared op schema (issue 14 item 4) -----------------------
@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace balloon-prepare's handler by one that records its calls."""
    calls: list[dict] = []

    def fn(args: dict, payload: bytes) -> dict:
        calls.append(args)
        return {"requested_bytes": args["release_mib"] << 20, "freed_bytes": 0, "mem_available_bytes": 1, "steps": []}

    for n in ("memory.balloon-prepare", "balloon-prepare"):
        monkeypatch.setitem(agent.OPS, n, fn)
    return calls


@pytest.mark.parametrize(("args", "field"), [
    ({"release_mib": True}, "release_mib"),        # bool is not an int
    ({"release_mib": "8"}, "release_mib"),
    ({"release_mib": -1}, "release_mib"),
    ({"release_mib": 1 << 40}, "release_mib"),
    ({}, "release_mib"),
    ({"release_mib": 8, "and_then": "rm -rf /"}, "and_then"),
])  # fmt: skip
def test_dispatcher_refuses_malformed_args_with_code_invalid_before_the_handler_runs(
    probe: list[dict], args: dict, field: str
) -> None:
    for i, name in enumerate(("memory.balloon-prepare", "balloon-prepare")):
        reply, _ = agent.handle(msg(proto.request(i, name, args)))
        assert not reply["ok"] and reply["error"]["code"] == "invalid"
        assert f"{field}:" in reply["error"]["message"]
    assert probe == []


def test_dispatcher_serves_canonical_names_and_aliases_alike(probe: list[dict]) -> None:
    for i, name in enumerate(("memory.balloon-prepare", "balloon-prepare")):
        reply, _ = agent.handle(msg(proto.request(i, name, {"release_mib": 2})))
        assert reply["ok"] and reply["result"]["requested_bytes"] == 2 << 20
    assert probe == [{"release_mib": 2}, {"release_mib": 2}]


def test_dispatcher_refuses_a_payload_the_op_does_not_take() -> None:
    reply, _ = agent.handle(msg(proto.request(1, "core.stats"), b"junk"))
    assert reply["error"]["code"] == "invalid" and "payload" in reply["error"]["message"]


def test_handler_exceptions_become_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    from symbiont_agent.containers import Conflict, InvalidSpec, NoSuchContainer
    from symbiont_agent.migration_rate import StreamError

    cases = [(NoSuchContainer("x"), "not_found"), (InvalidSpec("x"), "invalid"), (Conflict("x"), "conflict"),
             (StreamError("x"), "invalid"), (FileNotFoundError("x"), "not_found"), (TimeoutError("x"), "timeout"),
             (RuntimeError("x"), "internal"), (OSError("x"), "internal")]
    for i, (exc, code) in enumerate(cases):
        def fn(args: dict, payload: bytes, exc: Exception = exc) -> dict:
            raise exc

        monkeypatch.setitem(agent.OPS, "cpu.container-show", fn)
        reply, _ = agent.handle(msg(proto.request(i, "cpu.container-show", {"name": "web"})))
        assert reply["error"] == {"code": code, "message": f"{type(exc).__name__}: x"}


def test_a_reply_that_does_not_fit_its_schema_is_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(agent.OPS, "ssdcache.coldest", lambda args, payload: {"lbns": [-1]})
    reply, _ = agent.handle(msg(proto.request(1, "ssdcache.coldest", {"count": 1})))
    assert reply["error"]["code"] == "internal" and "lbns[0]" in reply["error"]["message"]
