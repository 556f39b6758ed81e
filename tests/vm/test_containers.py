"""Containers inside a real guest, vCPU scaling with ratio keeping, nesting-aware reclamation.

One VM booted from the golden image under libvirt, a real ``symbiontd``, the real agent.
Every limit is checked by reading the cgroup files in the guest over the serial console,
independently of the agent.
"""

from __future__ import annotations

import time

import pytest

from symbiont.client import ApiError
from symbiont_research.lab.console import guest_exec
from symbiont_research.lab.session import LabSession

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]

CT = "/sys/fs/cgroup/symbiont-ct"
MiB = 1 << 20
BURN = ["sh", "-c", "i=0; while [ $i -lt 4 ]; do (while :; do :; done) & i=$((i+1)); done; wait"]


@pytest.fixture(scope="module")
def lab(libvirtd, tmp_path_factory):
    with LabSession(count=1, prefix="symbiont-ct-", period_s=1.0, memory_mib=512, max_vcpus=4,
                    work_dir=tmp_path_factory.mktemp("ctlab"),
                    daemon_overrides={"control": {"agent_timeout_s": 10.0}}) as s:
        name = s.names[0]
        s.wait_for(lambda: s.client().get(f"/v1/vms/{name}")["cooperative"], 60, "agent cooperative")
        yield s


def gx(lab: LabSession, cmd: str) -> str:
    r = guest_exec(lab.host, lab.names[0], cmd, timeout=60)
    assert r.rc == 0, (cmd, r.output)
    return r.output.strip()


def files(lab: LabSession, ct: str, names: list[str]) -> dict[str, str]:
    out = gx(lab, " ; ".join(f"echo {n}=$(cat {CT}/{ct}/{n})" for n in names))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def api(lab: LabSession, method: str, path: str, body=None):
    with lab.client() as c:
        return c.call(method, f"/v1/cpu/vms/{lab.names[0]}{path}", json=body)


def test_lifecycle_limits_namespaces_and_usage(lab: LabSession) -> None:
    v = api(lab, "POST", "/containers", {
        "name": "web", "command": ["sh", "-c", "echo pid=$$ host=$(cat /proc/sys/kernel/hostname); "
                                              "while :; do :; done"],
        "limits": {"cpu_weight": 300, "cpu_max": 0.5, "cpuset": "0", "memory_max": "64M", "memory_high": "48M",
                   "memory_low": "8M", "pids_max": 32},
    })
    assert v["state"] == "running" and v["pid"]
    f = files(lab, "web", ["cpu.weight", "cpu.max", "cpuset.cpus", "memory.max", "memory.high", "memory.low",
                           "pids.max", "cgroup.procs"])
    assert f["cpu.weight"] == "300" and f["cpu.max"] == "50000 100000" and f["cpuset.cpus"] == "0"
    assert int(f["memory.max"]) == 64 * MiB and int(f["memory.high"]) == 48 * MiB and int(f["memory.low"]) == 8 * MiB
    assert f["pids.max"] == "32" and f["cgroup.procs"]
    # Own PID, UTS, IPC and mount namespaces; the command sees itself as PID 1 and the host name.
    pid = f["cgroup.procs"].split()[-1]
    ns = gx(lab, f"for n in pid uts ipc mnt; do [ $(readlink /proc/{pid}/ns/$n) != $(readlink /proc/1/ns/$n) ] "
                 f"&& echo $n; done")
    assert ns.split() == ["pid", "uts", "ipc", "mnt"]
    lab.wait_for(lambda: "pid=1 host=web" in api(lab, "GET", "/containers/web/logs")["tail"], 20, "container log")
    # Usage from cpu.stat, memory.current, memory.stat, memory.pressure.
    time.sleep(2)
    u = api(lab, "GET", "/containers/web")["usage"]
    assert u["cpu_usage_usec"] > 200_000 and u["memory_current"] > 0 and "anon" in u["memory_stat"]
    assert "some_avg10" in u["memory_pressure"] and u["nr_throttled"] > 0  # cpu.max 0.5 bites
    # stop / start / set
    assert api(lab, "POST", "/containers/web/stop")["state"] == "stopped"
    assert gx(lab, f"cat {CT}/web/cgroup.events | grep populated") == "populated 0"
    assert api(lab, "POST", "/containers/web/start")["state"] == "running"
    assert api(lab, "PATCH", "/containers/web", {"cpu_weight": 500, "memory_high": None})["applied"]["cpu.weight"] == 500
    assert files(lab, "web", ["cpu.weight", "memory.high"]) == {"cpu.weight": "500", "memory.high": "max"}
    # destroy: the group goes, and with the last container the subtree and the root's controllers.
    res = api(lab, "DELETE", "/containers/web")
    assert res["restored"]["subtree"]["removed"] == CT
    assert gx(lab, f"test -e {CT} || echo gone; cat /sys/fs/cgroup/cgroup.subtree_control") == "gone\nmemory pids"
    assert api(lab, "GET", "/containers")["containers"] == []


