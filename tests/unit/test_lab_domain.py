"""The lab's domain XML and image recipe (pure: nothing is booted here)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from symbiont.config import load_config
from symbiont.host import libvirt_host
from symbiont_research.lab import image as image_mod
from symbiont_research.lab.image import Image, Recipe
from symbiont_research.lab.vms import LAB_NS, domain_xml, lab_vm, parse_lab_mark


def fake_image(tmp_path: Path) -> Image:
    return Image(tmp_path, tmp_path / "g.qcow2", tmp_path / "vmlinuz", tmp_path / "initrd.img", "abc123",
                 info={"cmdline": "root=/dev/vda rw console=ttyS0"})


@pytest.mark.parametrize("dtype", ["kvm", "qemu"])
def test_domain_has_balloon_stats_hotplug_and_channel(tmp_path: Path, dtype: str) -> None:
    cfg = load_config(None, {"lab": {"domain_type": dtype, "vcpus": 1, "max_vcpus": 4, "balloon_period_s": 3}})
    vm = lab_vm(cfg, "symbiont-lab-1")
    root = ET.fromstring(domain_xml(cfg, vm, fake_image(tmp_path)))
    assert root.get("type") == dtype
    vcpu = root.find("vcpu")
    assert vcpu.get("current") == "1" and vcpu.text == "4"
    assert root.find("features/acpi") is not None
    assert root.find("devices/memballoon").get("model") == "virtio"
    assert root.find("devices/memballoon/stats").get("period") == "3"
    ch = root.find("devices/channel")
    assert ch.get("type") == "unix"
    assert ch.find("target").get("name") == "org.symbiont.agent.0"
    assert ch.find("source").get("path") == str(vm.channel)
    assert root.find("devices/disk/source").get("file") == str(vm.overlay)
    assert root.find("os/kernel").text.endswith("vmlinuz")
    cpu = root.find("cpu")
    assert (cpu.get("mode") == "host-passthrough") == (dtype == "kvm")
    assert parse_lab_mark(ET.tostring(root).decode())
    assert root.find(f"metadata/{{{LAB_NS}}}lab").get("image") == "abc123"


def test_auto_picks_tcg_without_vmx_svm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libvirt_host, "cpu_has_hw_virt", lambda: False)
    assert libvirt_host.resolve_domain_type("auto") == "qemu"
    monkeypatch.setattr(libvirt_host, "cpu_has_hw_virt", lambda: True)
    assert libvirt_host.resolve_domain_type("auto") == "kvm"
    assert libvirt_host.resolve_domain_type("qemu") == "qemu"


def test_names_are_xml_escaped(tmp_path: Path) -> None:
    cfg = load_config()
    vm = lab_vm(cfg, "a&b")
    root = ET.fromstring(domain_xml(cfg, vm, fake_image(tmp_path)))
    assert root.find("name").text == "a&b"


def test_recipe_digest_follows_its_content() -> None:
    a = Recipe(mirror="http://mirror.invalid/debian", agent_digest="1")
    assert a.digest() == Recipe(mirror="http://mirror.invalid/debian", agent_digest="1").digest()
    assert a.digest() != Recipe(mirror="http://mirror.invalid/debian", agent_digest="2").digest()
    assert a.digest() != Recipe(mirror="http://mirror.invalid/debian", agent_digest="1",
                                packages=("python3",)).digest()


def test_recipe_includes_the_agent_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "agent"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(image_mod, "agent_source_dir", lambda: src)
    d1 = image_mod.make_recipe("http://mirror.invalid/debian").digest()
    (src / "a.py").write_text("x = 2\n")
    assert image_mod.make_recipe("http://mirror.invalid/debian").digest() != d1


def test_customize_installs_agent_unit_and_enables_it(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    image_mod._customize(root)
    assert (root / "opt/symbiont-agent/symbiont_agent/agent.py").exists()
    unit = (root / "etc/systemd/system/symbiont-agent.service").read_text()
    assert "ExecStart=/usr/bin/python3 -m symbiont_agent" in unit
    link = root / "etc/systemd/system/multi-user.target.wants/symbiont-agent.service"
    assert link.is_symlink()
    assert (root / "etc/shadow").read_text().startswith("root::19000")


def test_host_mirror_is_read_from_apt_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert image_mod.host_apt_mirror().startswith("http")


def test_nosharepages_opt_out(tmp_path: Path) -> None:
    cfg = load_config()
    vm = lab_vm(cfg, "x")
    assert ET.fromstring(domain_xml(cfg, vm, fake_image(tmp_path))).find("memoryBacking") is None
    root = ET.fromstring(domain_xml(cfg, vm, fake_image(tmp_path), nosharepages=True))
    assert root.find("memoryBacking/nosharepages") is not None


def test_peer_link_nic_is_a_tap_the_lab_moves_into_its_namespace(tmp_path: Path) -> None:
    from symbiont_research.lab.peerlink import PeerLink, PeerLinkError
    from symbiont_research.lab.vms import LabError

    link = PeerLink((47611, 47612))
    assert link.netns == "symlink-47611" and (link.tap(0), link.tap(1)) == ("symt47611", "symt47612")
    assert link.mac(1) == "52:54:00:5b:b9:fc"  # the guest reads 10.211.185.252 from it
    cfg = load_config()
    vm = lab_vm(cfg, "x")
    assert ET.fromstring(domain_xml(cfg, vm, fake_image(tmp_path))).find("devices/interface") is None
    nic = ET.fromstring(domain_xml(cfg, vm, fake_image(tmp_path), tap_link=(link.tap(0), link.mac(0))))
    nic = nic.find("devices/interface")
    assert nic.get("type") == "ethernet" and nic.find("model").get("type") == "virtio"
    assert nic.find("target").get("dev") == "symt47611" and nic.find("target").get("managed") == "no"
    with pytest.raises(PeerLinkError):
        PeerLink((47611, 47611))
    with pytest.raises(PeerLinkError):
        PeerLink((80, 47612))
    with pytest.raises(LabError):
        domain_xml(cfg, vm, fake_image(tmp_path), tap_link=("bad name'/>", link.mac(0)))


# -- ownership (issue 16 item 19): a run deletes or reuses only the domains it made ----------
def _dead_owner(run: str = "deadbeef"):
    """The owner record of a process that has exited (its pid is gone or reused)."""
    import socket
    import subprocess

    import psutil

    from symbiont_research.lab.vms import LabOwner

    p = subprocess.Popen(["sleep", "0"])
    started = psutil.Process(p.pid).create_time()
    p.wait()
    return LabOwner(run, p.pid, socket.gethostname(), round(started, 2))


def test_domain_xml_carries_its_owner_and_peer_link(tmp_path: Path) -> None:
    from symbiont_research.lab.vms import LabOwner, parse_mark

    cfg = load_config()
    owner = LabOwner("r1'\"<&", 4242, "host'x", 1700000000.25)  # hostile values stay attributes
    xml = domain_xml(cfg, lab_vm(cfg, "x"), fake_image(tmp_path), owner=owner, peer_link=(4000, 4001))
    el = ET.fromstring(xml).find(f"metadata/{{{LAB_NS}}}lab")
    assert el.get("run") == "r1'\"<&" and el.get("pid") == "4242" and el.get("host") == "host'x"
    mark = parse_mark(xml)
    assert mark is not None and mark.owner == owner and mark.peer_link == (4000, 4001) and mark.image == "abc123"
    # The bare element, as libvirt's virDomain.metadata() returns it, parses the same.
    assert parse_mark(ET.tostring(el).decode()) == mark
    # Without an explicit owner the domain belongs to this process.
    default = parse_mark(domain_xml(cfg, lab_vm(cfg, "x"), fake_image(tmp_path)))
    assert default is not None and default.owner == LabOwner.this_process() and default.owner.state() == "alive"
    assert parse_mark("<domain><name>x</name><metadata/></domain>") is None


def test_owner_state_tells_a_dead_run_from_a_live_or_foreign_one() -> None:
    import dataclasses

    from symbiont_research.lab.vms import LabOwner

    me = LabOwner.new_run()
    assert me.state() == "alive" and me.run != LabOwner.new_run().run
    assert _dead_owner().state() == "dead"
    assert dataclasses.replace(me, started=me.started - 3600).state() == "dead"  # pid reused by another process
    assert dataclasses.replace(_dead_owner(), host="elsewhere.invalid").state() == "unknown"  # cannot prove it
    assert LabOwner.persistent_lab("symbiont-lab-").state() == "unknown"


def test_check_owner_refuses_other_runs_and_names_the_owner() -> None:
    from symbiont_research.lab.vms import LabMark, LabOwner, NotOwnedError, check_owner

    me, other, dead = LabOwner.new_run(), LabOwner.new_run("cafe01"), _dead_owner()
    check_owner("d1", LabMark("i", me), me)
    with pytest.raises(NotOwnedError, match=r"d1: belongs to run 'cafe01' \(pid \d+ on .*refusing to delete"):
        check_owner("d1", LabMark("i", other), me)
    with pytest.raises(NotOwnedError, match="refusing to delete"):
        check_owner("d1", LabMark("i", other), me, reclaim=True)  # alive: reclaim does not apply
    with pytest.raises(NotOwnedError, match="owner is gone: add --reclaim"):
        check_owner("d1", LabMark("i", dead), me)
    check_owner("d1", LabMark("i", dead), me, reclaim=True)
    with pytest.raises(NotOwnedError, match="not created by 'symbiont lab'"):
        check_owner("d1", None, me, reclaim=True)


# Against a real libvirtd: domains defined, never booted.
@pytest.fixture
def lv(libvirtd, tmp_path: Path):
    import uuid

    import libvirt

    from symbiont.host.libvirt_host import LibvirtHost

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    cfg = load_config(None, {"lab": {"vm_prefix": f"symbiont-utest-{uuid.uuid4().hex[:6]}-",
                                     "vms_dir": str(tmp_path / "vms"), "channels_dir": str(tmp_path / "ch")}})
    host = LibvirtHost(cfg.libvirt_uri)
    yield host, cfg
    for dom in host.conn.listAllDomains():
        if dom.name().startswith(cfg.lab.vm_prefix):
            dom.undefine()
    host.close()


def _define(host, cfg, name: str, owner, tmp_path: Path, **kw) -> None:
    host.conn.defineXML(domain_xml(cfg, lab_vm(cfg, name), fake_image(tmp_path), owner=owner, **kw))


@pytest.mark.root
@pytest.mark.libvirt
def test_remove_vm_refuses_another_runs_domain(lv, tmp_path: Path) -> None:
    from symbiont_research.lab import vms as labvms

    host, cfg = lv
    first, second, dead = labvms.LabOwner.new_run(), labvms.LabOwner.new_run(), _dead_owner()
    _define(host, cfg, cfg.lab.vm_prefix + "1", first, tmp_path)
    _define(host, cfg, cfg.lab.vm_prefix + "2", dead, tmp_path)
    mark = labvms.domain_mark(host.domain(cfg.lab.vm_prefix + "1"))
    assert mark is not None and mark.owner == first
    with pytest.raises(labvms.NotOwnedError, match=f"{cfg.lab.vm_prefix}1: belongs to run '{first.run}'"):
        labvms.remove_vm(host, cfg, cfg.lab.vm_prefix + "1", second)
    with pytest.raises(labvms.NotOwnedError):
        labvms.remove_vm(host, cfg, cfg.lab.vm_prefix + "1", second, reclaim=True)
    assert host.exists(cfg.lab.vm_prefix + "1")
    with pytest.raises(labvms.NotOwnedError, match="owner is gone"):
        labvms.remove_vm(host, cfg, cfg.lab.vm_prefix + "2", second)
    assert labvms.remove_vm(host, cfg, cfg.lab.vm_prefix + "2", second, reclaim=True)
    assert not host.exists(cfg.lab.vm_prefix + "2")
    assert labvms.remove_vm(host, cfg, cfg.lab.vm_prefix + "1", first) and not host.exists(cfg.lab.vm_prefix + "1")


@pytest.mark.root
@pytest.mark.libvirt
def test_second_session_with_the_same_prefix_leaves_the_first_ones_domains(
    lv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from symbiont_research.lab import session as session_mod
    from symbiont_research.lab import vms as labvms

    host, cfg = lv
    first = labvms.LabOwner.new_run()
    name = cfg.lab.vm_prefix + "1"
    _define(host, cfg, name, first, tmp_path)
    uuid_before = host.domain(name).UUIDString()
    monkeypatch.setattr(session_mod, "build_image", lambda *a, **k: fake_image(tmp_path))
    booted: list[str] = []
    monkeypatch.setattr(labvms, "create_vm", lambda *a, **k: booted.append(a[3]))
    base = tmp_path / "base.yaml"
    base.write_text(f"lab: {{vms_dir: '{cfg.lab.vms_dir}', channels_dir: '{cfg.lab.channels_dir}'}}\n")
    s = session_mod.LabSession(count=1, prefix=cfg.lab.vm_prefix, base_config=str(base), work_dir=tmp_path / "w")
    with pytest.raises(labvms.NotOwnedError, match=f"{name}: belongs to run '{first.run}'.*refusing to reuse"):
        s.__enter__()
    assert host.domain(name).UUIDString() == uuid_before and booted == []


def test_session_prefix_comes_from_the_config_the_experiment_and_a_run_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No experiment hard-codes a prefix: two runs of one experiment get different VM names."""
    from symbiont_research.experiments import framework as fw
    from symbiont_research.lab import session as session_mod

    seen: list[str] = []

    def stop_after_prefix(*a, **k):
        raise RuntimeError("stop here")

    monkeypatch.setattr(session_mod, "ensure_libvirtd", stop_after_prefix)
    base = tmp_path / "base.yaml"
    base.write_text("lab: {vm_prefix: 'alice-'}\n")

    @fw.experiment("unit-test-lab-prefix", "lab prefix")
    def _exp(ctx: fw.RunContext) -> dict:
        s = session_mod.LabSession(count=1, base_config=str(base), work_dir=tmp_path / ctx.run_id)
        with pytest.raises(RuntimeError, match="stop here"):
            s.__enter__()
        seen.append(s.prefix or "")
        return {}

    out1, _ = fw.run_experiment("unit-test-lab-prefix", [], tmp_path / "r", show_progress=False)
    out2, _ = fw.run_experiment("unit-test-lab-prefix", [], tmp_path / "r2", show_progress=False)
    assert all(p.startswith("alice-unit-test-lab-prefix-") for p in seen) and seen[0] != seen[1]
    import json

    assert json.loads((out1 / "run.json").read_text())["lab_prefixes"] == [seen[0]]
    s = session_mod.LabSession(count=1, base_config=str(base), tag="fig2b")
    with pytest.raises(RuntimeError):
        s.__enter__()
    assert s.prefix == f"alice-fig2b-{s.owner.run}-"
    monkeypatch.setenv("SYMBIONT_CONFIG", str(base))  # as 'SYMBIONT_CONFIG=... symbiont experiment run'
    s = session_mod.LabSession(count=1)
    with pytest.raises(RuntimeError):
        s.__enter__()
    assert s.prefix == f"alice-session-{s.owner.run}-"


