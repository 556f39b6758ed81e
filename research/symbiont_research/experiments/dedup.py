"""Dedup experiments (``symbiont experiment run NAME``): CSV + PNG + run.json each.

``dedup-engine`` (no root, seconds)
    A synthetic memory image of N "VMs" with planted sharing (common OS pages, intra-VM
    duplicates, zero pages): every backend must find exactly the planted duplicates, also under a
    deliberately colliding hash; reports each backend's throughput and modelled device time.

``dedup-ksm-policies`` (root, about 4 minutes)
    Catalyst's question: time to reach the sharing potential and ksmd CPU spent, for the
    hint-driven policy vs a ksmtuned-equivalent vs stock KSM defaults vs the kernel's own KSM
    advisor (``advisor_mode=scan-time``, Linux 6.8+), on workloads with high and low sharing
    potential (processes with MADV_MERGEABLE buffers, :mod:`.workload`). KSM's original values
    (the advisor's included) are saved in sqlite before any change and restored at the end; a run
    killed with -9 leaves them saved, and the next run restores them first.

``dedup-identical-vms`` (root, libvirt, boots VMs; about 3 minutes)
    ESX's Figure 4 (seeds/002): 1..N identical VMs from the same golden image; memory shared and
    saved vs the number of VMs, absolute and as a share of aggregate VM memory. Runs through the
    daemon: VMs registered with ``extra.dedup``, policy set through the API, the engine's scan
    through the API, real KSM counters cross-checked while VMs are removed one by one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from symbiont.dedup.backends import PAGE_SIZE, available_backends, select_backend
from symbiont.dedup.engine import BufferSource, Engine
from symbiont_research.experiments.framework import ExperimentError, RunContext, experiment

MiB = 1 << 20


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- dedup-engine ---------------------------------------------------------------------------------
def synthetic_image(vms: int, pages: int, common: float, intra: float, zero: float, seed: int
                    ) -> tuple[dict[str, np.ndarray], int]:  # fmt: skip
    """Images of ``vms`` VMs; returns them and the exact number of saveable frames.

    Each VM: ``common`` of its pages are the same "OS" pages in every VM (distinct within a VM),
    ``intra`` are copies of one of its own private pages (4 copies each), ``zero`` are zero pages,
    the rest is unique. Random 4 KiB pages never collide by chance (2**-32768)."""
    rng = np.random.default_rng(seed)
    n_common, n_zero = int(common * pages), int(zero * pages)
    n_intra = int(intra * pages) // 4 * 4
    n_own = pages - n_common - n_zero - n_intra
    if n_own < n_intra // 4:
        raise ValueError("fractions leave too few unique pages")
    os_pages = rng.integers(0, 256, size=(n_common, PAGE_SIZE), dtype=np.uint8)
    images: dict[str, np.ndarray] = {}
    for v in range(vms):
        img = np.empty((pages, PAGE_SIZE), dtype=np.uint8)
        img[:n_common] = os_pages
        own = rng.integers(0, 256, size=(n_own, PAGE_SIZE), dtype=np.uint8)
        img[n_common : n_common + n_own] = own
        # intra-VM duplicates: groups of 4 copies of an own page (so 3 saved per group... + the original)
        src = own[: n_intra // 4]
        img[n_common + n_own : n_common + n_own + n_intra] = np.repeat(src, 4, axis=0)
        img[pages - n_zero :] = 0
        perm = rng.permutation(pages)  # scatter, so that regions are not trivially contiguous
        images[f"vm{v + 1}"] = img[perm]
    # frames saved: common pages (vms-1 each), intra: each own page src has 1 original + 4 copies
    saveable = (vms - 1) * n_common + vms * n_intra + max(vms * n_zero - 1, 0)
    return images, saveable


@experiment(
    "dedup-engine",
    "Hashing engine: planted duplicates found exactly by every backend (also with forced hash collisions); "
    "throughput and modelled GPU time per backend",
    params={"vms": 3, "mib_per_vm": 64, "common": 0.4, "intra": 0.08, "zero": 0.1, "seed": 7,
            "gpu_types": ["A100", "H100"]},  # fmt: skip
    param_help={"common": "fraction of pages identical across VMs", "intra": "fraction that are intra-VM copies",
                "zero": "fraction of zero pages", "gpu_types": "simulated GPUs to model"},  # fmt: skip
)
def engine_experiment(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    pages = int(p["mib_per_vm"]) * MiB // PAGE_SIZE
    ctx.stage("building the synthetic memory image")
    images, truth = synthetic_image(int(p["vms"]), pages, float(p["common"]), float(p["intra"]), float(p["zero"]),
                                    int(p["seed"]))  # fmt: skip
    sources = [BufferSource(k, v) for k, v in images.items()]
    total = sum(s.npages for s in sources)
    ctx.note(f"{len(sources)} VMs x {p['mib_per_vm']} MiB = {total} pages; planted saveable frames: {truth}")
    variants: list[tuple[str, str | None]] = [("cpu", None)] + [("simulated-gpu", g) for g in p["gpu_types"]]
    if available_backends()["cupy"]["available"]:
        variants.append(("cupy", None))
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    ctx.stage("scanning with every backend", total=len(variants) + 1)
    for name, gpu in variants:
        be = select_backend(name, gpu or "A100")
        rep = Engine(be).scan(sources)
        d = rep.as_dict(regions=0)
        key = {k: d[k] for k in ("saveable_pages", "intra_saveable_pages", "cross_saveable_pages", "zero_pages",
                                 "classes")}  # fmt: skip
        key["dup"] = (rep.dup_src.tobytes(), rep.dup_idx.tobytes(), rep.dup_class.tobytes())
        if reference is None:
            reference = key
        st = be.stats
        rows.append({
            "backend": name, "gpu": gpu or "", "pages": total, "planted_saveable": truth,
            "saveable": rep.saveable, "exact": rep.saveable == truth, "identical_to_cpu": key == reference,
            "intra_saveable": rep.intra_saveable, "cross_saveable": rep.cross_saveable, "zero_pages": rep.zero_pages,
            "hash_wall_s": round(rep.timings["hash_s"], 4), "total_wall_s": round(rep.timings["total_s"], 4),
            "device_s": round(st.device_s, 6), "h2d_s": round(st.h2d_s, 6), "kernel_s": round(st.kernel_s, 6),
            "d2h_s": round(st.d2h_s, 6), "sort_s": round(st.sort_s, 6),
            "hash_gib_s_wall": round(total * PAGE_SIZE / rep.timings["hash_s"] / 2**30, 3),
            "hash_gib_s_device": round(st.bytes / (st.h2d_s + st.kernel_s + st.d2h_s) / 2**30, 3)
            if st.device_s else None,
        })  # fmt: skip
        ctx.advance()
    # forced collisions: a hash of the first 8 bytes modulo 64 puts every page in one of 64 groups
    weak = Engine(hash_fn=lambda pg: pg[:, :8].copy().view(np.uint64).ravel() % np.uint64(64))
    rep = weak.scan(sources)
    rows.append({"backend": "cpu+weak-hash", "gpu": "", "pages": total, "planted_saveable": truth,
                 "saveable": rep.saveable, "exact": rep.saveable == truth, "identical_to_cpu": None,
                 "collision_groups": rep.collision_groups, "false_candidates": rep.false_candidates,
                 "total_wall_s": round(rep.timings["total_s"], 4)})  # fmt: skip
    ctx.advance()
    ctx.write_csv("engine.csv", rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['backend']}{' ' + r['gpu'] if r['gpu'] else ''}" for r in rows if r.get("hash_gib_s_wall")]
    wall = [r["hash_gib_s_wall"] for r in rows if r.get("hash_gib_s_wall")]
    dev = [r.get("hash_gib_s_device") or 0 for r in rows if r.get("hash_gib_s_wall")]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, wall, 0.4, label="measured on this host (wall)")
    ax.bar(x + 0.2, dev, 0.4, label="GPU device time (modelled / measured)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("hash throughput, GiB/s")
    ax.set_yscale("log")
    ax.set_title(f"page hashing, {total} pages; all backends exact: {all(r['exact'] for r in rows)}")
    ax.legend(fontsize=8)
    ctx.savefig(fig, "engine.png")
    ok = all(r["exact"] for r in rows) and all(r["identical_to_cpu"] in (True, None) for r in rows)
    ctx.note(f"exact on every backend and under forced collisions: {ok}")
    return {"pages": total, "planted_saveable": truth, "all_exact": ok,
            "cpu_gib_s": rows[0]["hash_gib_s_wall"], "collision_groups": rows[-1]["collision_groups"]}  # fmt: skip


# -- dedup-ksm-policies ---------------------------------------------------------------------------
def _require_root() -> None:
    import os

    if os.geteuid() != 0:
        raise ExperimentError("this experiment needs root (it writes /sys/kernel/mm/ksm and reads /proc/PID/mem)")


def _policy_run(ctx: RunContext, ctl: Any, policy: str, workload: str, fraction: float, seed: int
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    from symbiont.dedup.memsource import host_mergeable_pages
    from symbiont.dedup.policy import (
        AdvisorParams,
        HintInputs,
        HintParams,
        KsmtunedInputs,
        KsmtunedParams,
        advisor,
        hint_step,
        ksmtuned_step,
        remaining_now,
        stock,
    )  # fmt: skip
    from symbiont.dedup.workload import MergeableWorkload
    from symbiont.host.ksm import meminfo_kib as _meminfo_kib
    from symbiont.host.ksm import qemu_committed_kib

    p = ctx.params
    pages = int(p["mib_per_proc"]) * MiB // PAGE_SIZE
    hp = HintParams(target_pass_s=float(p["hint_target_pass_s"]))
    kp = KsmtunedParams(monitor_interval_s=float(p["ksmtuned_interval_s"]))
    ap = AdvisorParams(target_scan_time=int(p["advisor_target_scan_time_s"]), max_cpu=int(p["advisor_max_cpu"]))
    rows: list[dict[str, Any]] = []
    with MergeableWorkload(procs=int(p["procs"]), pages=pages, shared_fraction=fraction, seed=seed) as w:
        be = select_backend(str(p["backend"]))
        c0 = time.process_time()
        srcs = w.sources()
        rep = Engine(be).scan(srcs)
        engine_cpu = time.process_time() - c0
        scans = 1
        potential = rep.saveable
        if potential != w.expected_saveable:
            ctx.note(f"warning: engine estimate {potential} != planted {w.expected_saveable}")
        mergeable = max(host_mergeable_pages(), rep.pages)
        target = max(1, math.ceil(float(p["reach"]) * potential))
        remaining_at_scan, saved_at_scan = rep.remaining, 0
        npages_state, next_tuned = 0, 0.0
        decision = None
        k0 = ctl.ksmd.seconds() or 0.0
        t0 = time.monotonic()
        last_scan = t0
        reach_t = cpu_at_reach = None
        tick = float(p["tick_s"])
        while True:
            now = time.monotonic()
            t = now - t0
            if t >= float(p["duration_s"]):
                break
            saved = w.saved_pages()
            if policy == "hint":
                mergeable = max(host_mergeable_pages(), rep.pages)  # other processes may come and go
                if now - last_scan >= float(p["scan_interval_s"]):
                    c1 = time.process_time()
                    rep = Engine(be).scan(srcs)
                    engine_cpu += time.process_time() - c1
                    scans += 1
                    remaining_at_scan, saved_at_scan, last_scan = rep.remaining, w.saved_pages(), time.monotonic()
                decision = hint_step(HintInputs(potential, remaining_now(remaining_at_scan, saved_at_scan, saved),
                                                mergeable, saved), hp)  # fmt: skip
            elif policy == "ksmtuned":
                if now >= next_tuned:
                    mi = _meminfo_kib()
                    free = mi["MemFree"] + mi.get("Buffers", 0) + mi.get("Cached", 0)
                    thres = max(mi["MemTotal"] * kp.thres_coef // 100, kp.thres_const_kib)
                    if p["ksmtuned_pressure"]:
                        free = min(free, thres - 1)  # the overcommitted host ksmtuned is made for
                    decision = ksmtuned_step(KsmtunedInputs(mi["MemTotal"], free, qemu_committed_kib(), npages_state), kp)
                    npages_state = int(decision.detail["npages"])
                    next_tuned = now + kp.monitor_interval_s
            elif policy == "advisor":
                decision = advisor(ap)  # the kernel rescales pages_to_scan after each full scan
            else:
                decision = stock()
            assert decision is not None
            ctl.apply(decision.settings)
            cpu = (ctl.ksmd.seconds() or 0.0) - k0
            if reach_t is None and saved >= target:
                reach_t, cpu_at_reach = t, cpu
            s = decision.settings
            rows.append({"workload": workload, "policy": policy, "t_s": round(t, 3), "saved_pages": saved,
                         "potential_pages": potential, "fraction_of_potential": round(saved / potential, 4) if potential else 1.0,
                         "ksmd_cpu_s": round(cpu, 3), "run": s.run,
                         "pages_to_scan": ctl.ksm.read_int("pages_to_scan") if s.advisor else s.pages_to_scan,
                         "sleep_ms": s.sleep_millisecs, "reason": decision.reason})  # fmt: skip
            time.sleep(max(0.0, tick - (time.monotonic() - now)))
        final_saved = w.saved_pages()
        cpu_total = (ctl.ksmd.seconds() or 0.0) - k0
        for src in srcs:
            src.close()
        ctl.apply(stock().settings.__class__(0, 100, 20))  # stop ksmd before the workers exit
    summary = {
        "workload": workload, "policy": policy, "shared_fraction": fraction, "pages": pages * int(p["procs"]),
        "potential_pages": potential, "mergeable_pages_host": mergeable, "reached": reach_t is not None,
        "time_to_reach_s": None if reach_t is None else round(reach_t, 2),
        "ksmd_cpu_at_reach_s": None if cpu_at_reach is None else round(cpu_at_reach, 3),
        "ksmd_cpu_total_s": round(cpu_total, 3), "final_saved_pages": final_saved,
        "final_fraction": round(final_saved / potential, 4) if potential else 1.0,
        "engine_cpu_s": round(engine_cpu, 3) if policy == "hint" else 0.0, "engine_scans": scans if policy == "hint" else 0,
        "engine_device_s": round(be.stats.device_s, 5) if policy == "hint" else 0.0,
    }  # fmt: skip
    return rows, summary


@experiment(
    "dedup-ksm-policies",
    "Time to reach the sharing potential and ksmd CPU: hint-driven vs ksmtuned-equivalent vs stock KSM vs the "
    "kernel's KSM advisor, high and low sharing workloads (MADV_MERGEABLE processes)",
    params={"workloads": ["high", "low"], "policies": ["hint", "ksmtuned", "stock", "advisor"], "procs": 2, "mib_per_proc": 64,
            "high_fraction": 0.9, "low_fraction": 0.05, "duration_s": 30.0, "tick_s": 0.5,
            "ksmtuned_interval_s": 2.0, "ksmtuned_pressure": True, "hint_target_pass_s": 1.0,
            "scan_interval_s": 5.0, "backend": "cpu", "reach": 0.95,
            "advisor_target_scan_time_s": 200, "advisor_max_cpu": 70},  # fmt: skip
    param_help={
        "ksmtuned_interval_s": "ksmtuned's KSM_MONITOR_INTERVAL (60 s in ksmtuned.conf), compressed for the run",
        "ksmtuned_pressure": "feed ksmtuned free memory below its threshold (its boost path); false: real free",
        "reach": "fraction of the potential that counts as reached",
        "backend": "hashing backend of the hint policy (cpu, simulated-gpu, cupy)",
        "advisor_target_scan_time_s": "the advisor's advisor_target_scan_time (kernel default 200 s)",
        "advisor_max_cpu": "the advisor's advisor_max_cpu, percent of a CPU (kernel default 70)",
    },
    needs=("root",),
)
def policies_experiment(ctx: RunContext) -> dict[str, Any]:
    from symbiont.config import load_config
    from symbiont.dedup.ksm_controller import KsmController, LedgerKnobStore
    from symbiont.host.ksm import Ksm, mergeable_processes
    from symbiont.knobs import KnobLedger
    from symbiont.state import StateStore

    _require_root()
    p = ctx.params
    ksm = Ksm()
    ksm.require()
    fractions = {"high": float(p["high_fraction"]), "low": float(p["low_fraction"])}
    for wl in p["workloads"]:
        if wl not in fractions:
            raise ExperimentError(f"workloads: unknown {wl!r} (high, low)")
    for pol in p["policies"]:
        if pol not in ("hint", "ksmtuned", "stock", "advisor"):
            raise ExperimentError(f"policies: unknown {pol!r} (hint, ksmtuned, stock, advisor)")
        if pol == "advisor" and not ksm.has("advisor_mode"):
            raise ExperimentError("policy advisor: this kernel has no KSM advisor (advisor_mode, Linux 6.8+)")
    others = mergeable_processes()
    if others:
        ctx.note(f"other mergeable processes on the host (ksmd scans them too): {sorted(others)}")
    # Originals in sqlite before any change: a run killed with -9 is put right by the next one.
    store = StateStore(Path(load_config().state_dir) / "experiments" / "dedup-ksm-policies.sqlite3")
    ctl = KsmController(ksm, LedgerKnobStore(KnobLedger(store)), unmerge_on_restore=True)  # leave nothing merged
    if ctl.changed:
        ctx.note(f"KSM values left by an interrupted run restored first: {ctl.restore()}")
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    runs = [(wl, pol) for wl in p["workloads"] for pol in p["policies"]]
    ctx.stage(f"{len(runs)} runs of {p['duration_s']} s", total=len(runs))
    try:
        for i, (wl, pol) in enumerate(runs):
            r, s = _policy_run(ctx, ctl, pol, wl, fractions[wl], seed=100 + i)
            rows += r
            summaries.append(s)
            ctx.note(f"{wl:4s} {pol:8s}: potential {s['potential_pages']} pages, reached "
                     f"{s['final_fraction']:.0%} (95% after {s['time_to_reach_s']} s), ksmd CPU {s['ksmd_cpu_total_s']} s"
                     + (f", engine CPU {s['engine_cpu_s']} s" if pol == "hint" else ""))  # fmt: skip
            ctx.advance()
    finally:
        restored = ctl.restore()
        store.close()
        ctx.note(f"KSM settings restored: {restored}")
    ctx.write_csv("timeline.csv", rows)
    ctx.write_csv("summary.csv", summaries)
    plt = _plt()
    wls = list(p["workloads"])
    fig, axes = plt.subplots(len(wls), 2, figsize=(10, 3.2 * len(wls)), squeeze=False)
    for i, wl in enumerate(wls):
        for pol in p["policies"]:
            pts = [r for r in rows if r["workload"] == wl and r["policy"] == pol]
            t = [r["t_s"] for r in pts]
            axes[i][0].plot(t, [r["fraction_of_potential"] for r in pts], label=pol)
            axes[i][1].plot(t, [r["ksmd_cpu_s"] for r in pts], label=pol)
        axes[i][0].axhline(float(p["reach"]), color="grey", lw=0.6, ls="--")
        axes[i][0].set_title(f"{wl} sharing ({fractions[wl]:.0%}): merged / potential")
        axes[i][1].set_title(f"{wl} sharing: ksmd CPU seconds (cumulative)")
        for ax in axes[i]:
            ax.set_xlabel("s")
            ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.savefig(fig, "policies.png")
    return {"runs": summaries}


# -- dedup-identical-vms --------------------------------------------------------------------------
@experiment(
    "dedup-identical-vms",
    "ESX/Catalyst style: 1..N identical VMs from the same image; memory shared and saved vs number of VMs "
    "(KSM through the daemon, engine estimate, real counters)",
    params={"max_vms": 3, "memory_mib": 256, "policy": "hint", "pages_to_scan": 5000, "sleep_millisecs": 10,
            "settle_s": 90.0, "stable_s": 8.0, "backend": "cpu", "after_remove_s": 3.0},  # fmt: skip
    param_help={"policy": "hint (the daemon's engine-driven tuning) or fixed (pages_to_scan/sleep_millisecs)",
                "settle_s": "longest wait for KSM to merge after boot", "stable_s": "stop waiting once the "
                "shared memory changed < 1% over this long", "after_remove_s": "wait after removing a VM"},  # fmt: skip
    needs=("root", "libvirt", "vm"),
)
def identical_vms_experiment(ctx: RunContext) -> dict[str, Any]:
    from symbiont.config import load_config
    from symbiont.host.ksm import mergeable_processes
    from symbiont_research.lab import vms as labvms
    from symbiont_research.lab.session import LabSession

    _require_root()
    p = ctx.params
    n = int(p["max_vms"])
    if not 1 <= n <= 3:
        raise ExperimentError("max_vms: 1..3 on this shared test host")
    mem = int(p["memory_mib"])
    timeline: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with LabSession(count=n, memory_mib=mem, register=False, period_s=1.0,
                    step=lambda s: ctx.stage(s)) as lab:  # fmt: skip
        ctx.note(f"boot to agent hello: {', '.join(f'{k} {v:.0f} s' for k, v in lab.boot_seconds.items())}")
        with lab.client() as c:
            st = lab.wait_for(lambda: c.get("/v1/dedup/status").get("ksm"), 30, "the dedup controller's first sample")
            baseline = int(st["pages_sharing"])
            for name in lab.names:
                c.post("/v1/vms", {"name": name, "memory": {"min_mib": 128}, "extra": {"dedup": {"scan": True}}})
            lab.wait_for(lambda: all(v["mergeable"] is not None for v in c.get("/v1/dedup/vms")) and
                         len(c.get("/v1/dedup/vms")) == n, 30, "the VMs' guest RAM")  # fmt: skip
            vms0 = c.get("/v1/dedup/vms")
            if not all(v["mergeable"] for v in vms0):
                raise ExperimentError("guest RAM is not mergeable (QEMU mem-merge off / <nosharepages/>?)")
            ours = {v["pid"] for v in vms0}
            foreign = sorted(set(mergeable_processes()) - ours)
            if foreign:
                ctx.note(f"{len(foreign)} other mergeable processes on the host (other VMs: KSM merges them too, "
                         f"so host-wide pages_sharing is not ours alone): {foreign}")  # fmt: skip
            if p["policy"] == "fixed":
                body = {"policy": "fixed", "pages_to_scan": int(p["pages_to_scan"]),
                        "sleep_millisecs": int(p["sleep_millisecs"])}  # fmt: skip
            elif p["policy"] == "hint":
                body = {"policy": "hint", "hint": {"target_pass_s": 1.0}, "scan_interval_s": 10.0,
                        "backend": str(p["backend"])}  # fmt: skip
            else:
                raise ExperimentError("policy: hint or fixed")
            c.put("/v1/dedup/policy", body)
            ctx.stage(f"KSM merging (policy {p['policy']})")
            t0 = time.monotonic()
            hist: list[tuple[float, int]] = []
            while True:
                t = time.monotonic() - t0
                vv = c.get("/v1/dedup/vms")
                ks = c.get("/v1/dedup/status")["ksm"]
                shared = sum(v["shared_bytes"] or 0 for v in vv)
                timeline.append({"t_s": round(t, 2), "shared_mib": round(shared / MiB, 2),
                                 "host_ksm_saved_mib": round((ks["pages_sharing"] - baseline) * PAGE_SIZE / MiB, 2),
                                 "ksmd_cpu_s": ks["ksmd_cpu_s"], "full_scans": ks["full_scans"]})  # fmt: skip
                hist.append((t, shared))
                old = [s for tt, s in hist if tt <= t - float(p["stable_s"])]
                if t >= float(p["settle_s"]) or (old and shared > 0 and abs(shared - old[-1]) <= 0.01 * shared):
                    break
                time.sleep(1.0)
            ctx.note(f"merging settled after {timeline[-1]['t_s']} s: {timeline[-1]['shared_mib']} MiB shared")
            ctx.stage("engine scan of all VMs")
            scan = c.post("/v1/dedup/scan", {"prefixes": True, "regions": 5, "backend": str(p["backend"])})
            ctx.note(f"engine: {scan['pages']} resident pages, saveable {scan['saveable_pages']}, remaining "
                     f"{scan['remaining_pages']}, {scan['timings']['total_s']:.2f} s")  # fmt: skip
            prefixes = {len(x["sources"]): x for x in scan["prefixes"]}
            ctx.stage("removing VMs one by one (real KSM counters)")
            cfg = load_config(None, {"lab": {"vm_prefix": lab.prefix}})
            for k in range(n, 0, -1):
                names = lab.names[:k]
                vv = {v["name"]: v for v in c.get("/v1/dedup/vms")}
                ks = c.get("/v1/dedup/status")["ksm"]
                x = prefixes[k]
                agg = k * mem
                resident = sum((vv[nm]["guest_rss_bytes"] or 0) for nm in names) / MiB
                row = {
                    "vms": k, "vm_memory_mib": mem, "aggregate_mib": agg, "resident_mib": round(resident, 1),
                    "engine_shared_mib": round((x["merged_pages"] or 0) * PAGE_SIZE / MiB, 2),
                    "engine_saved_mib": round((x["saved_pages"] or 0) * PAGE_SIZE / MiB, 2),
                    "potential_mib": round(x["saveable_pages"] * PAGE_SIZE / MiB, 2),
                    "potential_no_zero_mib": round(x["saveable_no_zero_pages"] * PAGE_SIZE / MiB, 2),
                    "ksm_shared_mib": round(sum(vv[nm]["shared_bytes"] or 0 for nm in names) / MiB, 2),
                    "host_ksm_saved_mib": round((ks["pages_sharing"] - baseline) * PAGE_SIZE / MiB, 2),
                    "zero_page_mapped_mib": round(sum(scan["meta"]["zero_mapped_pages"].get(nm, 0) for nm in names)
                                                  * PAGE_SIZE / MiB, 2),
                }  # fmt: skip
                for key in ("engine_shared_mib", "engine_saved_mib", "potential_mib", "ksm_shared_mib",
                            "host_ksm_saved_mib"):
                    row[key.replace("_mib", "_pct")] = round(100 * row[key] / agg, 2)
                rows.append(row)
                ctx.note(f"{k} VMs: shared {row['ksm_shared_mib']} MiB (engine {row['engine_shared_mib']}), saved "
                         f"{row['engine_saved_mib']} MiB (host-wide KSM {row['host_ksm_saved_mib']}), potential "
                         f"{row['potential_mib']} MiB of {agg} MiB")  # fmt: skip
                if k > 1:
                    victim = lab.names[k - 1]
                    c.delete(f"/v1/vms/{victim}")
                    labvms.remove_vm(lab.host, cfg, victim, lab.owner)  # type: ignore[arg-type]
                    lab.vms.pop()
                    time.sleep(float(p["after_remove_s"]))
            decisions = [{"ts": round(x["ts"], 2), "action": x["action"],
                          "reason": x["inputs"].get("reason", ""),
                          "settings": json.dumps(x["inputs"].get("settings", "")),
                          "outcome": json.dumps(x["outcome"])[:300]}
                         for x in c.get("/v1/dedup/decisions", limit=500)]  # fmt: skip
            with contextlib.suppress(Exception):
                c.delete("/v1/dedup/policy")
    rows.sort(key=lambda r: r["vms"])
    ctx.write_csv("sharing_vs_vms.csv", rows)
    ctx.write_csv("merge_timeline.csv", timeline)
    ctx.write_csv("decisions.csv", decisions)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.5, 7), sharex=True)
    ks = [r["vms"] for r in rows]
    a1.plot(ks, [r["ksm_shared_mib"] for r in rows], "o-", label="shared (KSM, ksm_merging_pages)")
    a1.plot(ks, [r["engine_shared_mib"] for r in rows], "o--", label="shared (engine, frame numbers)")
    a1.plot(ks, [r["engine_saved_mib"] for r in rows], "s-", label="saved (engine, frame numbers)")
    if not foreign:
        a1.plot(ks, [r["host_ksm_saved_mib"] for r in rows], "x:", label="saved (KSM pages_sharing, host-wide)")
    a1.plot(ks, [r["potential_mib"] for r in rows], "^:", label="potential (engine)")
    a1.set_ylabel("MiB")
    a1.set_title(f"identical VMs ({mem} MiB each) from one golden image")
    a1.legend(fontsize=8)
    a2.plot(ks, [r["engine_shared_pct"] for r in rows], "o-", label="shared")
    a2.plot(ks, [r["engine_saved_pct"] for r in rows], "s-", label="saved")
    a2.plot(ks, [r["potential_pct"] for r in rows], "^:", label="potential")
    a2.set_ylabel("% of aggregate VM memory")
    a2.set_xlabel("number of VMs")
    a2.set_xticks(ks)
    a2.legend(fontsize=8)
    fig.tight_layout()
    ctx.savefig(fig, "sharing_vs_vms.png")
    return {"rows": rows, "settle_s": timeline[-1]["t_s"] if timeline else None,
            "foreign_mergeable_processes": len(foreign)}
