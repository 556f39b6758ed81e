"""The golden guest image: a Debian bookworm root file system built with debootstrap.

Why this shape: lab VMs boot straight into the kernel (no bootloader, no partition table),
from a qcow2 overlay each on one read-only golden image (copy-on-write golden imaging, seed
004). The image carries the guest agent as an enabled systemd service, so a VM that boots
speaks to the daemon without any provisioning step.

The build is cached by a hash of its *recipe* (packages, suite, the agent's source, the unit
file and this builder's version): a second ``symbiont image build`` with the same recipe does
nothing, and any change to the agent rebuilds. ``mkfs.ext4 -d`` fills the file system from a
folder, so nothing is mounted on the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import symbiont_agent

BUILDER_VERSION = 3
SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "procps",
    "iproute2",
    "python3",
    "criu",
    "iptables",  # CRIU locks the network with iptables-restore (tcp_established, own netns)
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "e2fsprogs",
)
AGENT_PORT_NAME = "org.symbiont.agent.0"
IMAGE_SIZE = "2G"

AGENT_UNIT = f"""[Unit]
Description=symbiont guest agent (virtio-serial port {AGENT_PORT_NAME})
Documentation=file:///opt/symbiont-agent/README
After=systemd-udevd.service systemd-modules-load.service

[Service]
Type=simple
Environment=PYTHONPATH=/opt/symbiont-agent
ExecStart=/usr/bin/python3 -m symbiont_agent --port /dev/virtio-ports/{AGENT_PORT_NAME}
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

# Guest tweaks that make boots short and the lab usable from the serial console.
GUEST_FILES: dict[str, str] = {
    "etc/hostname": "symbiont-guest\n",
    "etc/hosts": "127.0.0.1 localhost symbiont-guest\n",
    "etc/fstab": "/dev/vda / ext4 rw,relatime 0 1\n",
    "etc/modules-load.d/symbiont.conf": "virtio_console\nvirtio_balloon\n",
    # Online hot-plugged vCPUs as soon as they appear (the agent does it too, on request).
    "etc/udev/rules.d/80-symbiont-cpu-online.rules": (
        'SUBSYSTEM=="cpu", ACTION=="add", TEST=="online", ATTR{online}=="0", ATTR{online}="1"\n'
    ),
    "etc/systemd/system/symbiont-agent.service": AGENT_UNIT,
    "etc/systemd/journald.conf.d/symbiont.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n",
    # An empty machine-id: each VM's overlay commits its own at first boot.
    "etc/machine-id": "",
}
GUEST_LINKS: dict[str, str] = {
    "etc/systemd/system/multi-user.target.wants/symbiont-agent.service": (
        "/etc/systemd/system/symbiont-agent.service"
    ),
    # Root logs in on the serial console without a password: a lab VM, never a server.
    "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service": (
        "/lib/systemd/system/serial-getty@.service"
    ),
}


# The Vagrant box variant (``make_recipe(variant="vagrant")``): the same recipe plus what
# vagrant-libvirt needs to reach a guest over its management network: sshd, sudo, a
# ``vagrant`` user with Vagrant's well-known insecure public key (lab VMs only), and DHCP on
# the first NIC through systemd-networkd. The default image's recipe hash is unchanged.
VAGRANT_PUBKEY = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFH"
    "zD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8Hfd"
    "OV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvx"
    "hMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== "
    "vagrant insecure public key"
)
BOX_PACKAGES = ("openssh-server", "sudo")
BOX_FILES: dict[str, str] = {
    "etc/systemd/network/80-symbiont-dhcp.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n",
    "etc/sudoers.d/vagrant": "vagrant ALL=(ALL) NOPASSWD: ALL\n",
    "etc/ssh/sshd_config.d/symbiont.conf": "UseDNS no\n",
}
BOX_LINKS: dict[str, str] = {
    "etc/systemd/system/multi-user.target.wants/systemd-networkd.service": (
        "/lib/systemd/system/systemd-networkd.service"
    ),
    "etc/systemd/system/sockets.target.wants/systemd-networkd.socket": "/lib/systemd/system/systemd-networkd.socket",
}
VARIANTS = ("", "vagrant")


