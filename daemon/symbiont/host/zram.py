"""The host's swap tier: a zram device of our own, used as swap (sysfs + mkswap/swapon).

``/sys/class/zram-control/hot_add`` creates a device and answers its number;
``comp_algorithm`` must be written before ``disksize``. ``disksize`` is the number of swap
slots (the uncompressed size); ``mem_limit`` bounds the RAM the compressed pages may take. The
two are sized apart: a zero-filled page (a THP-backed guest's untouched 4 KiB subpages) is
stored as a "same-filled" page that costs no RAM but takes a slot, so a tier sized by RAM runs
out of slots long before its RAM is used (docs/paging.md). ``mkswap -L LABEL`` writes a swap header whose label names the
owner, so a restarted daemon can tell its device from anyone else's (it never touches a
device whose label is not its own). ``swapoff`` brings every page back into the memory of
the process that owns it: removing the tier loses nothing, it costs RAM and time.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ZRAM_CONTROL = Path("/sys/class/zram-control")
SYS_BLOCK = Path("/sys/block")
PROC_SWAPS = Path("/proc/swaps")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# What zram may offer; the kernel's own list (comp_algorithm) decides what this host has.
KNOWN_COMPRESSORS = ("lzo", "lzo-rle", "lz4", "lz4hc", "zstd", "deflate", "842")
_LABEL_OFFSET = 1024 + 4 + 4 + 4 + 16  # swap_header.info: version, last_page, nr_badpages, uuid
_SIGNATURE = b"SWAPSPACE2"


class ZramError(Exception):
    """zram is missing, or a step of creating/removing the device failed (message says why)."""


@dataclass(frozen=True)
class ZramStats:
    """``mm_stat`` (bytes): data stored, its compressed size, RAM used in all."""

    orig_data_size: int
    compr_data_size: int
    mem_used_total: int
    mem_limit: int
    mem_used_max: int
    same_pages: int
    pages_compacted: int
    huge_pages: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_mm_stat(text: str) -> ZramStats:
    v = [int(x) for x in text.split()] + [0] * 8
    return ZramStats(*v[:8])


def parse_swaps(text: str) -> dict[str, dict[str, int]]:
    """``/proc/swaps`` → {path: {size_kib, used_kib, priority}} (pure)."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 5:
            try:
                out[f[0]] = {"size_kib": int(f[2]), "used_kib": int(f[3]), "priority": int(f[4])}
            except ValueError:
                continue
    return out


def parse_algorithms(text: str) -> list[str]:
    """``comp_algorithm`` text (``lzo [lzo-rle] lz4``) → names, the selected one unbracketed."""
    return [w.strip("[]") for w in text.split()]


def available() -> bool:
    return (ZRAM_CONTROL / "hot_add").exists()


def dev_path(num: int) -> str:
    return f"/dev/zram{num}"


def _sys(num: int) -> Path:
    return SYS_BLOCK / f"zram{num}"


def exists(num: int) -> bool:
    return _sys(num).exists()


def compressors() -> list[str]:
    """Compressors this kernel's zram offers (read from any zram device), else the known list."""
    for d in sorted(SYS_BLOCK.glob("zram*")):
        try:
            return parse_algorithms((d / "comp_algorithm").read_text())
        except OSError:
            continue
    return list(KNOWN_COMPRESSORS)


def swaps() -> dict[str, dict[str, int]]:
    try:
        return parse_swaps(PROC_SWAPS.read_text())
    except OSError:
        return {}


def stats(num: int) -> ZramStats:
    try:
        return parse_mm_stat((_sys(num) / "mm_stat").read_text())
    except OSError as exc:
        raise ZramError(f"zram{num}: cannot read mm_stat: {exc.strerror}") from None


def disksize(num: int) -> int:
    try:
        return int((_sys(num) / "disksize").read_text())
    except (OSError, ValueError):
        return 0


def _write(num: int, attr: str, value: str) -> None:
    try:
        (_sys(num) / attr).write_text(value)
    except OSError as exc:
        raise ZramError(f"zram{num}: writing {value!r} to {attr} failed: {exc.strerror}") from None


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ZramError(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()}")


def hot_add() -> int:
    if not available():
        raise ZramError("zram is not available (no /sys/class/zram-control: modprobe zram)")
    try:
        return int((ZRAM_CONTROL / "hot_add").read_text())
    except (OSError, ValueError) as exc:
        raise ZramError(f"zram hot_add failed: {exc}") from None


def create_swap(size_bytes: int, compressor: str, label: str, priority: int,
                on_added: Callable[[int], None] = lambda num: None, mem_limit_bytes: int | None = None) -> int:
    """A new zram device of ``size_bytes`` slots whose compressed pages may take at most
    ``mem_limit_bytes`` of RAM (None: ``size_bytes``), formatted as swap labelled ``label`` and
    switched on; its number.

    ``on_added(num)`` runs right after ``hot_add`` (the caller records the device before
    anything else can fail). On any failure the half-made device is removed again.
    """
    num = hot_add()
    try:
        on_added(num)
        _write(num, "comp_algorithm", compressor)
        _write(num, "disksize", str(size_bytes))
        # The RAM the compressed pages may take (a store past it fails: the page stays resident).
        _write(num, "mem_limit", str(size_bytes if mem_limit_bytes is None else mem_limit_bytes))
        _run(["mkswap", "-L", label, dev_path(num)])
        _run(["swapon", "-p", str(priority), dev_path(num)])
    except BaseException:
        remove(num)
        raise
    return num


def swap_label(num: int) -> str | None:
    """The label of the swap header on ``/dev/zramN``, or None when it holds no swap header."""
    try:
        with open(dev_path(num), "rb") as fh:
            head = fh.read(PAGE_SIZE)
    except OSError:
        return None
    if len(head) < PAGE_SIZE or head[-len(_SIGNATURE):] != _SIGNATURE:
        return None
    return head[_LABEL_OFFSET:_LABEL_OFFSET + 16].split(b"\0", 1)[0].decode(errors="replace")


def is_swap(num: int) -> bool:
    return dev_path(num) in swaps()


def swapoff(num: int) -> None:
    """Switch the device off as swap; every page goes back to its owner's memory."""
    if is_swap(num):
        _run(["swapoff", dev_path(num)])


def remove(num: int) -> None:
    """swapoff (when on), reset, hot_remove; a device already gone is fine."""
    if not exists(num):
        return
    swapoff(num)
    if disksize(num):
        _write(num, "reset", "1")
    try:
        (ZRAM_CONTROL / "hot_remove").write_text(str(num))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ZramError(f"zram{num}: hot_remove failed: {exc.strerror}") from None

