"""A whole lab in one context manager: image, VMs, a daemon subprocess and an API client.

The demo, the VM tests and the benchmarks all need the same thing — boot N VMs from the
golden image, run ``symbiontd`` on its own state folder and socket, register the VMs — and
the same clean-up: stop the daemon (which restores every knob), remove the VMs it made,
stop libvirtd/virtlogd only if it started them.

Each session is a run of its own: its VMs are named ``<lab.vm_prefix><tag>-<run id>-N`` (the
tag defaults to the experiment being run) unless the caller names an explicit ``prefix``, and
every domain it defines carries its owner mark (:class:`symbiont_research.lab.vms.LabOwner`). It
removes at start or at exit only domains it made; a domain of another run with the same name
is refused with a message naming its owner (``reclaim=True`` takes over a provably dead one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from symbiont.client import ApiError, Client
from symbiont.config import Config, load_config, merge_dicts
from symbiont.host.libvirt_host import LibvirtHost, ensure_libvirtd, stop_started_libvirtd
from symbiont_research.lab import vms
from symbiont_research.lab.image import Image, build_image, make_recipe
from symbiont_research.lab.peerlink import PeerLink
from symbiont_research.lab.vms import LabOwner


@dataclass
class DaemonProcess:
    """``symbiontd`` as a child process with its own config."""

    config_path: Path
    cfg: Config
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "symbiont.daemon", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"symbiontd exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                with self.client() as c:
                    c.get("/v1/health")
                return
            except ApiError:
                time.sleep(0.1)
        raise RuntimeError(f"symbiontd did not answer within {timeout:.0f} s; log: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def client(self) -> Client:
        return Client(self.cfg.socket)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class LabSession:
    """Boot ``count`` VMs and a daemon; everything is removed on exit."""

    count: int = 2
    prefix: str | None = None  # None: <lab.vm_prefix of base_config><tag>-<run id>-
    tag: str = ""  # "": the experiment being run (symbiont_research.experiments.framework), else "session"
    reclaim: bool = False  # take over same-named domains whose owner is provably dead
    period_s: float = 2.0
    memory_mib: int = 512
    max_vcpus: int = 4
    shared_memory: bool = False  # guest RAM in a shared memfd (vhost-user disks need it; KSM cannot merge it)
    work_dir: Path | None = None
    base_config: str | None = None
    daemon_overrides: dict[str, Any] = field(default_factory=dict)
    step: Callable[[str], None] = lambda s: None
    register: bool = True
    register_extra: dict[str, Any] = field(default_factory=dict)  # the registrations' "extra" (by part)
    # Two ids (1024..65535), or True for ids no other link uses: VMs 1 and 2 get a NIC on a
    # bridge inside a network namespace of the lab's own (lab/peerlink.py), the migration
    # part's guest network.
    peer_link: tuple[int, int] | bool | None = None
    owner: LabOwner = field(default_factory=LabOwner.new_run)
    # Filled in by __enter__:
    image: Image | None = None
    host: LibvirtHost | None = None
    daemon: DaemonProcess | None = None
    vms: list[vms.LabVm] = field(default_factory=list)
    boot_seconds: dict[str, float] = field(default_factory=dict)
    started_daemons: list[str] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _link: PeerLink | None = None

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vms]

    def __enter__(self) -> LabSession:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self.work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="symbiont-lab-")
            self.work_dir = Path(self._tmp.name)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.base_config is None:  # as the CLI: SYMBIONT_CONFIG names the config (lab.vm_prefix, paths)
            self.base_config = os.environ.get("SYMBIONT_CONFIG") or None
        base = load_config(self.base_config)
        if self.prefix is None:
            self.prefix = f"{base.lab.vm_prefix}{self._tag()}-{self.owner.run}-"
        from symbiont_research.experiments.framework import current_run

        if (run := current_run()) is not None:
            run.lab_prefixes.append(self.prefix)  # run.json says which VMs were this run's
        lab_cfg = load_config(
            self.base_config,
            {"lab": {"vm_prefix": self.prefix, "memory_mib": self.memory_mib, "max_vcpus": self.max_vcpus}},
        )
        self.step("starting libvirtd/virtlogd if needed")
        self.started_daemons = ensure_libvirtd()
        self.step("golden image (built once, then reused by recipe hash)")
        self.image = build_image(
            Path(base.lab.images_dir), Path(base.lab.cache_dir), make_recipe(base.lab.mirror),
            step=lambda s: self.step(f"image: {s}"),
        )
        self.host = LibvirtHost(base.libvirt_uri)
        import libvirt

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        names = vms.lab_names(lab_cfg, self.count)
        for name in names:
            if self.host.exists(name):  # someone else's (our run id is new): refuse, or reclaim a dead one
                vms.check_owner(name, vms.domain_mark(self.host.domain(name)), self.owner, self.reclaim, "reuse")
                vms.remove_vm(self.host, lab_cfg, name, self.owner, reclaim=True)
        if self.peer_link:
            link = PeerLink.allocate() if self.peer_link is True else PeerLink(self.peer_link)  # type: ignore[arg-type]
            link.prepare()  # refuses a link in use: then it is not ours to remove at close
            self._link = link
        self.step(f"booting {self.count} VMs ({vms.resolve_domain_type(lab_cfg.lab.domain_type)}) as {self.prefix}*")
        for i, name in enumerate(names):
            t0 = time.monotonic()
            link: dict[str, Any] = {"owner": self.owner}
            if self.shared_memory:
                link["shared_memory"] = True
            if self._link is not None and i < 2:
                link.update(tap_link=(self._link.tap(i), self._link.mac(i)), peer_link=self._link.ids)
            self.vms.append(vms.create_vm(self.host, lab_cfg, self.image, name, **link))
            self.boot_seconds[name] = -t0  # completed below
        if self._link is not None:
            self._link.attach()  # QEMU has opened both taps: now move them into the namespace
        for vm in self.vms:
            self.step(f"waiting for {vm.name}'s agent")
            vms.wait_for_agent(vm.channel, timeout=300)
            self.boot_seconds[vm.name] += time.monotonic()
        # The daemon: own state folder and socket, fast period.
        cfg_data = {
            "state_dir": str(self.work_dir / "state"),
            "socket": str(self.work_dir / "symbiontd.sock"),
            "control": {"period_s": self.period_s},
            "lab": {"vm_prefix": self.prefix, "memory_mib": self.memory_mib, "max_vcpus": self.max_vcpus},
        }
        cfg_data = merge_dicts(cfg_data, self.daemon_overrides)
        cfg_path = self.work_dir / "symbiontd.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg_data))
        self.daemon = DaemonProcess(cfg_path, load_config(cfg_path), self.work_dir / "symbiontd.log")
        self.step("starting symbiontd")
        self.daemon.start()
        if self.register:
            with self.client() as c:
                for name in self.names:
                    c.post("/v1/vms", {"name": name, "memory": {"min_mib": 128}, "extra": self.register_extra})

    def _tag(self) -> str:
        if self.tag:
            return self.tag
        from symbiont_research.experiments.framework import current_run

        run = current_run()
        return run.experiment.name if run is not None else "session"

    def client(self) -> Client:
        assert self.daemon is not None
        return self.daemon.client()

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(ApiError):
                last = predicate()
                if last:
                    return last
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.host is not None:
            base = load_config(self.base_config, {"lab": {"vm_prefix": self.prefix}})
            for vm in self.vms:
                try:
                    vms.remove_vm(self.host, base, vm.name, self.owner)
                except Exception as exc:  # noqa: BLE001 - the others still go
                    self.step(f"could not remove {vm.name}: {exc}")
            self.host.close()
        if self._link is not None:
            with contextlib.suppress(Exception):
                self._link.remove()
        if self.started_daemons and os.environ.get("SYMBIONT_KEEP_LIBVIRTD") != "1":
            stop_started_libvirtd()
        if self._tmp is not None:
            self._tmp.cleanup()


@contextlib.contextmanager
def lab_session(**kw: Any) -> Iterator[LabSession]:
    with LabSession(**kw) as s:
        yield s
