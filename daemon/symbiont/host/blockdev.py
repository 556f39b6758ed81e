"""Block devices of the host: loop devices (``losetup``) and whether a device is in use
(mounted, held by device-mapper/md/bcache, or swap, from sysfs and /proc). The ssdcache pool
uses these; they live here because host/ is the only code that reads sysfs and runs the
system's tools."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
from pathlib import Path

from symbiont.host.port import HostError

log = logging.getLogger(__name__)


class BlockDevError(HostError):
    """A loop device could not be found, attached or detached; the message says why."""


def device_in_use(device: str, sys_root: str = "/sys", proc_root: str = "/proc") -> str:
    """Why ``device`` (or one of its partitions) must not be touched: mounted, held by another
    device (device-mapper, md, bcache), or swap; empty when none of these."""
    return _in_use(os.stat(device).st_rdev, os.path.basename(os.path.realpath(device)),
                   Path(sys_root), Path(proc_root))


def _in_use(rdev: int, name: str, sys_root: Path, proc_root: Path) -> str:
    top = sys_root / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
    devs = {rdev: name}
    dirs = {rdev: top.resolve()} if top.exists() else {}
    if dirs:
        for part in sorted(dirs[rdev].iterdir()):
            if (part / "partition").exists() and (part / "dev").exists():
                maj, mnr = (part / "dev").read_text().strip().split(":")
                devs[os.makedev(int(maj), int(mnr))] = part.name
                dirs[os.makedev(int(maj), int(mnr))] = part
    for dnum, d in dirs.items():
        holders = sorted(h.name for h in (d / "holders").iterdir()) if (d / "holders").is_dir() else []
        if holders:
            return f"{devs[dnum]} is held by {', '.join(holders)}"
    with contextlib.suppress(OSError):
        for line in (proc_root / "self" / "mountinfo").read_text().splitlines():
            f = line.split()
            if len(f) > 4:
                maj, _, mnr = f[2].partition(":")
                if maj.isdigit() and mnr.isdigit() and os.makedev(int(maj), int(mnr)) in devs:
                    return f"{devs[os.makedev(int(maj), int(mnr))]} is mounted on {f[4]}"
    for table, what in (("mounts", "mounted"), ("swaps", "in use as swap")):
        with contextlib.suppress(OSError):
            for line in (proc_root / table).read_text().splitlines():
                f = line.split()
                if f and f[0].startswith("/"):
                    with contextlib.suppress(OSError):
                        st = os.stat(f[0])
                        if stat.S_ISBLK(st.st_mode) and st.st_rdev in devs:
                            return f"{devs[st.st_rdev]} is {what} ({f[0]})"
    return ""


def _run(args: list[str]) -> str:
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise BlockDevError(f"{' '.join(args)} failed: {res.stderr.strip() or res.returncode}")
    return res.stdout.strip()


def loop_devices_of(path: str | Path) -> list[str]:
    """Loop devices attached to ``path`` (``losetup -j``)."""
    out = _run(["losetup", "-n", "-O", "NAME", "-j", str(Path(path).resolve())])
    return [line.strip() for line in out.splitlines() if line.strip()]


def attach_loop(path: str | Path) -> str:
    """Attach ``path`` to a free loop device; direct I/O where the backing file system allows."""
    p = str(Path(path).resolve())
    try:
        return _run(["losetup", "--find", "--show", "--direct-io=on", p])
    except BlockDevError as exc:
        log.info("losetup --direct-io=on refused (%s); attaching buffered", exc)
        return _run(["losetup", "--find", "--show", p])


def detach_loop(dev: str) -> None:
    _run(["losetup", "-d", dev])
