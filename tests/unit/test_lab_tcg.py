"""Lab VMs under TCG carry a bounded translation-code cache (issue 15 item 4); KVM never."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from symbiont.config import ConfigError, load_config
from symbiont_research.lab.image import Image
from symbiont_research.lab.vms import domain_xml, lab_vm


def _xml(tmp_path: Path, **lab: object) -> ET.Element:
    cfg = load_config(None, {"lab": lab})
    img = Image(tmp_path, tmp_path / "g.qcow2", tmp_path / "vmlinuz", tmp_path / "initrd.img", "abc123", info={})
    return ET.fromstring(domain_xml(cfg, lab_vm(cfg, "symbiont-lab-1"), img))


FIXED = {"vcpus": 1, "max_vcpus": 1}  # no vCPU hot-plug possible


def test_tcg_domains_get_the_tb_cache_kvm_does_not(tmp_path: Path) -> None:
    tb = _xml(tmp_path, domain_type="qemu", **FIXED).find("features/tcg/tb-cache")
    assert tb is not None and tb.get("unit") == "MiB" and tb.text == "32"  # the default
    assert _xml(tmp_path, domain_type="qemu", tcg_tb_cache_mib=24, **FIXED).find("features/tcg/tb-cache").text == "24"
    assert _xml(tmp_path, domain_type="kvm", **FIXED).find("features/tcg") is None
    assert _xml(tmp_path, domain_type="qemu", tcg_tb_cache_mib=0, **FIXED).find("features/tcg") is None  # QEMU's own
    assert _xml(tmp_path, domain_type="qemu").find("features/acpi") is not None


def test_no_tb_cache_bound_on_a_domain_that_can_hot_plug_vcpus(tmp_path: Path) -> None:
    """QEMU 7.2 aborted on a vCPU hot-plug with a 32 MiB cache (no TCG region left for the new
    vCPU): a domain with room to hot-plug keeps QEMU's own cache."""
    assert _xml(tmp_path, domain_type="qemu", vcpus=1, max_vcpus=4).find("features/tcg") is None
    assert _xml(tmp_path, domain_type="qemu", vcpus=2, max_vcpus=2).find("features/tcg/tb-cache") is not None


def test_a_bad_size_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^lab\.tcg_tb_cache_mib"):
        load_config(None, {"lab": {"tcg_tb_cache_mib": -1}})


@pytest.mark.root
@pytest.mark.libvirt
def test_this_libvirt_accepts_it(tmp_path: Path, libvirtd: None) -> None:
    """libvirt 9.0 defines the domain and keeps the size (it would drop an unknown element)."""
    import libvirt

    root = _xml(tmp_path, domain_type="qemu", **FIXED)
    root.find("name").text = "symbiont-tbcache-check"
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.defineXML(ET.tostring(root, encoding="unicode"))
        try:
            back = ET.fromstring(dom.XMLDesc(0)).find("features/tcg/tb-cache")
            assert back is not None and int(back.text) == 32 * 1024 and back.get("unit") == "KiB"
        finally:
            dom.undefine()
    finally:
        conn.close()
