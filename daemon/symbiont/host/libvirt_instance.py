"""A second libvirtd on the same machine, so that live migration can be exercised for real.

Why: placement plans move VMs between hosts, and on a one-machine lab the only way to run a
real ``virDomainMigrate3`` is a second, independent libvirtd. libvirt refuses to migrate to
"the same host" (same host UUID), and two daemons must not share runtime, state, config or log
folders. So this instance runs in a private mount namespace (``unshare -m``; *not* a network
namespace: migration data goes over tcp 127.0.0.1) in which its own folders are bind-mounted
over ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt`` and
``/var/log/libvirt``, and it gets its own ``host_uuid``, its own virtlogd, and no cgroup
controllers (the main libvirtd's cgroup names could collide with ours during a migration, when
the same domain name exists on both). Its API socket lies in the root mount namespace, at
``<runtime_dir>/libvirt-sock``, so any process reaches it with :attr:`LibvirtInstance.uri`.

Everything else (disk images, the lab's channel sockets under /var/lib/symbiont) is shared
with the host, which is what shared-storage live migration needs. The QEMU capability cache
is kept between runs under ``state_dir`` (probing QEMU takes seconds under TCG).

Only what :meth:`LibvirtInstance.start` started is stopped, by PID, after destroying the
domains this instance runs (it is ours alone).

A multi-host lab (:mod:`symbiont.cluster.lab`) also gives an instance a network namespace
(``netns``: a name under ``/run/netns``), so that it and the QEMUs it starts see only that
namespace's network, and a TCP listener on the namespace's address (``listen_addr``: libvirtd
``--listen`` with ``auth_tcp = "none"``, reachable only from inside the lab's namespaces), so
that migrations use ``qemu+tcp://<addr>/system`` as between real hosts. Without them it is
the instance described above (tcp 127.0.0.1 in the root namespace, unix socket only).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

log = logging.getLogger(__name__)

# Folders the instance gets its own copy of (mount target -> sub-folder of state_dir).
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
UUID_NS = uuid.UUID("6b1f3f6e-6f0c-4f0e-9c3c-73796d62696f")  # fixed: the same name gives the same host UUID


class InstanceError(Exception):
    """The second libvirtd could not be started or stopped; the message says why."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LibvirtInstance:
    """A libvirtd + virtlogd pair in a private mount namespace, reachable at :attr:`uri`."""

    name: str = "host2"
    runtime_dir: Path | None = None  # default /run/symbiont-<name>
    state_dir: Path | None = None  # default /var/lib/symbiont/libvirt-<name>
    host_uuid: str = ""  # default: derived from the name (stable across runs)
    netns: str = ""  # run inside this network namespace (/run/netns/<netns>); "": the root one
    listen_addr: str = ""  # also listen on qemu+tcp at this address (auth none); needs netns
    started: bool = False
    pids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum():
            raise InstanceError(f"instance name {self.name!r} must be letters, digits and '-'")
        self.runtime_dir = Path(self.runtime_dir or f"/run/symbiont-{self.name}")
        self.state_dir = Path(self.state_dir or f"/var/lib/symbiont/libvirt-{self.name}")
        self.host_uuid = self.host_uuid or str(uuid.uuid5(UUID_NS, self.name))
        if self.listen_addr and not self.netns:
            # auth none on an address of the root namespace would open libvirt to the machine's network
            raise InstanceError(f"instance {self.name}: listen_addr needs a network namespace (netns)")
        if self.listen_addr:
            import ipaddress

            try:
                ipaddress.ip_address(self.listen_addr)
            except ValueError:
                raise InstanceError(f"instance {self.name}: listen_addr {self.listen_addr!r} is not an IP address") from None
        if self.netns and not self.netns.replace("-", "").isalnum():
            raise InstanceError(f"instance {self.name}: netns {self.netns!r} must be letters, digits and '-'")

    @property
    def socket(self) -> Path:
        assert self.runtime_dir is not None
        return self.runtime_dir / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        """The URI peers in the lab's namespaces use (empty without ``listen_addr``)."""
        return f"qemu+tcp://{self.listen_addr}/system" if self.listen_addr else ""

    def _pidfile(self, daemon: str) -> Path:
        assert self.runtime_dir is not None
        return self.runtime_dir / f"{daemon}.pid"

    def running(self) -> bool:
        pid = _read_pid(self._pidfile("libvirtd"))
        return pid is not None and _alive(pid)

    def _write_config(self) -> None:
        assert self.state_dir is not None and self.runtime_dir is not None
        etc = self.state_dir / "etc"
        (etc / "qemu").mkdir(parents=True, exist_ok=True)
        # Stale definitions from an earlier run that did not tear down would be autostarted.
        for stale in (etc / "qemu").glob("*.xml"):
            stale.unlink()
        (etc / "libvirtd.conf").write_text(
            f'host_uuid = "{self.host_uuid}"\n'
            f'unix_sock_dir = "{self.runtime_dir}"\n'
            'unix_sock_group = "root"\nunix_sock_rw_perms = "0770"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
            + (
                f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{self.listen_addr}"\nauth_tcp = "none"\n'
                if self.listen_addr
                else ""
            )
        )
        # No cgroups: see the module docstring. No AppArmor/SELinux profiles either (they would
        # be written to folders shared with the main libvirtd, under the same domain UUID).
        (etc / "qemu.conf").write_text('cgroup_controllers = [ ]\nsecurity_driver = "none"\n')
        (etc / "virtlogd.conf").write_text("")
        (etc / "libvirt.conf").write_text("")

    def start(self, timeout: float = 90.0) -> None:
        """Start the instance (or adopt one already running from an earlier, crashed run)."""
        assert self.state_dir is not None and self.runtime_dir is not None
        if os.geteuid() != 0:
            raise InstanceError("a second libvirtd needs root (mount namespace, QEMU as libvirt-qemu)")
        if self.running():
            log.info("libvirt instance %s already running; adopting it", self.name)
            self.pids = {d: p for d in ("libvirtd", "virtlogd") if (p := _read_pid(self._pidfile(d)))}
            self.started = True
            self._wait(timeout)
            return
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        (self.runtime_dir / "run").mkdir(exist_ok=True)
        for sub in PRIVATE_DIRS.values():
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        for target in (*PRIVATE_DIRS, "/run/libvirt"):
            Path(target).mkdir(parents=True, exist_ok=True)
        self._write_config()
        binds = [(str(self.state_dir / sub), target) for target, sub in PRIVATE_DIRS.items()]
        binds.append((str(self.runtime_dir / "run"), "/run/libvirt"))
        script = " && ".join(
            [f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}" for src, dst in binds]
            + [
                f"hostname symbiont-{self.name}",
                f"/usr/sbin/virtlogd -d -p {shlex.quote(str(self._pidfile('virtlogd')))}",
                f"/usr/sbin/libvirtd -d {'--listen ' if self.listen_addr else ''}"
                f"--pid-file {shlex.quote(str(self._pidfile('libvirtd')))}",
            ]
        )
        enter = [] if not self.netns else ["nsenter", f"--net=/run/netns/{self.netns}"]
        if self.netns and not Path(f"/run/netns/{self.netns}").exists():
            raise InstanceError(f"instance {self.name}: network namespace {self.netns} does not exist")
        logf = (self.state_dir / "log" / "libvirtd-start.log").open("ab")
        try:
            res = subprocess.run(
                [*enter, "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script],
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        finally:
            logf.close()
        self.pids = {d: p for d in ("libvirtd", "virtlogd") if (p := _read_pid(self._pidfile(d)))}
        self.started = True
        if res.returncode != 0:
            self.stop()
            raise InstanceError(
                f"starting libvirt instance {self.name} failed (exit {res.returncode}); "
                f"see {self.state_dir / 'log' / 'libvirtd-start.log'}"
            )
        self._wait(timeout)
        log.info("libvirt instance %s up at %s (host uuid %s)", self.name, self.uri, self.host_uuid)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.socket.exists():
                try:
                    conn = libvirt.open(self.uri)
                    conn.close()
                    return
                except libvirt.libvirtError as exc:
                    last = exc.get_error_message()
            time.sleep(0.2)
        raise InstanceError(
            f"libvirt instance {self.name} did not answer at {self.socket} in {timeout:.0f} s: {last}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Destroy and undefine this instance's domains, then stop its libvirtd and virtlogd by PID."""
        if not self.started:
            return
        if self.socket.exists():
            try:
                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains():
                        try:
                            if dom.isActive():
                                dom.destroy()
                            dom.undefine()
                        except libvirt.libvirtError as exc:
                            log.warning("instance %s: could not remove %s: %s", self.name, dom.name(), exc)
                finally:
                    conn.close()
            except libvirt.libvirtError as exc:
                log.warning("instance %s: not answering during stop: %s", self.name, exc)
        for daemon in ("libvirtd", "virtlogd"):
            pid = self.pids.get(daemon)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert self.runtime_dir is not None
        if not any(_alive(p) for p in self.pids.values()):
            shutil.rmtree(self.runtime_dir, ignore_errors=True)  # ours alone; the namespace is gone
        self.started = False
        self.pids = {}

    def __enter__(self) -> LibvirtInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