class ImageError(Exception):
    """The image could not be built (a step failed; its output is in the message)."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the image's content."""

    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    mirror: str = ""
    size: str = IMAGE_SIZE
    builder_version: int = BUILDER_VERSION
    agent_digest: str = ""
    files_digest: str = ""
    variant: str = ""  # "" (lab image) or "vagrant" (the box); left out of the hash when empty

    def digest(self) -> str:
        fields = asdict(self)
        if not fields["variant"]:
            del fields["variant"]  # keeps the lab image's hash what it was before variants existed
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Image:
    """A built image: the files a lab VM boots from."""

    dir: Path
    qcow2: Path
    kernel: Path
    initrd: Path
    recipe_digest: str
    reused: bool = False
    info: dict = field(default_factory=dict)


def agent_source_dir() -> Path:
    return Path(symbiont_agent.__file__).resolve().parent


def _digest_tree(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def host_apt_mirror() -> str:
    """The Debian mirror the host's own apt uses (so the image comes from the same place)."""
    candidates = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            m = re.match(r"^URIs:\s*(\S+)", line) or re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    raise ImageError(
        "no Debian mirror found in /etc/apt/sources.list*; set image.mirror in the config"
    )


def make_recipe(mirror: str = "", variant: str = "") -> Recipe:
    if variant not in VARIANTS:
        raise ImageError(f"unknown image variant {variant!r} (known: {', '.join(map(repr, VARIANTS))})")
    parts: list = [GUEST_FILES, GUEST_LINKS]
    packages = PACKAGES
    if variant == "vagrant":
        parts += [BOX_FILES, BOX_LINKS, VAGRANT_PUBKEY]
        packages = PACKAGES + BOX_PACKAGES
    files_blob = json.dumps(parts, sort_keys=True).encode()
    return Recipe(
        packages=packages,
        mirror=mirror or host_apt_mirror(),
        agent_digest=_digest_tree(agent_source_dir()),
        files_digest=hashlib.sha256(files_blob).hexdigest()[:16],
        variant=variant,
    )


def _run(cmd: list[str], log: Callable[[str], None], **kw) -> None:
    log("$ " + " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-25:])
        raise ImageError(f"{cmd[0]} failed (exit {res.returncode}):\n{tail}")


def image_paths(images_dir: Path, digest: str) -> Image:
    d = images_dir / f"bookworm-{digest}"
    return Image(d, d / "golden.qcow2", d / "vmlinuz", d / "initrd.img", digest)


def find_built(images_dir: Path, recipe: Recipe) -> Image | None:
    img = image_paths(images_dir, recipe.digest())
    if (img.dir / "image.json").exists() and all(p.exists() for p in (img.qcow2, img.kernel, img.initrd)):
        img.reused = True
        img.info = json.loads((img.dir / "image.json").read_text())
        return img
    return None


def build_image(
    images_dir: Path,
    cache_dir: Path,
    recipe: Recipe | None = None,
    force: bool = False,
    step: Callable[[str], None] = lambda s: None,
    log: Callable[[str], None] = lambda s: None,
) -> Image:
    """Build (or reuse) the golden image for ``recipe`` under ``images_dir``.

    ``step`` is told each stage's name (for a progress display); ``log`` gets each command.
    """
    recipe = recipe or make_recipe()
    if not force:
        found = find_built(images_dir, recipe)
        if found:
            step("reusing cached image")
            return found
    images_dir.mkdir(parents=True, exist_ok=True)
    # One build at a time per images folder: a second builder waits, then reuses the result
    # (replacing an image while a VM boots from it would pull the disk from under the VM).
    with open(images_dir / ".build.lock", "w") as lock:
        if _locked(lock):
            step("waiting for another image build")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            found = find_built(images_dir, recipe)
            if found:
                step("reusing the image another build just made")
                return found
        return _build_locked(images_dir, cache_dir, recipe, step, log)


def _locked(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def _build_locked(
    images_dir: Path, cache_dir: Path, recipe: Recipe, step: Callable[[str], None], log: Callable[[str], None]
) -> Image:
    if os.geteuid() != 0:
        raise ImageError("building the image needs root (debootstrap chroots); run as root")
    for tool in ("debootstrap", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} not found; install debootstrap, e2fsprogs and qemu-utils")
    img = image_paths(images_dir, recipe.digest())
    images_dir.mkdir(parents=True, exist_ok=True)
    debs = cache_dir / "debootstrap"
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="symbiont-image-", dir=images_dir) as tmp:
        root = Path(tmp) / "rootfs"
        step("debootstrap (downloads packages once, then reuses the cache)")
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(recipe.packages)}",
                f"--cache-dir={debs.resolve()}",
                recipe.suite,
                str(root),
                recipe.mirror,
            ],
            log,
        )
        step("installing the guest agent and its systemd unit")
        _customize(root)
        if recipe.variant == "vagrant":
            _customize_box(root, log)
        step("copying kernel and initrd for direct boot")
        staging = Path(tmp) / "out"
        staging.mkdir()
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise ImageError("no kernel/initrd in the image's /boot (linux-image-cloud-amd64 missing?)")
        shutil.copy2(kernels[-1], staging / "vmlinuz")
        shutil.copy2(initrds[-1], staging / "initrd.img")
        kernel_version = kernels[-1].name.removeprefix("vmlinuz-")
        # Trim what a lab VM never needs: apt lists and the package cache.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / junk, ignore_errors=True)
        step("mkfs.ext4 -d (no mount) and qemu-img convert to qcow2")
        raw = Path(tmp) / "golden.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "symbiont-root", "-d", str(root), str(raw), recipe.size], log)
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(staging / "golden.qcow2")], log)
        raw.unlink()
        info = {
            "recipe": asdict(recipe),
            "digest": recipe.digest(),
            "kernel_version": kernel_version,
            "cmdline": "root=/dev/vda rw console=ttyS0 quiet",
        }
        (staging / "image.json").write_text(json.dumps(info, indent=2) + "\n")
        if img.dir.exists():
            shutil.rmtree(img.dir)
        staging.rename(img.dir)
        # The rootfs was made by root with device nodes; remove it while we still can.
        shutil.rmtree(root, ignore_errors=True)
    img.info = info
    # The golden image is read-only: overlays take the writes.
    os.chmod(img.qcow2, 0o444)
    return img