def test_no_experiment_hard_codes_a_vm_prefix() -> None:
    import re

    root = Path(__file__).resolve().parents[2] / "daemon" / "symbiont"
    offenders = [f"{p.relative_to(root)}: {m.group(0)}" for p in root.glob("*/*.py")
                 for m in re.finditer(r"LabSession\([^)]*prefix=", p.read_text())]
    assert offenders == []


# -- the guest-to-guest link from the command line ----------------------------------------------
@pytest.mark.root
def test_peer_link_refuses_to_remove_a_link_in_use() -> None:
    """A tap has carrier while a process holds it open: that is a running lab's link."""
    import fcntl
    import os
    import struct

    from symbiont_research.lab.peerlink import PeerLink, PeerLinkError

    link = PeerLink.allocate()
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", link.tap(0).encode(), 0x0002 | 0x1000))  # TUNSETIFF tap
        assert link.in_use() == [link.tap(0)]
        with pytest.raises(PeerLinkError, match=f"{link.tap(0)} held open by a running VM"):
            link.prepare()
    finally:
        os.close(fd)
    assert link.in_use() == []
    link.prepare()  # a leftover nobody holds: replaced
    assert link.taps_present()
    link.remove()
    assert not link.taps_present() and not link.exists()


@pytest.mark.root
@pytest.mark.libvirt
def test_cli_lab_up_peer_link_and_lab_down(lv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``symbiont lab up 2 --peer-link`` defines the VMs with their taps and builds the link in a
    real network namespace; ``lab down`` removes both. (VMs defined, not booted: the fake is
    only create_vm's start=False and the image.)"""
    from click.testing import CliRunner
    from pyroute2 import NetNS

    from symbiont import cli as cli_mod
    from symbiont_research import cli as research_cli
    from symbiont_research.lab import vms as labvms
    from symbiont_research.lab.peerlink import PeerLink

    host, cfg = lv
    conf = tmp_path / "c.yaml"
    conf.write_text(f"lab: {{vm_prefix: '{cfg.lab.vm_prefix}', vms_dir: '{cfg.lab.vms_dir}', "
                    f"channels_dir: '{cfg.lab.channels_dir}'}}\n")
    monkeypatch.setattr(research_cli, "build_image_with_progress", lambda c, force=False: fake_image(tmp_path))
    cli_mod._add_part_groups()  # the lab group comes from the research package, as in main()
    monkeypatch.setattr(labvms.subprocess, "run", lambda *a, **k: labvms.subprocess.CompletedProcess(a, 0, "", ""))
    real_create = labvms.create_vm
    monkeypatch.setattr(labvms, "create_vm", lambda *a, **k: real_create(*a, start=False, **k))
    link = PeerLink(labvms.lab_peer_ids(cfg.lab.vm_prefix))
    runner = CliRunner()
    try:
        r = runner.invoke(cli_mod.cli, ["-c", str(conf), "lab", "up", "2", "--peer-link", "--no-wait"])
        assert r.exit_code == 0, r.output
        assert f"netns {link.netns}" in r.output
        names = labvms.lab_names(cfg, 2)
        for i, name in enumerate(names):
            root = ET.fromstring(host.domain(name).XMLDesc())
            assert root.find("devices/interface/target").get("dev") == link.tap(i)
            mark = labvms.domain_mark(host.domain(name))
            assert mark.peer_link == link.ids and mark.owner.run == f"lab:{cfg.lab.vm_prefix}"
        with NetNS(link.netns) as ns:
            br = ns.link_lookup(ifname="symbr0")[0]
            for i in (0, 1):
                tap = ns.get_links(ns.link_lookup(ifname=link.tap(i))[0])[0]
                assert tap.get_attr("IFLA_MASTER") == br
        # A running experiment's VM under the same prefix is not 'lab down''s to remove.
        other = labvms.LabOwner.new_run()
        _define(host, cfg, cfg.lab.vm_prefix + "exp-1", other, tmp_path)
        r = runner.invoke(cli_mod.cli, ["-c", str(conf), "lab", "down"])
        assert r.exit_code == 0, r.output
        assert f"removed 2 lab VMs: {names[0]}, {names[1]}" in r.output
        assert f"belongs to run '{other.run}'" in r.output
        assert not host.exists(names[0]) and host.exists(cfg.lab.vm_prefix + "exp-1")
        assert not link.exists() and not link.taps_present()
    finally:
        link.remove()
