"""The lab's domain XML and image recipe (pure: nothing is booted here)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from symbiont.config import load_config
from symbiont.host import libvirt_host
from symbiont.lab import image as image_mod
from symbiont.lab.image import Image, Recipe
from symbiont.lab.vms import LAB_NS, domain_xml, lab_vm, parse_lab_mark


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
    from symbiont.lab.peerlink import PeerLink, PeerLinkError
    from symbiont.lab.vms import LabError

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
