"""Schemathesis over the real daemon's ``/openapi.json``: no request, valid or not, gets a 5xx.

A real ``symbiontd`` (subprocess, its own state dir, GPU part on the simulator, an SSD-cache
pool on a small scratch file) answers on its unix socket; every operation is fuzzed with a
fixed seed (``derandomize``) and a bounded number of examples, once with schema-valid data
(positive) and once with data that violates the schema (negative), and once more with the
registered scratch VM's name in the path so that the handlers behind the 404 run too.

What is asserted: 0 responses >= 500, with one excuse: a 503 whose reason is that the guest
agent is not there, for the registered scratch VM (its domain is never booted, so its agent
cannot answer). The daemon reports an absent agent as 503 everywhere (like libvirt being down:
a dependency outside the daemon is unavailable), and the request was valid. Nothing else is
excused: libvirtd runs (the fixture starts it) and every part this daemon has is enabled, so
any other 503 would be a bug here; for any other VM name the answer must be a 4xx.

Left out, on purpose (each is covered by its part's own tests):
* ``POST/DELETE /v1/ssdcache/pool``: the pool is the scratch file made by the fixture; the
  fuzz must not replace it by a multi-GiB file or remove it under the caches being fuzzed.
* ``PUT/DELETE /v1/dedup/policy``: host-wide KSM knobs in /sys/kernel/mm/ksm, shared with
  every other test on this host; they cannot be pointed at scratch.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from symbiont.config import load_config
from symbiont_research.lab.session import DaemonProcess

pytestmark = [pytest.mark.root, pytest.mark.libvirt]

BASE = "http://symbiontd"
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}
EXCLUDED = {("POST", "/v1/ssdcache/pool"), ("DELETE", "/v1/ssdcache/pool"),
            ("PUT", "/v1/dedup/policy"), ("DELETE", "/v1/dedup/policy")}
POOL_MIB = 64
_DEEP = "[" * 300 + "]" * 300
KNOWN_HOSTILE = [
    # Item 8: was 500 *and* registered the VM, then both lists stayed 500 (across restarts too).
    ("POST", "/v1/vms", '{"name": "{vm}-x", "extra": {"a": ' + _DEEP + '}}'),
    ("GET", "/v1/vms", ""),
    ("GET", "/v1/decisions", ""),
    ("POST", "/v1/vms", '{"name": "{vm}-x", "cpu": {"min_vcpus": 4, "max_vcpus": 2}}'),
    ("POST", "/v1/vms", '{"name": "{vm}-x", "memory": {"shares": true}}'),
    ("POST", "/v1/vms", '{"name": "x", "memory": {"tax_rate": NaN}}'),
    ("POST", "/v1/vms", '{"name": ' + _DEEP + '}'),
    ("PUT", "/v1/memory/policy", '{"tax_rate": Infinity}'),
    ("PUT", "/v1/ssdcache/twolevel", '{"mem_mib": 0, "ssd_mib": 16777215}'),
    ("PUT", "/v1/ssdcache/twolevel", '{"mem_mib": 1048576, "ssd_mib": 683705}'),
    ("POST", "/v1/ssdcache/caches", '{"vm": "{vm}", "size_mib": 1048576, "current_mib": 1048576}'),
    ("PUT", "/v1/ssdcache/caches/{vm}/size", '{"current_mib": 16777215}'),
    ("POST", "/v1/placement/execute", '{"plan": {"a": ' + _DEEP + '}}'),
    ("POST", "/v1/vms", '{"name": "x", "extra": {"n": ' + "9" * 5000 + '}}'),
]


# -- requests over the daemon's unix socket ------------------------------------------------------
class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__("localhost", **kw)
        self._unix_path = path

    def _new_conn(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else 60.0)
        s.connect(self._unix_path)
        return s


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", maxsize=1)
        self._unix_path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self._unix_path, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    """``requests`` to ``http://symbiontd/...`` go to the daemon's unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._pool = _UnixPool(path)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> _UnixPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()


# -- the daemon ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(libvirtd, tmp_path_factory):
    import libvirt

    from symbiont.host.libvirt_host import LibvirtHost
    from symbiont_research.lab.image import Image
    from symbiont_research.lab.vms import domain_xml, lab_vm, remove_vm

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "channels").mkdir()
    state = tmp / "state"
    (state / "ssdcache-pools").mkdir(parents=True)
    # A defined, never booted domain: registered, so that VM paths reach their handlers.
    lcfg = load_config(None, {"lab": {"channels_dir": str(tmp / "channels"), "vms_dir": str(tmp / "vms")}})
    host = LibvirtHost()
    vm = f"symbiont-fuzz-{uuid.uuid4().hex[:6]}"
    img = Image(tmp, tmp / "none.qcow2", tmp / "vmlinuz", tmp / "initrd", "fake", info={})
    for name in (vm, f"{vm}-x"):  # {vm}-x stays unregistered: the hostile registrations below aim at it
        host.conn.defineXML(domain_xml(lcfg, lab_vm(lcfg, name), img))
    cfg = {
        "state_dir": str(state),
        "socket": str(tmp / "api.sock"),
        "log_level": "WARNING",
        "control": {"period_s": 1.0, "agent_timeout_s": 1.0},
        "agent": {"reconnect_max_s": 1.0},
        "gpu": {"enabled": True, "backend": "simulated", "endpoint_socket": str(tmp / "gpu.sock")},
        "ssdcache": {"runtime_dir": str(tmp / "nbd")},
    }
    (tmp / "d.yaml").write_text(yaml.safe_dump(cfg))
    d = DaemonProcess(tmp / "d.yaml", load_config(tmp / "d.yaml"), tmp / "d.log")
    d.start()
    try:
        with d.client() as c:
            c.post("/v1/ssdcache/pool", {"file": str(state / "ssdcache-pools" / "fuzz.img"), "size_mib": POOL_MIB})
            c.post("/v1/vms", {"name": vm})
        yield {"daemon": d, "vm": vm, "tmp": tmp}
    finally:
        d.stop()
        for name in (vm, f"{vm}-x"):
            remove_vm(host, lcfg, name)
        host.close()


