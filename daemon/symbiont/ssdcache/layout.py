"""Geometry of the elastic SSD and SymFlex's address translation (pure).

The shared SSD (the *pool*) is cut into physical blocks of 1 MiB, each contiguous on disk.
A VM's virtual SSD is cut into logical blocks of the same size. A sector of the virtual disk
is translated exactly as in the SymFlex slides::

    lbn    = sector // 2048          (sectors per virtual block)
    offset = sector %  2048
    physical sector = pbn * 2048 + offset      where pbn = map[lbn]

The slides' worked example reads "sector 5000 → lbn 2, offset 4 → pbn 10 → physical sector
20484"; by the formula sector 5000 has offset 904 (physical 21384), and lbn 2 / offset 4 is
sector 4100 (physical 20484). We implement the formula (tests cover both numbers). A logical
block with no physical block behind it is *unbacked*: I/O to it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

SECTOR_SIZE = 512
BLOCK_SIZE = 1 << 20  # 1 MiB virtual and physical blocks
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR_SIZE  # 2048
BLOCK_SHIFT = 20
UNBACKED = -1


class Unbacked(LookupError):
    """A logical block has no physical block behind it."""

    def __init__(self, lbn: int) -> None:
        super().__init__(f"logical block {lbn} is not backed")
        self.lbn = lbn


def translate_sector(sector: int, pbn_of: Callable[[int], int]) -> int:
    """Physical sector of virtual ``sector``; ``pbn_of(lbn)`` returns the pbn or UNBACKED."""
    if sector < 0:
        raise ValueError("sector must not be negative")
    lbn, offset = divmod(sector, SECTORS_PER_BLOCK)
    pbn = pbn_of(lbn)
    if pbn < 0:
        raise Unbacked(lbn)
    return pbn * SECTORS_PER_BLOCK + offset


def segments(offset: int, length: int) -> Iterator[tuple[int, int, int]]:
    """Split a byte range of the virtual disk at block boundaries: ``(lbn, offset_in_block, length)``."""
    while length > 0:
        lbn = offset >> BLOCK_SHIFT
        off = offset & (BLOCK_SIZE - 1)
        n = min(length, BLOCK_SIZE - off)
        yield lbn, off, n
        offset += n
        length -= n


def translate_range(offset: int, length: int, pbn_of: Callable[[int], int]) -> list[tuple[int, int, int]]:
    """``(physical_byte_offset, buffer_offset, length)`` pieces of a virtual byte range.

    The same translation as :func:`translate_sector`, in bytes: the physical byte offset of a
    virtual byte ``b`` is ``translate_sector(b // 512) * 512 + b % 512``. Raises
    :class:`Unbacked` naming the first unbacked block; nothing is partially translated.
    """
    out: list[tuple[int, int, int]] = []
    done = 0
    for lbn, off, n in segments(offset, length):
        pbn = pbn_of(lbn)
        if pbn < 0:
            raise Unbacked(lbn)
        phys = (pbn << BLOCK_SHIFT) | off
        if out and out[-1][0] + out[-1][2] == phys:  # physically contiguous: one piece
            p, b, m = out[-1]
            out[-1] = (p, b, m + n)
        else:
            out.append((phys, done, n))
        done += n
    return out


def blocks_for_mib(mib: int) -> int:
    """Blocks in ``mib`` MiB (1 MiB blocks: the same number)."""
    return int(mib) * (1 << 20) // BLOCK_SIZE


def ranges(values: list[int] | set[int]) -> list[list[int]]:
    """Compress integers into ``[start, count]`` runs (sorted): how block lists travel."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and out[-1][0] + out[-1][1] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def expand(runs: list[list[int]]) -> list[int]:
    return [s + i for s, n in runs for i in range(n)]
