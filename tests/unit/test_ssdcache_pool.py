"""Which block devices a pool may never touch (issue 16, item 3), on a fake /sys and /proc: a
disk whose *partition* is mounted or held counts as in use. (This host's loop devices cannot
carry partitions, so the real-device test, tests/host/test_ssdcache_hostile.py, covers whole
devices: mounted ext4, swap.)"""

from __future__ import annotations

import os
from pathlib import Path

from symbiont.ssdcache.pool import _in_use, device_allowed

DISK = os.makedev(8, 16)


def fake(tmp: Path, mountinfo: str = "", held: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    sys_root, proc = tmp / "sys", tmp / "proc"
    disk = sys_root / "devices" / "pci0" / "block" / "sdb"
    for name, dev, part in (("", "8:16", False), ("sdb1", "8:17", True), ("sdb2", "8:18", True)):
        d = disk / name if name else disk
        (d / "holders").mkdir(parents=True)
        (d / "dev").write_text(dev + "\n")
        if part:
            (d / "partition").write_text("1\n")
        for h in (held or {}).get(name or "sdb", []):
            (d / "holders" / h).mkdir()
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / "8:16").symlink_to(disk)
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    return sys_root, proc


def test_an_unused_disk_is_free(tmp_path: Path) -> None:
    mi = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    assert _in_use(DISK, "sdb", *fake(tmp_path, mi)) == ""


def test_a_mounted_partition_makes_the_disk_busy(tmp_path: Path) -> None:
    mi = "22 1 254:0 / / rw shared:1 - ext4 /dev/vda rw\n36 22 8:18 / /data rw shared:2 - xfs /dev/sdb2 rw\n"
    assert _in_use(DISK, "sdb", *fake(tmp_path, mi)) == "sdb2 is mounted on /data"


def test_a_mounted_disk_is_busy(tmp_path: Path) -> None:
    mi = "36 22 8:16 / /srv rw shared:2 - ext4 /dev/sdb rw\n"
    assert _in_use(DISK, "sdb", *fake(tmp_path, mi)) == "sdb is mounted on /srv"


def test_a_held_partition_or_disk_makes_it_busy(tmp_path: Path) -> None:
    assert _in_use(DISK, "sdb", *fake(tmp_path / "a", held={"sdb1": ["dm-0"]})) == "sdb1 is held by dm-0"
    assert _in_use(DISK, "sdb", *fake(tmp_path / "b", held={"sdb": ["md127"]})) == "sdb is held by md127"


def test_only_listed_devices_are_allowed() -> None:
    assert device_allowed("/dev/nvme1n1", ["/dev/nvme1n1"])
    assert device_allowed("/dev/loop7", ["/dev/loop*"])
    assert not device_allowed("/dev/vda", ["/dev/loop*", "/dev/nvme1n1"])
    assert not device_allowed("/dev/vda", [])
