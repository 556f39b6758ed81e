"""Hostile guests against a real daemon (issue 16): each attack costs the daemon bounded CPU,
time and log, drops that guest's connection only, and the good guest keeps being sampled at
its period throughout.

Real ``symbiontd`` (subprocess), real libvirt domains (defined, not booted); the attackers
are :class:`FakeGuest` on the domains' channel sockets. See conftest.py for the bench.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import struct
import threading
import time

import psutil
import pytest

from symbiont.client import ApiError, Client
from symbiont_agent import protocol as proto
from tests.host.fakeguest import trickle_until_closed

from .conftest import FRAME_TIMEOUT, MAX_VCPUS, MEMORY_MIB, PERIOD, GuestBench, wait

pytestmark = [pytest.mark.root, pytest.mark.libvirt]


class Cadence:
    """Watch the good guest's stats answers over a window: the daemon samples it every PERIOD."""

    def __init__(self, bench: GuestBench) -> None:
        self.good = bench.guests["good"]
        self.t0 = time.monotonic()

    def check(self, min_fraction: float = 0.4, max_gap: float = 2.0) -> None:
        t1 = time.monotonic()
        times = [self.t0] + [t for t in self.good.stats_times if t >= self.t0] + [t1]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        expected = (t1 - self.t0) / PERIOD
        assert len(times) - 2 >= min_fraction * expected, (
            f"good guest sampled {len(times) - 2} times in {t1 - self.t0:.1f} s (period {PERIOD} s)"
        )
        assert max(gaps) <= max_gap, f"good guest went {max(gaps):.1f} s without a sample"


def event_frame(data: object) -> bytes:
    return proto.encode(proto.event("flood", {"d": data}))


def raw(body: bytes) -> bytes:
    return struct.pack("!4sBBII", proto.MAGIC, proto.PROTOCOL_VERSION, 0, len(body), 0) + body


def protocol_errors(bench: GuestBench, role: str) -> int:
    return bench.vm(role)["agent"]["protocol_errors"]


def test_good_guest_is_sampled_at_its_period(bench: GuestBench) -> None:
    wait(lambda: bench.vm("good")["guest"]["mem_total_mib"] == 512, what="good guest's stats")
    cadence = Cadence(bench)
    time.sleep(3)
    cadence.check()


