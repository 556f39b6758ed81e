"""The adversary's test bench: a real ``symbiontd`` (subprocess, own state dir and socket),
real libvirt domains that are defined but never booted, and :class:`FakeGuest` attackers
playing QEMU's end of their agent channels (issue 16: "keep an adversary in the suite")."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from symbiont.client import Client
from symbiont.config import Config, load_config
from symbiont.host.libvirt_host import LibvirtHost
from symbiont_research.lab.image import Image
from symbiont_research.lab.session import DaemonProcess
from symbiont_research.lab.vms import domain_xml, lab_vm, remove_vm
from tests.host.fakeguest import FakeGuest

PERIOD = 0.5
AGENT_TIMEOUT = 3.0  # much longer than a period: a silent guest must not stretch the others'
FRAME_TIMEOUT = 1.0
MAX_VCPUS = 4
MEMORY_MIB = 512


@dataclass
class GuestBench:
    """A daemon, its domains (by role) and one FakeGuest per domain."""

    tmp: Path
    lab_cfg: Config
    host: LibvirtHost
    names: dict[str, str]
    guests: dict[str, FakeGuest]
    daemon: DaemonProcess | None = None
    extra_daemons: list[DaemonProcess] = field(default_factory=list)

    def start_daemon(self, tag: str, overrides: dict[str, Any] | None = None) -> DaemonProcess:
        dcfg: dict[str, Any] = {
            "state_dir": str(self.tmp / f"state-{tag}"),
            "socket": str(self.tmp / f"api-{tag}.sock"),
            "control": {"period_s": PERIOD, "agent_timeout_s": AGENT_TIMEOUT},
            "agent": {"frame_timeout_s": FRAME_TIMEOUT, "reconnect_max_s": 0.5},
        }
        for k, v in (overrides or {}).items():
            dcfg[k] = {**dcfg.get(k, {}), **v} if isinstance(v, dict) else v
        path = self.tmp / f"d-{tag}.yaml"
        path.write_text(yaml.safe_dump(dcfg))
        d = DaemonProcess(path, load_config(path), self.tmp / f"d-{tag}.log")
        d.start()
        return d

    def client(self, timeout: float = 10.0) -> Client:
        assert self.daemon is not None
        return Client(self.daemon.cfg.socket, timeout=timeout)

    def vm(self, role: str) -> dict[str, Any]:
        with self.client() as c:
            return c.get(f"/v1/vms/{self.names[role]}")

    def accept(self, role: str, hello: bool = True, timeout: float = 30) -> Any:
        """Take the daemon's (re)connection on ``role``'s channel; greet it unless told not to."""
        g = self.guests[role]
        conn = g.accept(timeout)
        if hello:
            g.handshake(conn)
            wait(lambda: self.vm(role)["cooperative"])
        return conn


def wait(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = pred()
        if r:
            return r
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout:.0f} s")


@pytest.fixture(scope="module")
def bench(libvirtd, tmp_path_factory) -> Iterator[GuestBench]:
    """Domains good/bad/odd/churn; a daemon with good, bad and odd registered; the good
    guest answers like a real agent from the start."""
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    tmp = tmp_path_factory.mktemp("adversary")
    chans = tmp / "channels"
    chans.mkdir()
    lab_cfg = load_config(None, {"lab": {"channels_dir": str(chans), "vms_dir": str(tmp / "vms")}})
    host = LibvirtHost()
    tag = uuid.uuid4().hex[:6]
    img = Image(tmp, tmp / "none.qcow2", tmp / "vmlinuz", tmp / "initrd", "fake", info={})
    names = {role: f"symbiont-adv-{role}-{tag}" for role in ("good", "bad", "odd", "churn")}
    for name in names.values():
        host.conn.defineXML(domain_xml(lab_cfg, lab_vm(lab_cfg, name), img, memory_mib=MEMORY_MIB,
                                       vcpus=1, max_vcpus=MAX_VCPUS))
    guests = {role: FakeGuest(lab_vm(lab_cfg, n).channel) for role, n in names.items()}
    b = GuestBench(tmp, lab_cfg, host, names, guests)
    try:
        b.daemon = b.start_daemon("main")
        guests["good"].behave()
        with b.client() as c:
            for role in ("good", "bad", "odd"):
                c.post("/v1/vms", {"name": names[role]})
        yield b
    finally:
        for d in [b.daemon, *b.extra_daemons]:
            if d is not None:
                d.stop()
        for g in guests.values():
            g.close()
        for name in names.values():
            with contextlib.suppress(Exception):
                remove_vm(host, lab_cfg, name)
        host.close()
