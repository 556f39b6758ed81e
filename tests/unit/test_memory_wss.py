"""The working-set sampler against a process with a known working set (on this kernel).

The same code runs in the guest agent; here it samples a child process of the test only.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from symbiont_agent.ops_memory import sample_working_set

TOUCHER = """
import mmap, sys, time
total, hot = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20
buf = mmap.mmap(-1, total)
for i in range(0, total, 4096):
    buf[i] = 1
print('ready', flush=True)
while True:
    for i in range(0, hot, 4096):
        buf[i] = 2
    time.sleep(0.05)
"""


@pytest.mark.parametrize("hot_mib", [16, 64, 128])
def test_sampler_finds_the_known_working_set(hot_mib: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", TOUCHER, "256", str(hot_mib)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        sample_working_set(pids=[child.pid])  # mark: clear referenced bits
        errors = []
        for _ in range(2):
            time.sleep(0.5)
            s = sample_working_set(pids=[child.pid])
            ref_mib = s["referenced_bytes"] / 2**20
            assert s["resident_bytes"] / 2**20 >= 256
            errors.append((ref_mib - hot_mib) / hot_mib)
        # The interpreter's own pages (a few MiB) are also referenced: the error is small
        # and positive, never an underestimate of the hot set.
        for e in errors:
            assert -0.01 <= e <= 8.0 / hot_mib + 0.02, errors
    finally:
        child.kill()
        child.wait()


def test_idle_process_has_almost_no_referenced_memory() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import mmap,time\nb=mmap.mmap(-1,64<<20)\nfor i in range(0,64<<20,4096): b[i]=1\n"
         "print('ready',flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        child.stdout.readline()
        sample_working_set(pids=[child.pid])
        time.sleep(0.5)
        s = sample_working_set(pids=[child.pid])
        assert s["referenced_bytes"] < 4 << 20 and s["resident_bytes"] > 64 << 20
        assert s["active_fraction_of_resident"] < 0.05
    finally:
        child.kill()
        child.wait()


def test_balloon_prepare_validates_its_input() -> None:
    from symbiont_agent.ops_memory import _balloon_prepare

    for bad in (-1, "10", 1.5, True, 1 << 30):
        with pytest.raises(ValueError, match="release_mib"):
            _balloon_prepare({"release_mib": bad}, b"")
    r = _balloon_prepare({"release_mib": 0}, b"")
    assert r["requested_bytes"] == 0 and r["steps"] == []
