"""The paging mechanisms on the real kernel: a zram swap tier, and process_madvise on another
process's memory — page-out (RSS falls, the tier holds it, the data is intact) and the two
prefetch modes (willneed: into the swap cache; touch: faulted in and mapped)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from symbiont.host import pageout as po
from symbiont.host import zram
from symbiont.host.procmem import parse_smaps

pytestmark = [pytest.mark.root]
MIB = 1 << 20
SIZE = 256 * MIB

# A process with 256 MiB of private anonymous memory, half-compressible, that prints its
# checksum on every line it reads.
HELPER = """
import hashlib, mmap, random, sys
b = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
rnd = random.Random(7)
for i in range(0, len(b), 1 << 20):
    blk = rnd.randbytes(2048) + bytes(2048)
    b[i:i + (1 << 20)] = blk * 256
print(hashlib.sha256(b).hexdigest(), flush=True)
while sys.stdin.readline():
    print(hashlib.sha256(b).hexdigest(), flush=True)
""".replace("SIZE", str(SIZE))


class Helper:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.first = self.proc.stdout.readline().strip()
        self.region = po.guest_ram(po.read_smaps(self.proc.pid), SIZE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def checksum(self) -> str:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def present_swapped(self) -> tuple[int, int]:
        p, s = po.residency(po.pagemap(self.pid, self.region.start, self.region.size))
        return int(p.sum()), int(s.sum())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tier(as_root: None) -> Iterator[int]:
    num = zram.create_swap(512 * MIB, "lzo-rle", "symbiont-test", 32000)
    try:
        yield num
    finally:
        zram.remove(num)
    assert not zram.exists(num) and zram.dev_path(num) not in zram.swaps()


@pytest.fixture
def helper() -> Iterator[Helper]:
    h = Helper()
    yield h
    h.close()


def test_tier_is_our_labelled_swap_and_goes_away(tier: int) -> None:
    sw = zram.swaps()[zram.dev_path(tier)]
    assert sw["priority"] == 32000 and sw["size_kib"] >= 500 * 1024
    assert zram.swap_label(tier) == "symbiont-test"
    assert zram.disksize(tier) == 512 * MIB


def test_pageout_of_another_process_keeps_its_data(tier: int, helper: Helper) -> None:
    assert helper.region.size == SIZE and helper.present_swapped()[0] == SIZE // po.PAGE_SIZE
    rss0 = po.status_kib(helper.pid)["VmRSS"]
    used0 = zram.swaps()[zram.dev_path(tier)]["used_kib"]
    advised = po.pageout(helper.pid, [(helper.region.start, helper.region.size)])
    assert advised == SIZE
    st = po.status_kib(helper.pid)
    assert st["VmRSS"] < rss0 - 240 * 1024, (rss0, st)  # 256 MiB left the process's RSS
    assert st["VmSwap"] >= 250 * 1024
    assert zram.swaps()[zram.dev_path(tier)]["used_kib"] >= used0 + 250 * 1024
    mm = zram.stats(tier)
    assert mm.orig_data_size >= 250 * MIB and mm.compr_data_size < mm.orig_data_size  # compressed in RAM
    present, swapped = helper.present_swapped()
    assert present < 256 and swapped >= SIZE // po.PAGE_SIZE - 256
    region = [r for r in po.read_smaps(helper.pid) if r.start == helper.region.start][0]
    assert region.swap_kib >= 250 * 1024
    assert helper.checksum() == helper.first  # faulted back in, byte for byte


@pytest.mark.parametrize("mode", ["willneed", "touch"])
def test_prefetch_brings_pages_back_before_the_process_runs(tier: int, helper: Helper, mode: str) -> None:
    r = helper.region
    po.pageout(helper.pid, [(r.start, r.size)])
    swapped_before = zram.swaps()[zram.dev_path(tier)]["used_kib"]
    half = [(r.start, r.size // 2)]
    if mode == "touch":
        assert po.touch(helper.pid, half) == r.size // 2
        present, swapped = helper.present_swapped()
        # Mapped again: the process will not fault on them.
        assert present >= r.size // 2 // po.PAGE_SIZE and swapped <= r.size // 2 // po.PAGE_SIZE + 16
    else:
        po.willneed(helper.pid, half)
        # In the swap cache (decompressed) but not mapped: pagemap still says swapped.
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        assert int(meminfo["SwapCached"].split()[0]) >= 100 * 1024
    assert zram.swaps()[zram.dev_path(tier)]["used_kib"] <= swapped_before
    assert helper.checksum() == helper.first


def test_madvise_errors_are_clear(tier: int) -> None:
    with pytest.raises(po.PageoutError, match="pidfd_open"):
        po.pageout(2**22 + 12345, [(0x1000, 4096)])


def test_guest_ram_is_told_apart_from_the_code_cache() -> None:
    """QEMU under TCG: RAM is rw-p of the boot size; the rwxp translation cache is apart."""
    text = "".join(
        f"{a:x}-{a + size:x} {perms} 00000000 00:00 0 {path}\nRss: {rss} kB\nSwap: 0 kB\nVmFlags: rd wr\n"
        for a, size, perms, path, rss in [
            (0x10000000, 64 * MIB, "rwxp", "", 60000),
            (0x20000000, 64 * MIB, "rwxp", "", 60000),
            (0x30000000, 512 * MIB + 2 * MIB, "rw-p", "", 190000),  # RAM, rounded up by QEMU
            (0x60000000, 1024 * MIB, "rw-p", "", 10),  # a bigger reservation is not RAM
            (0x70000000, 512 * MIB, "rw-s", "/memfd:x (deleted)", 0),
        ])
    regs = parse_smaps(text)
    ram = po.guest_ram(regs, 512 * MIB)
    assert ram.start == 0x30000000 and ram.rss_kib == 190000
    assert [r.start for r in po.code_cache(regs)] == [0x10000000, 0x20000000]
    with pytest.raises(po.PageoutError, match="2048 MiB"):
        po.guest_ram(regs, 2048 * MIB)
