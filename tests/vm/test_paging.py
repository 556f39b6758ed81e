"""Host paging on a real guest: cold memory paged out into the daemon's zram tier (QEMU's
RSS falls, the tier holds it, the guest keeps running and a buffer written before reads back
with the same checksum), and an idle VM parked and woken, with and without prefetch.

One 512 MiB lab VM; the buffer is written and checked over the serial console, independently
of the agent that the daemon talks to.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest

from symbiont.client import ApiError
from symbiont_research.experiments.memory import run_guest_script
from symbiont_research.lab.console import guest_exec
from symbiont_research.lab.session import LabSession

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]

# 96 MiB of data the guest writes once and then leaves alone (cold); SIGUSR1 re-reads it.
BUFFER = """
import hashlib, random, signal, time
rnd = random.Random(15)
buf = bytearray()
for _ in range(96):
    buf += rnd.randbytes(1 << 19) * 2
open('/root/buf.sum', 'w').write(hashlib.sha256(buf).hexdigest())
def check(*_):
    open('/root/buf.sum2.tmp', 'w').write(hashlib.sha256(buf).hexdigest())
    import os; os.replace('/root/buf.sum2.tmp', '/root/buf.sum2')
signal.signal(signal.SIGUSR1, check)
while True:
    signal.pause()