def test_bad_input_is_a_clear_error_and_changes_nothing(lab: LabSession) -> None:
    api(lab, "POST", "/containers", {"name": "idle", "command": ["sleep", "1000"], "limits": {"cpu_weight": 100}})
    before = files(lab, "idle", ["cpu.weight", "cpuset.cpus", "memory.max"])
    online = gx(lab, "cat /sys/devices/system/cpu/online")
    cases = [
        ("GET", "/containers/ghost", None, 404, "no container 'ghost'"),
        ("POST", "/containers/ghost/stop", None, 404, "no container"),
        ("DELETE", "/containers/ghost", None, 404, "no container"),
        ("PATCH", "/containers/idle", {"cpu_weight": -5}, 422, "cpu_weight"),
        ("PATCH", "/containers/idle", {"cpuset": "0-3"}, 422, "not online"),
        ("PATCH", "/containers/idle", {"memory_low": "64M", "memory_high": "32M"}, 422, "memory_low"),
        ("PATCH", "/containers/idle", {"cpu_ratio": 2, "cpu_weight": 5}, 422, "cpu_ratio manages"),
        ("POST", "/containers", {"name": "x", "command": ["no-such-prog"]}, 422, "not found"),
        ("POST", "/containers", {"name": "y", "command": ["true"], "limits": {"cpuset": "7"}}, 422, "not online"),
        ("POST", "/containers", {"name": "../x", "command": ["true"]}, 422, "name"),
        ("POST", "/containers", {"name": "idle", "command": ["true"]}, 409, "already exists"),
    ]
    for method, path, body, status, reason in cases:
        with pytest.raises(ApiError) as ei:
            api(lab, method, path, body)
        assert ei.value.status == status and reason in ei.value.detail, (path, body, ei.value)
    assert online == "0"
    assert files(lab, "idle", ["cpu.weight", "cpuset.cpus", "memory.max"]) == before
    assert gx(lab, f"ls {CT}") .split() .count("idle") == 1 and "y" not in gx(lab, f"ls {CT}").split()
    api(lab, "DELETE", "/containers/idle")


def cpu_usage(lab: LabSession) -> dict[str, int]:
    return {c["name"]: c["usage"]["cpu_usage_usec"] for c in api(lab, "GET", "/containers")["containers"]}


def shares_over(lab: LabSession, seconds: float) -> dict[str, float]:
    a = cpu_usage(lab)
    time.sleep(seconds)
    b = cpu_usage(lab)
    d = {n: b[n] - a[n] for n in a}
    total = sum(d.values())
    return {n: v / total for n, v in d.items()}


