"""One ``/proc/PID/smaps`` parser (host/procmem) serves dedup and paging alike."""

from __future__ import annotations

import pytest

from symbiont.host import pageout as po
from symbiont.host import procmem

MIB = 1 << 20

SMAPS = (
    "7f0000000000-7f0020000000 rw-p 00000000 00:00 0 \n"
    "Rss:              102400 kB\nSwap:              409600 kB\nSwapPss:      1 kB\n"
    "VmFlags: rd wr mr mw me ac mg\n"
    "7f0040000000-7f0060000000 rw-p 00000000 00:00 0 \n"
    "Rss:              204800 kB\nSwap:                   0 kB\nVmFlags: rd wr mr mw me ac\n"
    "7f0080000000-7f0084000000 rwxp 00000000 00:00 0 \n"
    "Rss:               x kB\n"
    "55d0a0000000-55d0a0001000 r--p 0001f000 fd:01 42 /usr/bin/qemu-system-x86_64\n"
)


def test_one_parse_has_every_field_and_fallback() -> None:
    maps = procmem.parse_smaps(SMAPS)
    assert [m.start for m in maps] == [0x7F0000000000, 0x7F0040000000, 0x7F0080000000, 0x55D0A0000000]
    ram, other, code, exe = maps
    assert (ram.rss_kib, ram.swap_kib, ram.mergeable) == (102400, 409600, True)  # SwapPss is not Swap
    assert (other.rss_kib, other.swap_kib, other.mergeable) == (204800, 0, False)
    assert (code.rss_kib, code.swap_kib, code.flags) == (0, 0, frozenset())  # bad or missing: 0, no flags
    assert exe.offset == 0x1F000 and exe.path == "/usr/bin/qemu-system-x86_64" and not exe.anonymous
    assert po.code_cache(maps) == [code]


def test_guest_ram_counts_swapped_pages_for_both_users() -> None:
    """Two mappings of the RAM's size: the one mostly in swap (a paged-out guest) holds more."""
    maps = procmem.parse_smaps(SMAPS)
    assert procmem.find_guest_ram(maps, 512 * MIB) == maps[0]
    assert po.guest_ram(maps, 512 * MIB) == maps[0]
    assert procmem.find_guest_ram(maps, 4096 * MIB) is None
    with pytest.raises(po.PageoutError, match="4096 MiB"):
        po.guest_ram(maps, 4096 * MIB)


def test_read_smaps_fails_with_each_users_error() -> None:
    with pytest.raises(procmem.ProcMemError):
        procmem.read_smaps(1 << 30)
    with pytest.raises(po.PageoutError, match="does not exist"):
        po.read_smaps(1 << 30)


def test_a_process_that_exits_during_the_pagemap_read_is_a_host_error(monkeypatch, tmp_path) -> None:
    """ESRCH from pread (the process exited after the open) is the seam's ProcessGone, a
    HostError the parts handle per VM; it was a bare ProcessLookupError that failed the dedup
    part's whole period in the density run's teardown."""
    import os

    import pytest

    from symbiont.host import procmem
    from symbiont.host.port import HostError

    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "pagemap").write_bytes(b"\0" * 64)

    def gone(*_a: object) -> bytes:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(os, "pread", gone)
    with pytest.raises(procmem.ProcessGone) as exc:
        procmem.read_pagemap(4242, 0, 8 * procmem.PAGE_SIZE, proc=tmp_path)
    assert isinstance(exc.value, HostError) and "4242" in str(exc.value)