"""


@pytest.fixture(scope="module")
def lab(libvirtd, tmp_path_factory):
    with LabSession(count=1, prefix="symbiont-pg-", period_s=2.0, memory_mib=512,
                    work_dir=tmp_path_factory.mktemp("paginglab"),
                    daemon_overrides={"paging": {"enabled": True, "zram_size_mib": 1024,
                                                 "park_observe_s": 2.0}}) as s:
        yield s


def _vm(lab: LabSession) -> dict:
    with lab.client() as c:
        return c.get("/v1/paging")["vms"][0]


def _checksum(lab: LabSession, vm: str) -> tuple[str, str]:
    guest_exec(lab.host, vm, "rm -f /root/buf.sum2; pkill -USR1 -f /root/buf.py")
    lab.wait_for(lambda: guest_exec(lab.host, vm, "test -s /root/buf.sum2").rc == 0, 60, "checksum re-read")
    before = guest_exec(lab.host, vm, "cat /root/buf.sum").output.strip()
    after = guest_exec(lab.host, vm, "cat /root/buf.sum2").output.strip()
    return before, after


def test_cold_memory_paged_out_and_intact(lab: LabSession) -> None:
    vm = lab.names[0]
    run_guest_script(lab, vm, BUFFER, "buf")
    lab.wait_for(lambda: guest_exec(lab.host, vm, "test -s /root/buf.sum").rc == 0, 120, "buffer written")
    # The working set comes from the guest's sampler (the memory part samples every period).
    lab.wait_for(lambda: _wss_known(lab, vm), 30, "a working-set sample")
    before = _vm(lab)
    with lab.client() as c:
        r = c.post(f"/v1/paging/vms/{vm}/pageout", {})
        tier = c.get("/v1/paging")["tier"]
    assert r["paged_mib"] >= 64, r
    assert r["by_source_mib"].get("guest-free", 0) + r["by_source_mib"].get("guest-cold", 0) > 0, r
    assert r["rss_after_mib"] <= r["rss_before_mib"] - 48, r
    after = _vm(lab)
    assert after["guest_ram"]["resident_mib"] <= before["guest_ram"]["resident_mib"] - 48
    assert after["guest_ram"]["swapped_mib"] >= 48
    assert tier["used_mib"] >= 48 and 0 < tier["compressed_mib"] < tier["stored_mib"]  # zram holds it
    inputs = r["inputs"]
    assert inputs["guest"]["wss_mib"] is not None and inputs["target_mib"] > 0
    with lab.client() as c:
        dec = [d for d in c.get("/v1/decisions", vm=vm) if d["part"] == "paging" and d["action"] == "pageout"]
    assert dec and {"rss_before_mib", "rss_after_mib", "tier_used_after_mib"} <= set(dec[-1]["outcome"])
    s0, s1 = _checksum(lab, vm)
    assert s0 and s0 == s1  # every byte came back from zram
    with lab.client() as c:
        assert c.get(f"/v1/vms/{vm}")["cooperative"]


def _wss_known(lab: LabSession, vm: str) -> bool:
    with lab.client() as c:
        return any(v["name"] == vm and v["wss"].get("referenced_bytes") is not None
                   for v in c.get("/v1/memory")["vms"])


def test_park_and_wake_with_prefetch(lab: LabSession) -> None:
    """Parked: paused, guest RAM and code cache paged out; woken: the request is answered.

    The prefetched working set makes the *delivered request* faster (no major fault left on
    its path). The whole wake (prefetch + resume + request) is not faster on this host: a
    zram swap-in costs the same ~9 µs a page whoever does it (benchmarks/bench_paging.py),
    so prefetch only wins what it overlaps with libvirt's resume; the numbers are recorded.
    """
    vm = lab.names[0]
    wakes: dict[bool, list[dict]] = {True: [], False: []}
    parks = []
    with lab.client() as c:
        for prefetch in (False, True) * 3:
            p = c.post(f"/v1/paging/vms/{vm}/park", None)
            parks.append(p)
            assert lab.host.domain(vm).info()[0] == 3  # VIR_DOMAIN_PAUSED: no CPU while parked
            assert p["after"]["guest_ram"]["resident_mib"] < 16 and p["after"]["code_cache"]["resident_mib"] < 16
            # The first park takes the resident VM down; later ones find it mostly paged out.
            assert p["after"]["rss_mib"] < p["before"]["rss_mib"] - (200 if len(parks) == 1 else 0), p
            assert 0 < p["wset_mib"] < 64, p  # the request's working set: a few MiB, not the VM
            with pytest.raises(ApiError) as exc:
                c.post(f"/v1/paging/vms/{vm}/park", None)  # parked twice: refused
            assert exc.value.status == 409
            w = c.call("POST", f"/v1/paging/vms/{vm}/wake", params={"prefetch": str(prefetch).lower()})
            assert w["answered"] and w["latency_s"] < 1.0, w  # available on demand
            assert (w["prefetched_mib"] > 0) == prefetch, w
            wakes[prefetch].append(w)
            time.sleep(1.0)
        dec = [d for d in c.get("/v1/decisions", vm=vm, limit=1000) if d["part"] == "paging"]
    assert lab.host.domain(vm).info()[0] == 1  # running again
    assert sum(d["action"] == "park" for d in dec) == 6 and sum(d["action"] == "wake" for d in dec) == 6
    med = {k: {f: statistics.median(w[f] for w in v) for f in ("latency_s", "ping_s")} for k, v in wakes.items()}
    record = {"median": {str(k): v for k, v in med.items()},
              "latency_s": {str(k): [w["latency_s"] for w in v] for k, v in wakes.items()},
              "ping_s": {str(k): [w["ping_s"] for w in v] for k, v in wakes.items()},
              "prefetch_s": [w["prefetch_s"] for w in wakes[True]],
              "park_rss_mib": [(p["before"]["rss_mib"], p["after"]["rss_mib"]) for p in parks],
              "wset_mib": [p["wset_mib"] for p in parks]}
    print("wake latencies:", json.dumps(record))
    if os.environ.get("SYMBIONT_PAGING_RECORD"):
        with open(os.environ["SYMBIONT_PAGING_RECORD"], "w") as fh:
            json.dump(record, fh)
    assert med[True]["ping_s"] < med[False]["ping_s"], record
    s0, s1 = _checksum(lab, vm)
    assert s0 == s1


def test_idle_vm_parked_by_the_policy_and_woken_by_a_ping(lab: LabSession) -> None:
    """seeds/004 on one host: the idle policy parks the VM on its own (its vCPU time stays
    under the threshold, no agent request, no tap traffic, for idle_after_s), the decision log
    holds its inputs; ``POST /v1/vms/{vm}/ping`` wakes it (working set prefetched first) and is
    answered; the log shows park, then wake."""
    vm = lab.names[0]
    with lab.client() as c:
        c.call("PUT", "/v1/paging/policy", json={"idle_park": True, "idle_after_s": 5, "idle_cpu_pct": 10})
        try:
            t0 = time.time()
            seen: list[dict] = []

            def parked() -> bool:
                st = c.get("/v1/status")["parts"]["paging"]
                seen.append(st.get("idle", {}).get(vm) or {})
                return vm in st["parked"]

            try:
                # idle_after_s plus the guest's 1-min load decaying below 0.5 after its boot (~35 s
                # when this test runs alone; a few seconds after the module's other tests)
                # (the suite run at 15:03 needed more than 75 s: the guest load stood at 0.50 that long)
                lab.wait_for(parked, 150, "parked by the policy")
            except TimeoutError as exc:
                raise AssertionError(f"not parked; the idle policy's last verdicts: {seen[-3:]}") from exc
            parked_after = time.time() - t0
            assert lab.host.domain(vm).info()[0] == 3  # VIR_DOMAIN_PAUSED
            r = c.post(f"/v1/vms/{vm}/ping", None)
            assert r["woke"] and r["wake"]["answered"] and r["seconds"] < 1.0, r
            assert lab.host.domain(vm).info()[0] == 1
            dec = [d for d in c.get("/v1/decisions", vm=vm, limit=1000) if d["part"] == "paging"]
        finally:
            c.call("PUT", "/v1/paging/policy", json={"idle_park": False})
    park = [d for d in dec if d["action"] == "park" and d["inputs"]["reason"].startswith("idle policy")]
    assert park, dec
    idle = park[-1]["inputs"]["idle"]
    assert idle["window_s"] >= 5 and idle["vcpu_peak_pct"] < 10 and idle["requests"] == 0, idle
    wake = [d for d in dec if d["action"] == "wake"][-1]
    assert wake["inputs"]["reason"] == "ping" and dec.index(wake) > dec.index(park[-1])
    print("idle park:", json.dumps({"parked_after_s": round(parked_after, 1), "idle": idle,
                                    "ping_s": r["seconds"], "wake": r["wake"]}))