def test_hunting_amplification_costs_bounded_cpu(bench: GuestBench) -> None:
    """Item 1: 17 MiB of fake headers with plausible sizes, before any hello. It cost 246 s of
    daemon CPU and froze the API for everyone; hunting must be O(input)."""
    conn = bench.accept("bad", hello=False)  # the link hunts until its first frame
    cand = b"SYMB\x01\x00" + struct.pack("!II", 0x7F7F, 16 << 20)
    payload = cand * (int(17.3 * (1 << 20)) // len(cand))
    proc = psutil.Process(bench.daemon.proc.pid)
    cpu0 = sum(proc.cpu_times()[:2])
    cadence = Cadence(bench)
    sent = threading.Event()

    def send() -> None:
        conn.sendall(payload)
        sent.set()

    threading.Thread(target=send, daemon=True).start()
    latencies = []
    with bench.client() as c:
        while not sent.is_set() or len(latencies) < 10:
            t = time.monotonic()
            assert c.get("/v1/health")["ok"]
            latencies.append(time.monotonic() - t)
            time.sleep(0.1)
            assert time.monotonic() - cadence.t0 < 60, "17 MiB took over a minute to go through"
    # A real hello after the garbage: the link resyncs on it (so all 17 MiB were consumed).
    bench.guests["bad"].handshake(conn)
    wait(lambda: bench.vm("bad")["cooperative"], what="resync after the flood")
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    cadence.check()
    conn.close()
    assert cpu < 5.0, f"daemon spent {cpu:.1f} s of CPU on 17 MiB of hunting"
    assert statistics.median(latencies) < 0.5 and max(latencies) < 2.5, latencies


def test_slow_loris_is_dropped_within_the_frame_timeout(bench: GuestBench) -> None:
    """Item 10: a half frame, then one byte every 0.3 s: frame_timeout bounds the whole frame."""
    conn = bench.accept("bad")
    frame = proto.encode(proto.response_ok(1, {"x": "y" * 200}))
    conn.sendall(frame[: len(frame) // 2])
    took = trickle_until_closed(conn, frame[len(frame) // 2 :], interval=0.3, timeout=FRAME_TIMEOUT + 6)
    conn.close()
    assert took is not None, "daemon kept a frame open that trickled in one byte at a time"
    assert took <= FRAME_TIMEOUT + 2.0
    assert "truncated frame" in bench.vm("bad")["agent"]["last_error"]


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(raw(b'{"type":"event","event":"x","data":{"n":' + b"9" * 5000 + b"}}"), id="5000-digit-int"),
        pytest.param(raw(b'{"type":"resp","id":1,"ok":true,"result":' + b"1" * 100_000 + b"}"), id="huge-int-resp"),
        pytest.param(raw(b'{"type":"event","event":"x","data":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
                     id="deep-nesting-recursion"),
        pytest.param(event_frame(json.loads("[" * 300 + "]" * 300)), id="deep-nesting-300"),
    ],
)
def test_malformed_json_drops_the_connection_and_the_link_recovers(bench: GuestBench, attack: bytes) -> None:
    """Item 6: a ValueError from json.loads used to kill the link's task silently (the API
    still said connected, and it never reconnected)."""
    conn = bench.accept("bad")
    before = protocol_errors(bench, "bad")
    conn.sendall(attack)
    assert bench.guests["bad"].is_closed_by_peer(conn, timeout=5), "connection kept after a malformed frame"
    conn.close()
    wait(lambda: protocol_errors(bench, "bad") == before + 1, what="protocol error counted")
    # The link reconnects and a new hello makes the agent cooperative again.
    bench.accept("bad").close()


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", "[" * 260 + "]" * 260),
        ("version", json.dumps("v" * 100_000)),
        ("caps", json.dumps(["c" * 10_000] * 100)),
        ("caps", json.dumps(["c"] * 10_000)),
        ("boot_id", '{"a": [1, 2]}'),
        ("pid", '"1"'),
        ("started", "NaN"),
        ("started", "1e999"),
    ],
)
def test_hello_garbage_is_refused_and_never_served(bench: GuestBench, field: str, value: str) -> None:
    """Item 7: a hello's fields are stored and served; a version nested 260 deep made
    GET /v1/vms return 500 for every user."""
    g = bench.guests["bad"]
    conn = bench.accept("bad")  # in sync after a good hello: a garbage one is a protocol error
    before = protocol_errors(bench, "bad")
    good = {"type": "hello", "proto": 1, "role": "agent", "version": "1", "caps": ["stats"], "boot_id": "b", "pid": 7}
    text = json.dumps({k: v for k, v in good.items() if k != field})
    conn.sendall(raw(text[:-1].encode() + f', "{field}": {value}}}'.encode()))
    assert g.is_closed_by_peer(conn, timeout=5), "a garbage hello was accepted"
    conn.close()
    wait(lambda: protocol_errors(bench, "bad") == before + 1, what="protocol error counted")
    with bench.client() as c:
        vms = c.get("/v1/vms")  # raises ApiError on a 500
    bad = next(v for v in vms if v["name"] == bench.names["bad"])
    assert bad["agent"]["hello"] is None or len(json.dumps(bad["agent"]["hello"])) < 2000


def test_event_flood_leaves_the_log_bounded_and_the_others_sampled(bench: GuestBench) -> None:
    """Item 11: every event (with up to 1 MiB of data) used to be logged: 3.3 MB/s of log."""
    conn = bench.accept("bad")
    log = bench.daemon.log_path
    size0 = log.stat().st_size
    frame = event_frame("x" * 4096)
    cadence = Cadence(bench)
    sent = 0
    t_end = time.monotonic() + 4
    conn.settimeout(5)
    while time.monotonic() < t_end:
        conn.sendall(frame * 16)
        sent += 16 * len(frame)
    time.sleep(1.5)  # let the daemon work through what is buffered
    grown = log.stat().st_size - size0
    assert sent > 4 << 20, f"the flood was too small to mean anything ({sent} bytes)"
    assert grown < 64 << 10, f"the log grew {grown} bytes under a {sent}-byte event flood"
    cadence.check()
    # One more event once the bucket has refilled: it is logged, with the count it suppressed.
    conn.sendall(event_frame("after"))
    wait(lambda: "similar lines suppressed" in log.read_text(errors="replace")[size0:], what="suppression note")
    assert bench.vm("bad")["agent"]["log_lines_suppressed"] > 100
    conn.close()


def test_a_silent_guest_does_not_stretch_the_others_sampling(bench: GuestBench) -> None:
    """Item 18: collection waited for the slowest VM, so one silent guest stretched every
    VM's interval to agent_timeout_s (3 s here, period 0.5 s)."""
    conn = bench.accept("bad")  # greets, then never answers a request
    cadence = Cadence(bench)
    time.sleep(5)
    cadence.check(max_gap=1.5)
    assert bench.vm("bad")["agent"]["timeouts"] >= 1
    wait(lambda: bench.vm("bad")["stats_stale"], timeout=6, what="silent VM's sample marked stale")
    conn.close()


ABSURD_STATS = {
    "uptime_s": -1,
    "loadavg": [-1.0, 1e300, 0.0],
    "meminfo": {"MemTotal": -1, "MemAvailable": -9e18, "MemFree": 1 << 60},
    "vmstat": {"pgfault": -5},
    "psi": {"cpu": {}, "memory": {"some_avg10": 1e300}, "io": {}},
    "cpus": {"online": list(range(4096)), "present": list(range(4096))},
    "cpu_times": {"user": -1},
}


def test_absurd_stats_are_neither_served_nor_exported(bench: GuestBench) -> None:
    """Item 13: MemTotal -1, PSI 1e300, 4096 CPUs online on a 4-vCPU domain were stored,
    served, exported to /metrics and read by the policies."""
    odd = bench.guests["odd"]
    odd.behave(stats=ABSURD_STATS)
    try:
        wait(lambda: odd.stats_answered >= 2, what="odd guest's stats answered")
        wait(lambda: bench.vm("odd")["guest"]["online_cpus"] is not None, what="odd guest's stats stored")
        g = bench.vm("odd")["guest"]
        assert g["mem_total_mib"] is None and g["mem_available_mib"] is None
        assert g["online_cpus"] is not None and g["online_cpus"] <= MAX_VCPUS
        assert g["psi_memory_some_avg10"] is None and g["loadavg"] == []
        with bench.client() as c:
            text = c.get("/metrics")
        name = re.escape(bench.names["odd"])
        series = re.findall(rf'^(symbiont_vm_\w+)\{{vm="{name}"\}} (\S+)$', text, re.M)
        assert series, "no per-VM series for the odd VM"
        for metric, value in series:
            assert float(value) >= 0, f"{metric} exported {value}"
        online = [float(v) for m, v in series if m == "symbiont_vm_guest_online_cpus"]
        assert online and online[0] <= MAX_VCPUS
        assert not [m for m, v in series if m == "symbiont_vm_guest_mem_total_bytes" and float(v) > MEMORY_MIB << 20]
    finally:
        odd.stop_behaving()


def test_register_then_unregister_at_once_never_wedges(bench: GuestBench) -> None:
    """Item 2: POST then DELETE at once, with an agent answering fast, hung the DELETE with
    the daemon's lock held (3.11's wait_for swallowed the cancellation): every later
    (un)registration hung and SIGTERM did nothing. Its own daemon: this test ends with it."""
    d = bench.start_daemon("churn")
    bench.extra_daemons.append(d)
    bench.guests["churn"].behave()
    name = bench.names["churn"]
    try:
        with Client(d.cfg.socket, timeout=10) as c:
            for i in range(20):
                c.post("/v1/vms", {"name": name})
                if i % 2:
                    wait(lambda: c.get(f"/v1/vms/{name}")["agent"]["connected"], timeout=5)
                t = time.monotonic()
                c.delete(f"/v1/vms/{name}")  # ApiError(0, ...) after 10 s: wedged
                assert time.monotonic() - t < 8
            c.post("/v1/vms", {"name": name})  # registered at stop: its knobs are restored
    except ApiError as exc:
        pytest.fail(f"register/unregister churn wedged the daemon: {exc}")
    finally:
        bench.guests["churn"].stop_behaving()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    try:
        rc = d.proc.wait(20)
    except Exception:
        pytest.fail(f"SIGTERM did not stop the daemon in 20 s; log: {d.log_tail()}")
    assert rc == 0 and time.monotonic() - t < 20
    assert "symbiontd stopped" in d.log_tail(50)
    d.proc = None


def test_the_daemon_survived_every_attack(bench: GuestBench) -> None:
    with bench.client() as c:
        st = c.get("/v1/status")
        assert c.get("/v1/health")["ok"]
    assert st["vms"] == 3
    assert bench.daemon.proc.poll() is None
    assert "Traceback" not in bench.daemon.log_path.read_text(errors="replace")
    good = bench.guests["good"]  # and the good guest is still sampled
    n = good.stats_answered
    wait(lambda: good.stats_answered > n + 2)
