"""Where a process's host memory goes, read from the real smaps/status through SystemHost: a
helper with a 256 MiB anonymous buffer standing in for a QEMU (issue 15 item 4)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from symbiont.config import Config
from symbiont.host import zram
from symbiont.host.system import SystemHost
from symbiont.paging.part import PagingPart
from tests.fakes import Env
from tests.host.test_paging_mechanism import SIZE, Helper

pytestmark = [pytest.mark.root]
MIB = 1 << 20


@pytest.fixture
def helper() -> Iterator[Helper]:
    h = Helper()
    yield h
    h.close()


def test_breakdown_of_a_real_process_before_and_after_a_pageout(tmp_path: Path, as_root: None,
                                                                helper: Helper) -> None:
    env = Env(tmp_path, cfg=Config(state_dir=str(tmp_path)), host=SystemHost())
    part = env.add(PagingPart)
    asyncio.run(part.start())  # paging disabled: no tier of its own
    num = zram.create_swap(512 * MIB, "lzo-rle", "symbiont-bdtest", 32000)
    try:
        v = part.memory_view(helper.pid, SIZE)
        assert v["guest_ram"]["size_mib"] == 256.0 and v["guest_ram"]["resident_mib"] > 250
        assert v["code_cache"]["regions"] == 0  # no rwx mapping in a Python process
        parts = v["guest_ram"]["resident_mib"] + v["code_cache"]["resident_mib"] + v["qemu_other"]["resident_mib"]
        assert abs(parts - v["rss_mib"]) <= 0.2 and v["qemu_other"]["resident_mib"] > 1  # the interpreter
        env.host.process_pageout(helper.pid, [(helper.region.start, helper.region.size)])
        w = part.memory_view(helper.pid, SIZE)
        assert w["guest_ram"]["resident_mib"] < 5 and w["guest_ram"]["swapped_mib"] > 250
        assert w["rss_mib"] < v["rss_mib"] - 250
    finally:
        zram.remove(num)
        env.close()
