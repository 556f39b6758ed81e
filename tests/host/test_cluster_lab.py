"""The multi-host lab with real namespaces, libvirtds and daemons (no VMs: seconds, not minutes):
each host is a network namespace with a libvirtd that listens on qemu+tcp at the namespace's
address only, and a daemon of its own; the lab's private addresses never appear in the root
namespace; the controller (its own process, inside the lab namespace) reaches every libvirtd over
the bridge; a host whose daemon dies is marked down and a plan that needs it is refused; the
Ansible inventory drives ansible against each host's own daemon; ``down`` leaves nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from pyroute2 import IPRoute, netns

from symbiont.client import Client
from symbiont.cluster.lab import ClusterLab, load_state, root_addresses, stop_pid

pytestmark = [pytest.mark.root, pytest.mark.libvirt]

NAME = os.environ.get("SYMB_CLUSTER_TEST_NAME", "symt")
SUBNET = os.environ.get("SYMB_CLUSTER_TEST_SUBNET", "10.214.0.0/24")
ROOT = Path(__file__).resolve().parents[2]


def symbiont(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from symbiont.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    lab = ClusterLab(hosts=2, vms_per_host=[0, 0], name=NAME, subnet=SUBNET, work_dir=work)
    try:
        state = lab.up()
        yield lab, state, work
    finally:
        lab.down()


def test_hosts_are_namespaces_with_their_own_libvirtd_and_daemon(lab) -> None:
    lab_, state, work = lab
    assert sorted(n for n in netns.listnetns() if n.startswith(f"{NAME}-")) == [f"{NAME}-h1", f"{NAME}-h2", f"{NAME}-lab"]
    net = ipaddress.ip_network(SUBNET)
    # Never in the root namespace: no address of the lab's range, none of its links.
    assert not [a for a in root_addresses() if ipaddress.ip_address(a) in net]
    with IPRoute() as ipr:
        assert not [m.get_attr("IFLA_IFNAME") for m in ipr.get_links() if m.get_attr("IFLA_IFNAME").startswith(NAME)]
    for e in state["hosts"]:
        ss = subprocess.run(["ip", "netns", "exec", e["netns"], "ss", "-Hltn"], capture_output=True, text=True).stdout
        assert f"{e['address']}:16509" in ss  # libvirtd --listen, on the namespace's address only
        with Client(e["daemon"]) as c:
            assert c.get("/v1/placement/inventory")["host"]["id"] == e["id"]
    # From the lab namespace (where the controller runs), each libvirtd answers over qemu+tcp,
    # and they are different hosts (host UUIDs).
    probe = ("import libvirt, json, sys; print(json.dumps([libvirt.open(u).getHostname() for u in sys.argv[1:]]))")
    res = subprocess.run(["nsenter", f"--net=/run/netns/{state['netns']}", sys.executable, "-c", probe,
                          *[e["libvirt_uri"] for e in state["hosts"]]], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [f"symbiont-{NAME}-h1", f"symbiont-{NAME}-h2"]


def test_ansible_inventory_reaches_each_hosts_daemon(lab, tmp_path) -> None:
    _lab, state, work = lab
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "at"),
           "ANSIBLE_HOST_KEY_CHECKING": "False"}  # fmt: skip
    inv = work / "inventory.ini"
    res = subprocess.run(["ansible-inventory", "-i", str(inv), "--list"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    hv = json.loads(res.stdout)["_meta"]["hostvars"]
    assert sorted(hv) == [f"{NAME}-h1", f"{NAME}-h2"]
    # An ad-hoc task per host against that host's own daemon socket (the per-host variable).
    res = subprocess.run(["ansible", "-i", str(inv), "symbiont_cluster", "-m", "ansible.builtin.uri", "-a",
                          "unix_socket={{ symbiont_socket }} url=http://symbiontd/v1/placement/inventory"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    for e in state["hosts"]:
        assert f'"id": "{e["id"]}"' in res.stdout


def test_controller_process_marks_a_dead_host_and_refuses_plans_needing_it(lab) -> None:
    _lab, state, work = lab
    res = symbiont("cluster", "controller", "--cluster", str(work), "--rounds", "1", "--period", "0.1")
    assert res.returncode == 0, res.stderr
    rounds = [json.loads(line) for line in res.stdout.splitlines()]
    assert rounds[0] == {"resume": []} and rounds[1]["hosts"] == ["h1", "h2"] and rounds[1]["down"] == {}
    h2 = state["hosts"][1]
    assert stop_pid(int(h2["daemon_pid"]), h2["daemon_config"])
    plan = work / "plan.json"
    plan.write_text(json.dumps({"moves": [{"vm": "anything", "from": "h1", "to": "h2"}]}))
    res = symbiont("cluster", "execute", "--cluster", str(work), str(plan), "--yes")
    assert res.returncode == 2, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["state"] == "refused" and out["reason"].startswith("host h2 is not answering")
    res = symbiont("cluster", "journal", "--cluster", str(work))
    j = json.loads(res.stdout)
    assert j["hosts"]["h2"]["state"] == "down" and j["hosts"]["h1"]["state"] == "up"
    assert [d["inputs"]["host"] for d in j["decisions"] if d["kind"] == "host-down"] == ["h2"]


def test_down_leaves_nothing(tmp_path) -> None:
    lab = ClusterLab(hosts=1, vms_per_host=[0], name=NAME + "d", subnet="10.215.0.0/24", work_dir=tmp_path)
    state = lab.up()
    pids = [state["hosts"][0]["daemon_pid"], *state["hosts"][0]["pids"].values()]
    assert all(psutil.pid_exists(p) for p in pids)
    out = lab.down()
    assert out["daemons"] == ["h1"] and out["instances"] == [f"{NAME}d-h1"]
    assert sorted(out["namespaces"]) == [f"{NAME}d-h1", f"{NAME}d-lab"]
    assert not [n for n in netns.listnetns() if n.startswith(f"{NAME}d-")]
    assert not any(psutil.pid_exists(p) for p in pids)
    assert load_state(tmp_path) is None and not (tmp_path / "inventory.ini").exists()
