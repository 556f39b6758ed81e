"""A clone's domain XML from its template's (pure: nothing is booted here)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from symbiont.config import load_config
from symbiont_research.lab.clone import CloneError, clone_xml, template_key
from symbiont_research.lab.image import Image
from symbiont_research.lab.vms import LAB_NS, LabOwner, domain_xml, lab_vm, mark_xml, parse_mark

TEMPLATE_UUID = "0f4b5c39-8a8e-4a4e-9d0d-3c2b1a000001"


def fake_image(tmp_path: Path, digest: str = "abc123") -> Image:
    return Image(tmp_path, tmp_path / "g.qcow2", tmp_path / "vmlinuz", tmp_path / "initrd.img", digest,
                 info={"cmdline": "root=/dev/vda rw console=ttyS0"})


def template_xml(tmp_path: Path, nic: bool = True) -> str:
    """A lab domain as libvirt hands it back from a save image: uuid, a pty path, a probed
    backing chain and (here) a NIC with the template's MAC."""
    cfg = load_config(None, {"lab": {"domain_type": "qemu", "max_vcpus": 1}})
    vm = lab_vm(cfg, "symbiont-lab-template-1")
    kw = {"tap_link": ("tpl0", "52:54:00:aa:bb:cc")} if nic else {}
    root = ET.fromstring(domain_xml(cfg, vm, fake_image(tmp_path), owner=LabOwner("template-run", 1, "h", 1.0),
                                    **kw))
    ET.SubElement(root, "uuid").text = TEMPLATE_UUID
    disk = root.find("devices/disk")
    bs = ET.SubElement(disk, "backingStore", type="file")
    ET.SubElement(bs, "source", file="/var/lib/symbiont/images/golden.qcow2")
    root.find("devices/serial").append(ET.Element("source", path="/dev/pts/7"))
    ET.register_namespace("lab", LAB_NS)
    return ET.tostring(root, encoding="unicode")


def make(tmp_path: Path, name: str = "clone-1", **kw) -> tuple[ET.Element, str]:
    uid = kw.pop("uid", str(uuid.uuid4()))
    owner = LabOwner("clone-run", 42, "host", 2.0)
    out = clone_xml(
        kw.pop("xml", template_xml(tmp_path)), name, uid, tmp_path / name / "overlay.qcow2",
        kw.pop("channels", {"org.symbiont.agent.0": tmp_path / f"{name}.agent.sock",
                            "org.symbiont.gpu.0": tmp_path / f"{name}.gpu.sock"}),
        tmp_path / name / "console.log", mark_xml("abc123", owner),
    )
    return ET.fromstring(out), out


def test_clone_gets_its_own_identity_and_host_paths(tmp_path: Path) -> None:
    uid = str(uuid.uuid4())
    root, text = make(tmp_path, uid=uid)
    assert root.find("name").text == "clone-1"
    assert root.find("uuid").text == uid != TEMPLATE_UUID
    assert len(root.findall("uuid")) == 1
    disk = root.find("devices/disk")
    assert disk.find("source").get("file") == str(tmp_path / "clone-1" / "overlay.qcow2")
    assert disk.find("backingStore") is None  # libvirt probes the overlay's own chain
    socks = {c.find("target").get("name"): c.find("source").get("path") for c in root.iterfind("devices/channel")}
    assert socks == {"org.symbiont.agent.0": str(tmp_path / "clone-1.agent.sock"),
                     "org.symbiont.gpu.0": str(tmp_path / "clone-1.gpu.sock")}
    serial = root.find("devices/serial")
    assert serial.find("source") is None  # the template's pty is not the clone's
    assert serial.find("log").get("file") == str(tmp_path / "clone-1" / "console.log")
    mac = root.find("devices/interface/mac").get("address")
    assert mac != "52:54:00:aa:bb:cc" and mac.startswith("52:54:00:")
    mark = parse_mark(text)
    assert mark is not None and mark.owner.run == "clone-run" and mark.owner.pid == 42
    assert len(root.findall(f"metadata/{{{LAB_NS}}}lab")) == 1  # the template's mark replaced


def test_what_the_guest_sees_is_kept(tmp_path: Path) -> None:
    tpl = ET.fromstring(template_xml(tmp_path))
    root, _ = make(tmp_path)
    for path in ("memory", "currentMemory", "vcpu", "os/kernel", "os/cmdline", "features", "devices/memballoon"):
        assert ET.tostring(root.find(path)) == ET.tostring(tpl.find(path)), path
    assert root.get("type") == tpl.get("type")
    assert [d.tag for d in root.find("devices")] == [d.tag for d in tpl.find("devices")]


def test_two_clones_differ_in_everything_host_side(tmp_path: Path) -> None:
    a, _ = make(tmp_path, "clone-a")
    b, _ = make(tmp_path, "clone-b")
    for path in ("uuid", "name"):
        assert a.find(path).text != b.find(path).text
    assert a.find("devices/interface/mac").get("address") != b.find("devices/interface/mac").get("address")
    assert a.find("devices/disk/source").get("file") != b.find("devices/disk/source").get("file")


