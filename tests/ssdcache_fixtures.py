"""A real ``symbiontd`` with the SSD cache on, for the tests that attack it from outside
(tests/host/test_ssdcache_hostile.py, tests/adversary/test_ssdcache_crash.py): one way to start it
and one way to leave the host clean, even after the test killed it with ``kill -9``."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from symbiont.config import load_config
from symbiont.ssdcache.pool import loop_devices_of
from symbiont_research.lab.session import DaemonProcess


@contextlib.contextmanager
def ssdcache_daemon(tmp: Path, ssdcache: dict[str, Any], period_s: float = 0.5) -> Iterator[DaemonProcess]:
    """``symbiontd`` (a subprocess) with ``ssdcache`` as its config section, state and socket
    under ``tmp``. On the way out it is restarted if a test left it dead, every cache and the
    pool (with its file) are deleted through the API, the daemon stops, and no loop device is
    left on a pool file in ``ssdcache["pool_dir"]``."""
    cfg = {"state_dir": str(tmp / "state"), "socket": str(tmp / "api.sock"), "control": {"period_s": period_s},
           "ssdcache": ssdcache}
    (tmp / "d.yaml").write_text(yaml.safe_dump(cfg))
    d = DaemonProcess(tmp / "d.yaml", load_config(tmp / "d.yaml"), tmp / "d.log")
    d.start()
    try:
        yield d
    finally:
        try:
            if d.proc is None or d.proc.poll() is not None:
                d.start()
            with d.client() as c:
                for v in c.get("/v1/ssdcache/caches"):
                    c.delete(f"/v1/ssdcache/caches/{v['vm']}")
                if c.get("/v1/ssdcache/pool")["exists"]:
                    c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})
        finally:
            d.stop()
            pools = Path(ssdcache["pool_dir"])
            for f in pools.glob("*.img") if pools.is_dir() else []:
                for dev in loop_devices_of(f):
                    subprocess.run(["losetup", "-d", dev], check=False)
