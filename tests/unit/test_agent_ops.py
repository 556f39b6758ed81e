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