def _operations(schema: Any) -> list[Any]:
    ops = []
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) not in EXCLUDED:
            ops.append(op)
    return ops


def test_no_request_gets_a_5xx(daemon) -> None:
    d: DaemonProcess = daemon["daemon"]
    with d.client() as c:
        raw = c.get("/openapi.json")
    schema = schemathesis.openapi.from_dict(raw)
    ops = _operations(schema)
    assert len(ops) >= 60, [f"{o.method} {o.path}" for o in ops]  # every part's router is mounted
    session = requests.Session()
    session.mount(BASE, UnixAdapter(str(d.cfg.socket)))
    by_class: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    requests_sent = 0
    t0 = time.monotonic()

    def send(op: Any, case: Any) -> None:
        nonlocal requests_sent
        try:
            # A new connection each time: after a 500 uvicorn may close the kept-alive one.
            resp = case.call(base_url=BASE, session=session, headers={"Connection": "close"}, timeout=60)
        except requests.RequestException as exc:  # the daemon hung up or died: worse than a 500
            failures.append(f"{op.method.upper()} {op.path}: no answer ({exc})\n  {_describe(case)}")
            return
        requests_sent += 1
        by_class[f"{resp.status_code // 100}xx"] += 1
        if resp.status_code == 503 and _agent_absent(resp, case, daemon["vm"]):
            by_class["503 agent absent (excused)"] += 1
        elif resp.status_code >= 500:
            failures.append(f"{op.method.upper()} {op.path} -> {resp.status_code} {resp.text[:300]}\n"
                            f"  {_describe(case)}")

    for op in ops:
        variants: list[dict[str, Any]] = [{}]
        if any(p.name in ("name", "vm") for p in op.path_parameters):
            key = "vm" if any(p.name == "vm" for p in op.path_parameters) else "name"
            variants.append({"path_parameters": {key: daemon["vm"]}})
        for extra in variants:
            for mode, n in EXAMPLES.items():
                try:
                    strategy = op.as_strategy(generation_mode=mode, **extra)
                except Exception as exc:  # nothing to negate in this operation
                    if mode is GenerationMode.NEGATIVE:
                        continue
                    raise AssertionError(f"{op.method} {op.path}: {exc}") from exc

                try:
                    _fuzz(strategy, n, lambda case, op=op: send(op, case))
                except Exception as exc:
                    if type(exc).__name__ != "Unsatisfiable":
                        raise
    # Requests that once gave a 500 (issue 16), sent as they were: the generator may not find them.
    for method, path, text in KNOWN_HOSTILE:
        try:
            r = session.request(method, BASE + path.replace("{vm}", daemon["vm"]),
                                data=text.replace("{vm}", daemon["vm"]).encode() or None,
                                headers={"content-type": "application/json", "Connection": "close"}, timeout=60)
        except requests.RequestException as exc:
            failures.append(f"{method} {path}: no answer ({exc})\n  body {text[:200]}")
            continue
        requests_sent += 1
        by_class[f"{r.status_code // 100}xx"] += 1
        if method == "POST" and r.status_code < 300:  # none of these may register anything
            failures.append(f"{method} {path} -> {r.status_code}: accepted\n  body {text[:200]}")
        if r.status_code >= 500:
            failures.append(f"{method} {path} -> {r.status_code} {r.text[:300]}\n  body {text[:200]}")
    elapsed = time.monotonic() - t0
    with d.client() as c:
        assert c.get("/v1/health")["ok"]
    summary = {"operations": len(ops), "requests": requests_sent, "by_class": dict(sorted(by_class.items())),
               "seconds": round(elapsed, 1), "failures": len(failures)}
    print("api fuzz:", json.dumps(summary))
    (Path(os.environ.get("SYMBIONT_FUZZ_REPORT", daemon["tmp"] / "fuzz.json"))).write_text(
        json.dumps({**summary, "details": failures}, indent=1))
    assert requests_sent >= 10 * len(ops)
    assert not failures, f"{len(failures)} responses >= 500 or no answer:\n" + "\n".join(failures[:40])


def _agent_absent(resp: Any, case: Any, vm: str) -> bool:
    """The excused 503: the scratch VM's guest agent is not there (see the module docstring)."""
    try:
        detail = str(resp.json().get("detail", ""))
    except ValueError:
        return False
    agent = any(w in detail for w in ("agent unavailable", "agent is not connected", "no guest agent",
                                      "agent is not cooperative"))
    return agent and detail.startswith(vm) and vm in case.formatted_path


def _fuzz(strategy: Any, n: int, send: Any) -> None:
    """``n`` cases drawn from ``strategy`` with a fixed seed; no shrinking (nothing fails in here)."""

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        send(case)

    run()


def _describe(case: Any) -> str:
    try:
        return case.as_curl_command()
    except Exception:
        return f"{case.method} {case.formatted_path} query={case.query} body={str(case.body)[:300]}"
