"""Checkpoint/restore of one container with CRIU's RPC (``criu swrk``) through pycriu.

pycriu ships in Debian's ``criu`` package and imports only under the system python3, so it
is imported lazily from ``/usr/lib/python3/dist-packages``. What a container needs to be
dumped (found out on the real guest):

* the tree is dumped from the container's init (PID 1 of its PID namespace), not from the
  ``unshare`` parent that sits outside that namespace;
* its session leader must be inside the namespace (CRIU refuses otherwise): the init must
  have called ``setsid`` — see :func:`symbiont.migration.workload.migratable_command`;
* the mount namespace is a private copy of the guest's: its mounts are declared external
  automatically (``auto_ext_mnt``) and bound again from the destination guest, which boots
  the same golden image;
* the final dump freezes the cgroup (v2 ``cgroup.freeze``) first and leaves it frozen
  (``leave_running`` restores the freezer's state, which is frozen): the source copy stays
  in memory, stopped, until the destination has restored and confirmed; thawing it again is
  the way back on any failure;
* established TCP connections are dumped and restored in repair mode (``tcp_established``):
  CRIU locks the network with ``iptables-restore`` meanwhile (the golden image carries
  iptables), and the local address must exist on the destination before the restore (the
  container's address moves with it: ``mig-addr``). A container with its own network
  namespace has that namespace (links, addresses, routes, iptables rules) dumped and
  recreated by CRIU;
* a *lazy* restore (``restore(lazy=True)``) starts the tasks before their memory is back:
  ``criu lazy-pages`` serves the page images of the local images folder through userfaultfd
  (this guest kernel has ``uffd-noncoop``), faulting pages in on demand and pushing the rest in
  the background (measured on a bare 128 MiB process under TCG: restore 0.28-0.40 s lazy vs
  0.52 s, the fill ~1 s more; inside a migration, after pre-copy, the freeze was longer lazy:
  1.19 vs 0.97 s, BENCHMARKS.md fifth round). The images must stay until the daemon exits: :func:`wait_lazy`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

CRIU_BIN = "/usr/sbin/criu"
_DIST = "/usr/lib/python3/dist-packages"


class CriuError(Exception):
    """CRIU failed; the message carries the tail of its log."""


def _pycriu() -> Any:
    if _DIST not in sys.path:
        sys.path.append(_DIST)
    try:
        import pycriu  # type: ignore[import-not-found]
    except ImportError as exc:
        raise CriuError(f"pycriu is not available in this guest ({exc}); install Debian's criu") from None
    return pycriu


def _log_tail(path: str, n: int = 12) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ""
    errs = [ln for ln in lines if "Error" in ln]
    return " | ".join((errs or lines)[-n:])[-1500:]


def run(kind: str, images_dir: str, log_name: str, **opts: Any) -> tuple[Any, float]:
    """Run one CRIU request (``pre_dump``, ``dump``, ``restore``) with images in ``images_dir``."""
    pycriu = _pycriu()
    os.makedirs(images_dir, exist_ok=True)
    c = pycriu.criu()
    c.use_binary(CRIU_BIN)
    fd = os.open(images_dir, os.O_DIRECTORY)
    os.set_inheritable(fd, True)  # criu swrk is exec'd and must see it
    try:
        c.opts.images_dir_fd = fd
        c.opts.log_file = log_name
        c.opts.log_level = 2
        for k, v in opts.items():
            if k == "manage_cgroups_mode":
                v = getattr(pycriu.rpc, v)
            setattr(c.opts, k, v)
        t0 = time.monotonic()
        try:
            resp = getattr(c, kind)()
        except pycriu.CRIUException as exc:
            raise CriuError(
                f"criu {kind} failed: {exc}: {_log_tail(os.path.join(images_dir, log_name))}"
            ) from None
        return resp, time.monotonic() - t0
    finally:
        os.close(fd)


def pre_dump(pid: int, images_dir: str, parent: str | None) -> float:
    opts: dict[str, Any] = {"pid": pid, "track_mem": True, "shell_job": True}
    if parent:
        opts["parent_img"] = parent
    return run("pre_dump", images_dir, "pre-dump.log", **opts)[1]


def dump(pid: int, images_dir: str, parent: str | None, cgroup_path: str) -> float:
    opts: dict[str, Any] = {
        "pid": pid,
        "track_mem": True,
        "shell_job": True,
        "tcp_established": True,  # servers: established connections are dumped in repair mode
        "leave_running": True,
        "manage_cgroups": True,
        "freeze_cgroup": cgroup_path,
        "auto_ext_mnt": True,
        "ext_sharing": True,
        "ext_masters": True,
    }
    if parent:
        opts["parent_img"] = parent
    return run("dump", images_dir, "dump.log", **opts)[1]


LAZY_SOCKET = "lazy-pages.socket"  # criu lazy-pages listens here, in the images folder
_LAZY: dict[str, subprocess.Popen[bytes]] = {}  # images folder -> its lazy-pages daemon


def restore(images_dir: str, lazy: bool = False) -> tuple[int, float]:
    """Restore the container from ``images_dir``; with ``lazy``, its memory comes after it runs."""
    opts: dict[str, Any] = {}
    t0 = time.monotonic()
    if lazy:
        opts["lazy_pages"] = True
        _start_lazy(images_dir)
    try:
        resp, _secs = run(
            "restore",
            images_dir,
            "restore.log",
            root="/",
            shell_job=True,
            tcp_established=True,
            auto_ext_mnt=True,
            ext_sharing=True,
            ext_masters=True,
            manage_cgroups=True,
            manage_cgroups_mode="SOFT",
            **opts,
        )
    except CriuError:
        stop_lazy(images_dir)
        raise
    return int(resp.pid), time.monotonic() - t0


def _start_lazy(images_dir: str, timeout: float = 10.0) -> None:
    """``criu lazy-pages`` on the folder's page images, up before the restore connects to it."""
    stop_lazy(images_dir)
    sock = os.path.join(images_dir, LAZY_SOCKET)
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen([CRIU_BIN, "lazy-pages", "-D", images_dir, "-o", "lazy-pages.log", "-v2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    _LAZY[images_dir] = proc
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_lazy(images_dir)
            raise CriuError("criu lazy-pages did not start: "
                            + _log_tail(os.path.join(images_dir, "lazy-pages.log")))  # fmt: skip
        time.sleep(0.01)


def wait_lazy(images_dir: str, timeout: float = 120.0) -> float | None:
    """Wait until the lazy-pages daemon of ``images_dir`` has put every page back (it exits
    then); seconds waited, or None when there was none. Its images must stay until then: a
    page it cannot serve leaves the faulting task blocked."""
    proc = _LAZY.get(images_dir)
    if proc is None:
        return None
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_lazy(images_dir)
        raise CriuError(f"criu lazy-pages still serving after {timeout:.0f} s: "
                        + _log_tail(os.path.join(images_dir, "lazy-pages.log"))) from None  # fmt: skip
    _LAZY.pop(images_dir, None)
    return time.monotonic() - t0


def stop_lazy(images_dir: str) -> None:
    proc = _LAZY.pop(images_dir, None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


# -- transparent huge pages vs dirty tracking ----------------------------------------------------
SPLIT_THP = "/sys/kernel/debug/split_huge_pages"
HUGE = 2 << 20


def anon_ranges(maps_text: str, min_size: int = HUGE) -> list[tuple[int, int]]:
    """Private writable anonymous mappings of at least ``min_size`` bytes (where THPs live),
    from the text of ``/proc/PID/maps``."""
    out = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or not parts[1].startswith("rw") or parts[1][3:4] != "p":
            continue
        name = parts[5].strip() if len(parts) > 5 else ""
        if name and name != "[heap]":
            continue
        start, _, end = parts[0].partition("-")
        lo, hi = int(start, 16), int(end, 16)
        if hi - lo >= min_size:
            out.append((lo, hi))
    return out


def split_huge_pages(pids: list[int], control: str = SPLIT_THP) -> dict[str, Any]:
    """Split the transparent huge pages of these processes into 4 KiB pages (debugfs).

    Why: soft-dirty tracking marks a whole 2 MiB THP dirty when one byte of it is written,
    so under THP (``always`` in Debian's kernels) pre-copy cannot converge below a few huge
    pages per round: the first migration of a fresh container ended with 4.3-6.3 MiB final
    dumps at 1 MiB/s of writes (its restored copy, in 4 KiB pages, with 0.6 MiB). Split once
    before each pre-dump, outside the freeze; khugepaged may merge them again later.
    The kernel walks each range page by page and stops at the first gap, hence one write
    per mapping. Best effort: no debugfs, no split (the result says why)."""
    t0 = time.monotonic()
    if not os.path.exists(control):
        if control == SPLIT_THP and os.path.isdir("/sys/kernel/debug") and not os.path.ismount("/sys/kernel/debug"):
            os.system("mount -t debugfs none /sys/kernel/debug >/dev/null 2>&1")  # noqa: S605
        if not os.path.exists(control):
            return {"ranges": 0, "skipped": "no " + control}
    n = 0
    try:
        with open(control, "w") as fh:
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/maps") as m:
                        ranges = anon_ranges(m.read())
                except OSError:
                    continue
                for lo, hi in ranges:
                    try:
                        fh.write(f"{pid},{lo:#x},{hi:#x}")
                        fh.flush()
                        n += 1
                    except OSError:
                        continue
    except OSError as exc:
        return {"ranges": n, "skipped": str(exc)}
    return {"ranges": n, "seconds": round(time.monotonic() - t0, 4)}