def test_missing_channel_or_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CloneError, match="org.symbiont.other"):
        make(tmp_path, channels={"org.symbiont.agent.0": tmp_path / "a", "org.symbiont.gpu.0": tmp_path / "g",
                                 "org.symbiont.other": tmp_path / "o"})
    with pytest.raises(CloneError, match="no socket path given for channel 'org.symbiont.gpu.0'"):
        make(tmp_path, channels={"org.symbiont.agent.0": tmp_path / "a"})
    with pytest.raises(CloneError, match="not a <domain>"):
        make(tmp_path, xml="<network/>")
    with pytest.raises(ValueError):
        make(tmp_path, uid="not-a-uuid")


def test_template_key_follows_image_and_memory(tmp_path: Path) -> None:
    cfg = load_config(None, {"lab": {"domain_type": "qemu"}})
    k = template_key(cfg, fake_image(tmp_path), 512)
    assert k == template_key(cfg, fake_image(tmp_path), 512)
    assert k != template_key(cfg, fake_image(tmp_path, "def456"), 512)  # a new image (agent) rebuilds
    assert k != template_key(cfg, fake_image(tmp_path), 768)
    cfg2 = load_config(None, {"lab": {"domain_type": "qemu", "tcg_tb_cache_mib": 16}})
    assert k != template_key(cfg2, fake_image(tmp_path), 512)


def fake_save(path: Path, xml: str, cookie: bytes | None, payload: bytes, pad: int = 65536) -> None:
    """A save image laid out as libvirt 9.0 writes one (virQEMUSaveDataWrite)."""
    from symbiont_research.lab.clone import SAVE_HEADER, SAVE_MAGIC

    body = xml.encode() + b"\0"
    off = 0
    if cookie is not None:
        off = len(body)
        body += cookie + b"\0"
    data_len = len(body) + pad
    path.write_bytes(SAVE_HEADER.pack(SAVE_MAGIC, 2, data_len, 1, 0, off, b"\0" * 56)
                     + body + b"\0" * pad + payload)


@pytest.mark.parametrize("cookie", [b"<cookie><cpu/></cookie>", None])
def test_save_header_xml_rewritten_in_place_stream_untouched(tmp_path: Path, cookie: bytes | None) -> None:
    from symbiont_research.lab.clone import SAVE_HEADER, read_save_xml, write_save_xml

    save = tmp_path / "state.save"
    payload = bytes(range(256)) * 64
    fake_save(save, "<domain><name>template</name></domain>", cookie, payload)
    size = save.stat().st_size
    assert read_save_xml(save) == ("<domain><name>template</name></domain>", cookie or b"")
    longer = "<domain><name>clone-with-a-much-longer-name</name><uuid>x</uuid></domain>"
    write_save_xml(save, longer)
    assert read_save_xml(save) == (longer, cookie or b"")
    assert save.stat().st_size == size
    assert save.read_bytes().endswith(payload)  # the RAM stream after the header is unchanged
    write_save_xml(save, "<domain/>")  # shorter again: no tail of the longer XML survives
    assert read_save_xml(save)[0] == "<domain/>"
    head = SAVE_HEADER.unpack(save.read_bytes()[:SAVE_HEADER.size])
    assert head[0] == b"LibvirtQemudSave" and head[1] == 2 and head[3] == 1


def test_save_header_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    from symbiont_research.lab.clone import SAVE_HEADER, read_save_xml, write_save_xml

    save = tmp_path / "state.save"
    fake_save(save, "<domain/>", b"<cookie/>", b"RAM", pad=16)
    before = save.read_bytes()
    with pytest.raises(CloneError, match="does not fit"):
        write_save_xml(save, "<domain>" + "x" * 100 + "</domain>")
    assert save.read_bytes() == before  # nothing written
    partial = tmp_path / "partial.save"
    partial.write_bytes(b"LibvirtQemudPart" + before[16:])
    with pytest.raises(CloneError, match="not a complete libvirt save image"):
        read_save_xml(partial)
    other = tmp_path / "other.save"
    other.write_bytes(before[:SAVE_HEADER.size] + b"\0\0\0\0" + before[SAVE_HEADER.size:])  # a 96-byte header
    with pytest.raises(CloneError, match="no domain XML right after the 92-byte header"):
        read_save_xml(other)
    (tmp_path / "short.save").write_bytes(b"Libvirt")
    with pytest.raises(CloneError, match="too short"):
        read_save_xml(tmp_path / "short.save")


def test_a_template_without_uuid_gets_one_after_its_name(tmp_path: Path) -> None:
    tpl = ET.fromstring(template_xml(tmp_path))
    tpl.remove(tpl.find("uuid"))
    uid = str(uuid.uuid4())
    root, _ = make(tmp_path, xml=ET.tostring(tpl, encoding="unicode"), uid=uid)
    tags = [c.tag for c in root]
    assert root.find("uuid").text == uid and tags.index("uuid") == tags.index("name") + 1
