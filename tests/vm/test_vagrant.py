"""The Vagrant lab for real: the box built locally from the golden image recipe, one
``vagrant up`` (vagrant-libvirt) inside the network namespace ``symb-vg-ns`` with its own
libvirtd, the guest agent's handshake seen by a real ``symbiontd`` in the root namespace,
then ``vagrant destroy``. Everything is named ``symb-vg-*``; nothing else is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from symbiont.client import ApiError
from symbiont.config import load_config
from symbiont.host.libvirt_host import resolve_domain_type
from symbiont_research.lab.image import AGENT_PORT_NAME, BOX_PACKAGES, ImageError, make_recipe
from symbiont_research.lab.session import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "scripts" / "vagrant-lab.sh"
BASE = Path("/var/lib/symbiont/vagrant")
SOCKET = BASE / "libvirt" / "run" / "libvirt-sock"
URI = f"qemu:///system?socket={SOCKET}"
NS = "symb-vg-ns"
VM = "symb-vg-1"
CHANNEL = Path("/var/lib/symbiont/channels") / f"{VM}.agent.sock"


def lab(*args: str, log: Path, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """Run scripts/vagrant-lab.sh; its (long, progress-bar) output goes to ``log``."""
    with log.open("a") as out:
        out.write(f"\n$ vagrant-lab.sh {' '.join(args)}\n")
        out.flush()
        res = subprocess.run(
            ["bash", str(LAB), *args], stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
    if res.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"vagrant-lab.sh {' '.join(args)} exited {res.returncode}:\n{tail}")
    return res


def virsh(*args: str) -> str:
    res = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_box_recipe_is_the_lab_recipe_plus_vagrant_bits() -> None:
    lab, box = (
        make_recipe("http://mirror.invalid/debian"),
        make_recipe("http://mirror.invalid/debian", "vagrant"),
    )
    assert box.packages == lab.packages + BOX_PACKAGES and "openssh-server" in box.packages
    assert box.agent_digest == lab.agent_digest and box.suite == lab.suite and box.size == lab.size
    assert box.digest() != lab.digest() and box.files_digest != lab.files_digest
    # The lab image's hash does not depend on the variant field existing (cached images stay valid).
    legacy = {k: v for k, v in dataclasses.asdict(lab).items() if k != "variant"}
    assert lab.digest() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(ImageError, match="unknown image variant"):
        make_recipe("http://mirror.invalid/debian", "cloud")


def test_vagrantfile_validates(tmp_path: Path) -> None:
    assert shutil.which("vagrant"), (
        "vagrant missing: scripts/bootstrap.sh installs vagrant and vagrant-libvirt"
    )
    env = {
        **os.environ,
        "VAGRANT_CWD": str(ROOT / "vagrant"),
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    for n in ("1", "3"):
        res = subprocess.run(
            ["vagrant", "validate"],
            env={**env, "SYMBIONT_VMS": n},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0 and "validated successfully" in res.stdout, res.stdout + res.stderr
    # A bad VM count is an error that names the variable, not a silent default.
    res = subprocess.run(
        ["vagrant", "validate"], env={**env, "SYMBIONT_VMS": "0"}, capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0 and "SYMBIONT_VMS" in res.stdout + res.stderr


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.vm
def test_vagrant_up_agent_handshake_then_destroy(as_root: None, tmp_path: Path) -> None:
    log = tmp_path / "vagrant-lab.log"
    # A clean start: whatever an interrupted earlier run left behind (by prefix only).
    lab("netns-down", log=log)
    daemon: DaemonProcess | None = None
    try:
        t0 = time.monotonic()
        lab("up", "1", log=log)
        up_s = time.monotonic() - t0

        # The management network (private range) exists only inside the namespace.
        root_addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        ns_addrs = subprocess.run(
            ["ip", "netns", "exec", NS, "ip", "-4", "-o", "addr"], capture_output=True, text=True
        ).stdout
        assert "192.168.121." in ns_addrs, ns_addrs
        assert "192.168.121." not in root_addrs, root_addrs
        # ... and the host's own libvirtd does not know the lab's domain.
        host = subprocess.run(
            ["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert VM not in host.stdout.split()

        # The domain vagrant made is what the daemon expects.
        xml = ET.fromstring(virsh("dumpxml", VM))
        assert xml.get("type") == resolve_domain_type("auto")
        if xml.get("type") == "qemu":
            assert xml.findtext("cpu/model") == "qemu64"
        channels = xml.findall("devices/channel[@type='unix']")
        assert [(c.find("target").get("name"), c.find("source").get("path")) for c in channels] == [
            (AGENT_PORT_NAME, str(CHANNEL))
        ]
        assert xml.find("devices/memballoon").get("model") == "virtio"
        assert xml.findtext("os/kernel", "").endswith("/vmlinuz")  # direct kernel boot from the box

        # A real symbiontd in the root namespace, pointed at the lab's libvirtd by its socket file.
        cfg_path = tmp_path / "symbiontd.yaml"
        cfg_path.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(tmp_path / "state"),
                    "socket": str(tmp_path / "symbiontd.sock"),
                    "libvirt_uri": URI,
                    "control": {"period_s": 1.0},
                }
            )
        )
        daemon = DaemonProcess(cfg_path, load_config(cfg_path), tmp_path / "symbiontd.log")
        daemon.start()
        with daemon.client() as c:
            c.post("/v1/vms", {"name": VM, "memory": {"min_mib": 128}})
            deadline = time.monotonic() + 240
            view: dict = {}
            while time.monotonic() < deadline:
                try:
                    view = c.get(f"/v1/vms/{VM}")
                except ApiError:
                    view = {}
                if view.get("cooperative") and view.get("guest", {}).get("mem_total_mib"):
                    break
                time.sleep(1)
            assert view.get("cooperative"), f"agent never cooperative: {view}; log: {daemon.log_tail()}"
            assert view["agent"]["handshakes"] >= 1
            assert {"ping", "stats"} <= set(view["agent"]["hello"]["caps"])
            assert view["state"] == "running"
            assert 256 < view["guest"]["mem_total_mib"] <= 512  # the guest's own view, over the agent
        print(f"vagrant up of one VM (box reused or built): {up_s:.0f} s")
    finally:
        if daemon is not None:
            daemon.stop()
        lab("destroy", log=log)
        assert VM not in virsh("list", "--all", "--name").split()
        assert not CHANNEL.exists()
        lab("netns-down", log=log)
    assert NS not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
