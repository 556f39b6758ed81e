"""Build the Vagrant box ``symbiont/bookworm`` locally from the golden image recipe.

No box can be downloaded here, so the box is made from the same debootstrap recipe as
``symbiont image build``, in its ``vagrant`` variant (sshd, sudo, a ``vagrant`` user with
Vagrant's insecure key, DHCP on the first NIC). The image has no bootloader, so the box
carries the kernel and initrd and its own Vagrantfile boots them directly.

Usage (as root): ``.venv/bin/python vagrant/build_box.py OUT_DIR`` prints the .box path.
The box is rebuilt only when the recipe hash changes (the name of the .box says which).
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

from symbiont.config import load_config
from symbiont_research.lab.image import build_image, make_recipe

# The box's own Vagrantfile: merged under the user's, so a user can still override any of it.
BOX_VAGRANTFILE = """# Written by vagrant/build_box.py: direct kernel boot (the image has no bootloader).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    here = File.expand_path(File.dirname(__FILE__))
    libvirt.kernel = File.join(here, "vmlinuz")
    libvirt.initrd = File.join(here, "initrd.img")
    libvirt.cmd_line = "%(cmdline)s"
  end
end
"""


def build_box(out_dir: Path, config_path: str | None = None) -> Path:
    """Build (or reuse) the image and pack it as ``out_dir/symbiont-bookworm-<hash>.box``."""
    cfg = load_config(config_path)
    image = build_image(
        Path(cfg.lab.images_dir),
        Path(cfg.lab.cache_dir),
        make_recipe(cfg.lab.mirror, variant="vagrant"),
        step=lambda s: print(f"==> image: {s}", file=sys.stderr),
    )
    box = out_dir / f"symbiont-bookworm-{image.recipe_digest}.box"
    if box.exists():
        return box
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging-{image.recipe_digest}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    size_gib = int(image.info.get("recipe", {}).get("size", "2G").rstrip("G"))
    (staging / "metadata.json").write_text(
        json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": size_gib}) + "\n"
    )
    cmdline = image.info.get("cmdline", "root=/dev/vda rw console=ttyS0 quiet")
    (staging / "Vagrantfile").write_text(BOX_VAGRANTFILE % {"cmdline": cmdline})
    shutil.copyfile(image.qcow2, staging / "box.img")
    shutil.copyfile(image.kernel, staging / "vmlinuz")
    shutil.copyfile(image.initrd, staging / "initrd.img")
    partial = box.with_suffix(".box.partial")
    print(f"==> packing {box}", file=sys.stderr)
    with tarfile.open(partial, "w") as tar:  # uncompressed: qcow2 is compact already
        for name in ("metadata.json", "Vagrantfile", "box.img", "vmlinuz", "initrd.img"):
            tar.add(staging / name, arcname=name)
    partial.rename(box)
    shutil.rmtree(staging)
    for old in out_dir.glob("symbiont-bookworm-*.box"):  # boxes of older recipes
        if old != box:
            old.unlink()
    return box


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: build_box.py OUT_DIR [CONFIG]")
    print(build_box(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else None))