def test_ratios_kept_after_scale_down_to_one_and_back(lab: LabSession) -> None:
    vm = lab.names[0]
    assert api(lab, "PUT", "/mode", {"nesting_aware": True, "cpu_strategy": "pin-share"})["nesting_aware"]
    up = api(lab, "PUT", "/vcpus", {"count": 4})
    assert up["after"]["guest_online"] == 4 and up["after"]["libvirt"] == 4
    for name, r in (("c1", 1), ("c2", 1), ("c3", 4)):
        api(lab, "POST", "/containers", {"name": name, "command": BURN, "limits": {"cpu_ratio": r}})
    f = files(lab, "c3", ["cpu.max", "cpuset.cpus", "cpu.weight"])
    assert f == {"cpu.max": "266667 100000", "cpuset.cpus": "0-3", "cpu.weight": "1000"}
    assert files(lab, "c1", ["cpu.max", "cpuset.cpus"]) == {"cpu.max": "66667 100000", "cpuset.cpus": "0-1"}
    down = api(lab, "PUT", "/vcpus", {"count": 1})
    assert down["after"]["online"] == [0] and down["containers"]["applied"]
    assert down["timings"]["ratios_in_force_s"] < 10
    assert gx(lab, "cat /sys/devices/system/cpu/online") == "0"
    assert [files(lab, n, ["cpu.max"])["cpu.max"] for n in ("c1", "c2", "c3")] == \
        ["16667 100000", "16667 100000", "66667 100000"]
    shares = shares_over(lab, 6)
    assert shares["c3"] == pytest.approx(4 / 6, abs=0.08) and shares["c1"] == pytest.approx(1 / 6, abs=0.06)
    rec = api(lab, "GET", "/vcpus")
    assert rec["record"]["requested"] == 1 and rec["record"]["guest_online"] == 1 and rec["effective"] == 1
    up = api(lab, "PUT", "/vcpus", {"count": 4})
    assert up["after"]["online"] == [0, 1, 2, 3]
    assert files(lab, "c3", ["cpu.max", "cpuset.cpus"]) == {"cpu.max": "266667 100000", "cpuset.cpus": "0-3"}
    # The nesting-agnostic baseline: same start, but the plan is not touched after scaling.
    api(lab, "PUT", "/mode", {"nesting_aware": False})
    api(lab, "PUT", "/vcpus", {"count": 2})
    assert files(lab, "c3", ["cpu.max", "cpu.weight"]) == {"cpu.max": "266667 100000", "cpu.weight": "100"}
    api(lab, "PUT", "/mode", {"nesting_aware": True})
    assert files(lab, "c3", ["cpu.max"])["cpu.max"] == "133333 100000"
    for n in ("c1", "c2", "c3"):
        api(lab, "DELETE", f"/containers/{n}")
    with lab.client() as c:
        decisions = c.get("/v1/decisions", vm=vm, limit=200)
    assert any(d["part"] == "cpu" and d["action"] == "scale" for d in decisions)


def fill(name: str, mib: int) -> list[str]:
    return ["sh", "-c", f"dd if=/dev/zero of=/var/tmp/{name}.dat bs=1M count={mib} status=none; "
                        f"while :; do cat /var/tmp/{name}.dat > /dev/null; sleep 1; done"]


def test_no_reclaim_container_is_untouched_by_reclamation(lab: LabSession) -> None:
    api(lab, "PUT", "/mode", {"nesting_aware": True})
    api(lab, "POST", "/containers", {"name": "a", "command": fill("a", 60), "limits": {"mem_shares": 100}})
    api(lab, "POST", "/containers", {"name": "keep", "command": fill("keep", 60), "limits": {"no_reclaim": True}})

    def usage() -> dict[str, int]:
        return {c["name"]: c["usage"]["memory_current"] for c in api(lab, "GET", "/containers")["containers"]}

    lab.wait_for(lambda: all(v > 55 * MiB for v in usage().values()), 60, "page cache filled")
    before = usage()
    with lab.client() as c:
        r = c.put(f"/v1/cpu/vms/{lab.names[0]}/memory", {"target_mib": 400, "use_free": False})
    rec = r["reclaim"]["containers"]
    assert rec["keep"]["status"] == "skipped" and rec["keep"]["planned"] == 0
    assert rec["a"]["freed"] > 30 * MiB
    after = usage()
    assert after["keep"] >= before["keep"] - 2 * MiB  # untouched
    assert after["a"] < before["a"] - 30 * MiB
    assert int(gx(lab, f"cat {CT}/keep/memory.min")) >= before["keep"]
    assert gx(lab, f"cat {CT}/a/memory.high") != "max"  # held down while the balloon is inflated
    with lab.client() as c:
        r = c.put(f"/v1/cpu/vms/{lab.names[0]}/memory", {"target_mib": 512})
    assert r["release"]["restored_memory_high"] == {"a": None}
    assert gx(lab, f"cat {CT}/a/memory.high") == "max"
    for n in ("a", "keep"):
        api(lab, "DELETE", f"/containers/{n}")
    assert gx(lab, f"rm -f /var/tmp/a.dat /var/tmp/keep.dat; test -e {CT} || echo gone") == "gone"
