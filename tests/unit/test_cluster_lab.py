"""Pure parts of the multi-host lab: host counts, addresses, the Ansible inventory, and the
second libvirtd's refusal to listen on TCP outside a network namespace."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from symbiont.cluster.lab import ClusterError, ClusterLab, ClusterNet, parse_counts, write_inventory
from symbiont.host.libvirt_instance import InstanceError, LibvirtInstance


def test_parse_counts() -> None:
    assert parse_counts("2", 3) == [2, 2, 2]
    assert parse_counts("1,0", 2) == [1, 0]
    for bad in ("1,2,3", "x", "-1", "17"):
        with pytest.raises(ClusterError, match="--vms-per-host"):
            parse_counts(bad, 2)


def test_addresses_private_and_distinct() -> None:
    net = ClusterNet("symc", "10.213.0.0/24")
    assert net.address(0) == "10.213.0.1" and [net.address(i) for i in (1, 2, 3)] == [
        "10.213.0.11", "10.213.0.12", "10.213.0.13"]  # fmt: skip
    lab = ClusterLab(hosts=3, vms_per_host=[1, 0, 0], work_dir=Path("/tmp/x"))
    specs = lab.specs()
    assert [s.netns for s in specs] == ["symc-h1", "symc-h2", "symc-h3"]
    assert [s.tcp_uri for s in specs][1] == "qemu+tcp://10.213.0.12/system"
    assert all(len(v) <= 15 for s in specs for v in s.veth)  # kernel interface name limit
    with pytest.raises(ClusterError, match="private"):
        ClusterNet("symc", "8.8.8.0/24")
    with pytest.raises(ClusterError, match="cluster name"):
        ClusterNet("Bad-Name")
    with pytest.raises(ClusterError, match="--hosts"):
        ClusterLab(hosts=0)
    for bad in (0, -1, 101, "2", True):
        with pytest.raises(ClusterError, match="overcommit.cpu"):
            ClusterLab(hosts=1, vms_per_host=[0], overcommit={"cpu": bad})


def test_inventory_has_each_hosts_daemon_and_libvirt(tmp_path) -> None:
    state = {"name": "symc", "netns": "symc-lab", "work_dir": str(tmp_path), "hosts": [
        {"id": f"h{i}", "daemon": f"{tmp_path}/h{i}/symbiontd.sock", "netns": f"symc-h{i}", "address": f"10.213.0.1{i}",
         "local_libvirt_uri": f"qemu+unix:///system?socket=/run/symbiont-symc-h{i}/libvirt-sock",
         "libvirt_uri": f"qemu+tcp://10.213.0.1{i}/system"} for i in (1, 2)]}  # fmt: skip
    p = write_inventory(state, tmp_path / "inventory.ini")
    cp = configparser.ConfigParser(allow_no_value=True, delimiters=(" ",))
    cp.read_string(p.read_text())
    hosts = list(cp["symbiont_cluster"])
    assert len(hosts) == 2
    line = p.read_text().splitlines()[2]
    assert line.startswith("symc-h1 ansible_connection=local")
    assert f"symbiont_socket={tmp_path}/h1/symbiontd.sock" in line and "symbiont_netns=symc-h1" in line


def test_instance_listens_on_tcp_only_inside_a_namespace() -> None:
    with pytest.raises(InstanceError, match="listen_addr needs a network namespace"):
        LibvirtInstance(name="x1", listen_addr="10.213.0.11")
    with pytest.raises(InstanceError, match="not an IP address"):
        LibvirtInstance(name="x1", netns="ns1", listen_addr="example.com")
    inst = LibvirtInstance(name="x1", netns="ns1", listen_addr="10.213.0.11")
    assert inst.tcp_uri == "qemu+tcp://10.213.0.11/system"
    assert LibvirtInstance(name="x2").tcp_uri == ""  # the existing one-namespace use is unchanged