def _customize(root: Path) -> None:
    """Write the agent, its unit and the guest tweaks into the root file system."""
    agent_dst = root / "opt/symbiont-agent/symbiont_agent"
    if agent_dst.exists():
        shutil.rmtree(agent_dst)
    shutil.copytree(agent_source_dir(), agent_dst, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "opt/symbiont-agent/README").write_text(
        "symbiont guest agent: standard library only; run by symbiont-agent.service.\n"
    )
    for rel, text in GUEST_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for rel, target in GUEST_LINKS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target)
    # Empty root password for the serial console of a lab VM.
    shadow = root / "etc/shadow"
    if shadow.exists():
        lines = shadow.read_text().splitlines()
        lines = [("root::" + ln.split(":", 2)[2]) if ln.startswith("root:") else ln for ln in lines]
        shadow.write_text("\n".join(lines) + "\n")


def _customize_box(root: Path, log: Callable[[str], None]) -> None:
    """The Vagrant box additions: networkd DHCP, sudo, and the ``vagrant`` user with the key."""
    for rel, text in BOX_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    os.chmod(root / "etc/sudoers.d/vagrant", 0o440)
    for rel, target in BOX_LINKS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target)
    if not (root / "home/vagrant").exists():
        _run(["chroot", str(root), "useradd", "-m", "-s", "/bin/bash", "-G", "sudo", "vagrant"], log)
    ssh_dir = root / "home/vagrant/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(VAGRANT_PUBKEY + "\n")
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    home = root / "home/vagrant"
    uid, gid = home.stat().st_uid, home.stat().st_gid
    for p in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(p, uid, gid)
