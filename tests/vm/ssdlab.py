"""What the elastic-SSD VM tests (``test_ssdcache.py``, ``test_ssdcache_vhost.py``) share: the
guest's disk-by-serial lookup, the daemon's view of a cache and its block map, and the
teardown that frees every cache and the pool through the API."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from symbiont_research.lab.console import guest_exec
from symbiont_research.lab.session import LabSession

# shell: `dev SERIAL` prints the guest's /dev/vdX whose serial is SERIAL
DEV = 'dev() { for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && echo /dev/${d##*/}; done; }; '


def pool_path(lab: LabSession) -> Path:
    with lab.client() as c:
        return Path(c.get("/v1/ssdcache/pool")["path"])


def cache(lab: LabSession, vm: str | None = None) -> dict:
    with lab.client() as c:
        return c.get(f"/v1/ssdcache/caches/{vm or lab.names[0]}")


def mapping(lab: LabSession, vm: str) -> dict[int, int]:
    """``vm``'s lbn -> pbn as the daemon's sqlite has it."""
    db = sqlite3.connect(lab.daemon.cfg.db_path)
    try:
        return dict(db.execute("SELECT lbn, pbn FROM ssd_blocks WHERE vm = ?", (vm,)).fetchall())
    finally:
        db.close()


def sh(lab: LabSession, cmd: str, timeout: float = 60, vm: str | None = None) -> tuple[int, str]:
    """``cmd`` in the guest (serial console, independent of the agent), with ``dev`` defined."""
    r = guest_exec(lab.host, vm or lab.names[0], DEV + cmd, timeout=timeout)
    return r.rc, r.output


def drop_caches_and_pool(lab: LabSession) -> None:
    """Teardown: every cache unregistered (its blocks zeroed) and the pool deleted with its file,
    if the daemon still runs."""
    if lab.daemon is not None and lab.daemon.proc is not None:
        with lab.client() as c:
            for v in c.get("/v1/ssdcache/caches"):
                c.delete(f"/v1/ssdcache/caches/{v['vm']}")
            c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})
