"""GPU experiments (Flyt, IC2E'21 vGPU slicing, FaaSter): each writes CSV + PNG + run.json.

Every experiment takes ``backend`` (``auto``: CuPy when a GPU is present, else the
simulator). On the simulator, times are virtual seconds of the model; on CuPy they are real.
"""

from __future__ import annotations

import statistics
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from symbiont.gpu.backend import GpuBackend, GpuError, KernelSpec, select_backend  # noqa: E402
from symbiont.gpu.calibration import CALIBRATIONS, DEFAULT_CALIBRATION, get_calibration  # noqa: E402
from symbiont.gpu.dispatch import (  # noqa: E402
    DEFAULT_FUNCTIONS,
    POLICIES,
    profile_functions,
    run_dispatch,
    synthetic_invocations,
)
from symbiont.gpu.endpoint import GpuEndpointService  # noqa: E402
from symbiont.gpu.faas import SCHEDULERS, BackgroundLoad, run_trace, synthetic_workload  # noqa: E402
from symbiont.gpu.simulated import DeviceConfig  # noqa: E402
from symbiont_research.experiments.framework import ExperimentError, RunContext, experiment  # noqa: E402

BACKEND_HELP = "auto (CuPy if a GPU is present, else simulated), cupy or simulated"


CALIBRATION_HELP = f"simulator cost set ({', '.join(CALIBRATIONS)}; see gpu/calibration.py); ignored on CuPy"


def _backend(name: str, devices: list[DeviceConfig], seed: int, calibration: str | None = None) -> GpuBackend:
    try:
        return select_backend(name, devices=devices, seed=seed, calibration=get_calibration(calibration))
    except (GpuError, ValueError) as exc:
        raise ExperimentError(str(exc)) from exc


def _client_ops(svc: GpuEndpointService, name: str, handles: list[int]) -> list[int]:
    c = svc.clients[name]
    return [c.ops[h] for h in handles]


# -- Flyt: elastic GPU in action -------------------------------------------------------------------
@experiment(
    "gpu-elastic",
    "Flyt 'elastic GPU in action': a critical client's throughput follows its SM share as it is scaled",
    params={"backend": "auto", "shares": [0.25, 0.5, 1.0, 0.5, 0.25], "phase_s": 0.04, "kernel_ms": 0.5,
            "bin_ms": 4.0, "neighbour": True, "seed": 0, "calibration": DEFAULT_CALIBRATION},  # fmt: skip
    param_help={
        "backend": BACKEND_HELP,
        "shares": "SM share of the client in each phase (vertical scaling at each boundary)",
        "phase_s": "length of each phase (seconds)",
        "kernel_ms": "one kernel's time on the whole GPU",
        "bin_ms": "throughput is averaged over bins of this length",
        "neighbour": "run a busy non-critical neighbour that soaks up the rest of the GPU",
        "calibration": CALIBRATION_HELP,
    },
)
def elastic(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    shares = [float(s) for s in p["shares"]]
    b = _backend(p["backend"], [DeviceConfig("A100", sched="spatial")], p["seed"], p["calibration"])
    gpu = b.devices()[0].gpu_type
    svc = GpuEndpointService(b)
    svc.register_client("app", 0, shares[0], mem_bytes=2**30, critical=True)
    k = KernelSpec.from_time(p["kernel_ms"] / 1e3, gpu, blocks=8 * gpu.sm_count, name="app")
    if p["neighbour"]:
        svc.register_client("neighbour", 0, 1.0, mem_bytes=2**30)
    names = ["app"] + (["neighbour"] if p["neighbour"] else [])
    inflight: dict[str, list[int]] = {n: [] for n in names}
    done: list[tuple[str, float, float]] = []  # (client, end, flops)
    scales = []
    t0 = b.now()
    ctx.stage("elastic GPU phases", total=len(shares))
    for i, share in enumerate(shares):
        if i > 0:
            scales.append(svc.set_quota("app", sm_share=share))
        t_end = t0 + (i + 1) * p["phase_s"]
        while b.now() < t_end:
            for n in names:
                while len(inflight[n]) < 2:
                    inflight[n].append(svc.launch(n, k))
            ops = {n: _client_ops(svc, n, inflight[n]) for n in names}
            finished = b.wait([o for lst in ops.values() for o in lst], until=t_end)
            for n in names:
                for h, o in zip(list(inflight[n]), ops[n], strict=True):
                    if o in finished:
                        tm = b.timing(o)
                        done.append((n, tm.end - t0, tm.flops))
                        inflight[n].remove(h)
            if scales and scales[-1].effective_at is None:
                svc.scale_status("app")  # fills in when the device applied the new share
        ctx.advance()
    for n in names:
        svc.sync(n)
    svc.scale_status("app")
    bin_s = p["bin_ms"] / 1e3
    nbins = int(len(shares) * p["phase_s"] / bin_s)
    rows = []
    for j in range(nbins):
        lo, hi = j * bin_s, (j + 1) * bin_s
        share = shares[min(len(shares) - 1, int(lo / p["phase_s"] + 1e-9))]
        row: dict[str, Any] = {"t_ms": round(hi * 1e3, 3), "share": share}
        for n in names:
            fl = sum(f for c, e, f in done if c == n and lo < e <= hi)
            row[f"{n}_tflops"] = round(fl / bin_s / 1e12, 4)
        rows.append(row)
    ctx.write_csv("throughput.csv", rows)
    phase_rows = []
    for i, share in enumerate(shares):
        lo, hi = i * p["phase_s"], (i + 1) * p["phase_s"]
        settle = lo + 0.25 * p["phase_s"]  # skip the transition
        ends = sorted((e, f) for c, e, f in done if c == "app" and settle < e <= hi)
        # work completed between the first and the last completion in the window, over that span
        tput = sum(f for _, f in ends[1:]) / (ends[-1][0] - ends[0][0]) if len(ends) > 1 else 0.0
        phase_rows.append({"phase": i, "share": share, "app_tflops": round(tput / 1e12, 4),
                           "expected_tflops": round(share * gpu.peak_flops / 1e12, 4),
                           "ratio": round(tput / (share * gpu.peak_flops), 4)})  # fmt: skip
    ctx.write_csv("phases.csv", phase_rows)
    scale_rows = [s.as_dict() for s in scales]
    ctx.write_csv("scaling.csv", scale_rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    ts = [r["t_ms"] for r in rows]
    ax.plot(ts, [r["app_tflops"] for r in rows], label="app (critical) throughput")
    if p["neighbour"]:
        ax.plot(ts, [r["neighbour_tflops"] for r in rows], label="neighbour throughput", alpha=0.6)
    ax.step(ts, [r["share"] * gpu.peak_flops / 1e12 for r in rows], where="post", ls="--", c="k",
            label="share x peak")  # fmt: skip
    ax.set_xlabel(f"time (ms, {b.name} clock)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Elastic GPU: throughput follows the SM share ({gpu.name}, {b.name})")
    ax.legend(fontsize=8)
    ctx.savefig(fig, "elastic.png")
    effects = [s.effect_s for s in scales if s.effect_s is not None]
    ratios = [r["ratio"] for r in phase_rows]
    for r in phase_rows:
        ctx.note(f"share {r['share']:.2f}: {r['app_tflops']:.2f} TFLOP/s = {r['ratio']:.2f} x share x peak")
    return {
        "backend": b.name,
        "gpu": gpu.name,
        "phase_ratio_min": min(ratios),
        "phase_ratio_max": max(ratios),
        "scale_effect_ms_max": round(max(effects) * 1e3, 4) if effects else None,
        "scale_control_ms_max": round(max(s.control_wall_s for s in scales) * 1e3, 4) if scales else None,
    }


# -- Flyt: vertical vs horizontal scaling overhead ----------------------------------------------------
@experiment(
    "gpu-scaling-overhead",
    "Flyt: vertical scaling overhead (flat, < 250 ms) vs horizontal scaling downtime (linear in footprint)",
    params={"backend": "auto", "sizes_mb": [16, 64, 256, 1024], "reps": 3, "cross_server": True, "seed": 0,
            "calibration": DEFAULT_CALIBRATION},  # fmt: skip
    param_help={
        "backend": BACKEND_HELP,
        "sizes_mb": "client device-memory footprints to migrate",
        "reps": "repetitions per size",
        "cross_server": "simulated: the destination GPU is in another server (network hop)",
        "calibration": CALIBRATION_HELP,
    },
)
def scaling_overhead(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    devices = [DeviceConfig("A100", server="server0"),
               DeviceConfig("A100", server="server1" if p["cross_server"] else "server0")]  # fmt: skip
    rows = []
    ctx.stage("scaling overhead per footprint", total=len(p["sizes_mb"]) * p["reps"])
    backend_name = "?"
    for size_mb in p["sizes_mb"]:
        for rep in range(p["reps"]):
            b = _backend(p["backend"], devices, p["seed"] + rep, p["calibration"])
            backend_name = b.name
            gpu = b.devices()[0].gpu_type
            svc = GpuEndpointService(b)
            nbytes = int(size_mb) * 2**20
            # a busy neighbour holds the SMs the VM will get: the share change has to take them back
            svc.register_client("neighbour", 0, 1.0, mem_bytes=2**20)
            svc.register_client("vm", 0, 0.25, mem_bytes=nbytes + 2**20, critical=True)
            part = nbytes // 4
            for _ in range(4):
                h = svc.alloc("vm", part)
                svc.h2d("vm", h)
            svc.sync("vm")
            k = KernelSpec.from_time(2e-3, gpu, blocks=8 * gpu.sm_count, name="work")
            for _ in range(3):
                svc.launch("vm", k)
                svc.launch("neighbour", k)
            b.advance_to(b.now() + 1e-3) if b.virtual_time else None
            res = svc.set_quota("vm", sm_share=0.75)
            svc.sync("vm")
            res = svc.scale_status("vm") or res
            svc.sync("neighbour")
            dst = 1 if len(b.devices()) > 1 else 0
            mig = svc.migrate("vm", dst)
            effect = res.effect_s if res.effect_s is not None else float("nan")
            rows.append({
                "size_mb": size_mb, "rep": rep,
                "vertical_ms": round((res.control_wall_s + effect) * 1e3, 4),
                "vertical_control_ms": round(res.control_wall_s * 1e3, 4),
                "vertical_device_ms": round(effect * 1e3, 4),
                "horizontal_downtime_ms": round(mig.downtime_s * 1e3, 4),
                "horizontal_drain_ms": round(mig.drain_s * 1e3, 4),
                "migration_control_wall_ms": round(mig.control_wall_s * 1e3, 4),
                "dst_device": dst,
            })  # fmt: skip
            svc.remove_client("vm")
            svc.remove_client("neighbour")
            ctx.advance()
    ctx.write_csv("overhead.csv", rows)
    sizes = sorted({r["size_mb"] for r in rows})

    def mean(key: str, s: int) -> float:
        return statistics.fmean(r[key] for r in rows if r["size_mb"] == s)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sizes, [mean("vertical_ms", s) for s in sizes], "o-", label="vertical (share change takes effect)")
    ax.plot(sizes, [mean("horizontal_downtime_ms", s) for s in sizes], "s-", label="horizontal (migration downtime)")
    ax.axhline(250, ls=":", c="grey", label="Flyt: 250 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("client GPU memory footprint (MiB)")
    ax.set_ylabel("overhead (ms)")
    ax.set_title(f"Scaling overhead vs workload size ({backend_name})")
    ax.legend(fontsize=8)
    ctx.savefig(fig, "overhead.png")
    per = {s: (mean("vertical_ms", s), mean("horizontal_downtime_ms", s)) for s in sizes}
    for s, (v, h) in per.items():
        ctx.note(f"{s} MiB: vertical {v:.3f} ms, horizontal downtime {h:.2f} ms")
    return {
        "backend": backend_name,
        "vertical_ms_max": round(max(v for v, _ in per.values()), 4),
        "horizontal_ms_by_size": {str(s): round(h, 3) for s, (_, h) in per.items()},
        "vertical_under_250ms": all(v < 250 for v, _ in per.values()),
    }


# -- IC2E'21: goodput of EDF with slicing ----------------------------------------------------------
@experiment(
    "gpu-faas-goodput",
    "IC2E'21: tasks meeting their deadline and wasted GPU work, EDF with adaptive slicing vs baselines",
    params={"backend": "auto", "loads": [0.5, 0.8, 1.1, 1.4], "duration_s": 0.25,
            "schedulers": ["fcfs", "rr", "edf", "edf+drop", "edf-slice-v1", "edf-slice", "edf-slice-offline"],
            "background_vms": 1, "duty": 0.5, "seed": 0, "gpu": "H100", "calibration": DEFAULT_CALIBRATION,
            "sharing": "auto"},  # fmt: skip
    param_help={
        "backend": BACKEND_HELP,
        "loads": "offered load as a fraction of the capacity the VM expects",
        "duration_s": "length of the arrival process (seconds)",
        "schedulers": f"schedulers to compare ({', '.join(SCHEDULERS)}); NAME+drop drops tasks whose deadline "
        "is infeasible at the estimated capacity (the default for edf-slice*), separating dropping from slicing",
        "background_vms": "other VMs time-sharing the GPU (busy/idle, seeded)",
        "duty": "fraction of time each background VM is busy",
        "gpu": "simulated GPU type",
        "calibration": CALIBRATION_HELP,
        "sharing": "simulated: how the background VMs share the GPU (a sched mode such as spatial or "
        "timeslice-best-effort); auto: the calibration's (spatial for the H100 fit: concurrent CUDA streams)",
    },
)
def faas_goodput(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    for s in p["schedulers"]:
        if s.removesuffix("+drop") not in SCHEDULERS:
            raise ExperimentError(f"unknown scheduler {s!r}; known: {', '.join(SCHEDULERS)} (optionally +drop)")
    bg = BackgroundLoad(vms=p["background_vms"], duty=p["duty"], seed=p["seed"] + 1) if p["background_vms"] else None
    expected = 1.0 / (1.0 + p["background_vms"] * p["duty"])
    try:
        cal = get_calibration(p["calibration"])
        sharing = cal.sharing if p["sharing"] == "auto" else str(p["sharing"])
        DeviceConfig(p["gpu"], sched=sharing)
    except GpuError as exc:
        raise ExperimentError(str(exc)) from exc
    rows = []
    ctx.stage("workloads x schedulers", total=len(p["loads"]) * len(p["schedulers"]))
    backend_name = "?"
    for load in p["loads"]:
        for s in p["schedulers"]:
            b = _backend(p["backend"], [DeviceConfig(p["gpu"], sched=sharing)], p["seed"], cal.name)
            backend_name = b.name
            tasks = synthetic_workload(b.devices()[0].gpu_type, float(load), p["duration_s"], seed=p["seed"],
                                       capacity_fraction=expected)  # fmt: skip
            name = s.removesuffix("+drop")
            r = run_trace(b, tasks, name, background=bg, drop="estimated" if s.endswith("+drop") else None)
            rows.append({"load": load, **r.summary(), "scheduler": s})
            ctx.advance()
    ctx.write_csv("goodput.csv", rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in p["schedulers"]:
        pts = [r for r in rows if r["scheduler"] == s]
        ax1.plot([r["load"] for r in pts], [r["goodput"] for r in pts], "o-", label=s)
        ax2.plot([r["load"] for r in pts], [r["wasted_fraction"] for r in pts], "o-", label=s)
    ax1.set_xlabel("offered load")
    ax1.set_ylabel("fraction of tasks meeting the deadline")
    ax2.set_xlabel("offered load")
    ax2.set_ylabel("wasted GPU work (fraction of executed)")
    ax1.legend(fontsize=8)
    fig.suptitle(f"Deadline-aware FaaS on a shared GPU ({backend_name}, {sharing}, {p['background_vms']} background VM)")
    ctx.savefig(fig, "goodput.png")
    best = {}
    for load in p["loads"]:
        pts = [r for r in rows if r["load"] == load]
        top = max(pts, key=lambda r: r["goodput"])
        best[str(load)] = top["scheduler"]
        ctx.note(f"load {load}: " + ", ".join(f"{r['scheduler']} {r['goodput']:.2f}" for r in pts))
    return {"backend": backend_name, "calibration": cal.name, "sharing": sharing, "best_by_load": best,
            "goodput": {f"{r['scheduler']}@{r['load']}": r["goodput"] for r in rows}}  # fmt: skip


# -- FaaSter: heterogeneous dispatch -----------------------------------------------------------------
@experiment(
    "gpu-hetero-dispatch",
    "FaaSter: invocation turnaround with heterogeneous GPUs, profile-based dispatch vs baselines",
    params={"backend": "auto", "gpus": ["A100", "V100", "T4", "T4"], "rates": [200.0, 600.0, 1000.0],
            "duration_s": 0.3, "policies": list(POLICIES), "seed": 0},  # fmt: skip
    param_help={
        "backend": BACKEND_HELP,
        "gpus": "simulated GPU types (the real backend uses the GPUs present)",
        "rates": "invocations per second",
        "duration_s": "length of the arrival process (seconds)",
        "policies": f"dispatch policies ({', '.join(POLICIES)})",
    },
)
def hetero_dispatch(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    for pol in p["policies"]:
        if pol not in POLICIES:
            raise ExperimentError(f"unknown policy {pol!r}; known: {', '.join(POLICIES)}")
    devices = [DeviceConfig(g, server="server0") for g in p["gpus"]]
    ctx.stage("profiling functions on each GPU type")
    b = _backend(p["backend"], devices, p["seed"])
    profiles = profile_functions(b, DEFAULT_FUNCTIONS)
    ctx.write_csv("profiles.csv", profiles.as_rows())
    ctx.write_csv("profile_samples.csv", profiles.rows)
    rows = []
    ctx.stage("rates x policies", total=len(p["rates"]) * len(p["policies"]))
    for rate in p["rates"]:
        invs = synthetic_invocations(DEFAULT_FUNCTIONS, float(rate), p["duration_s"], seed=p["seed"])
        for pol in p["policies"]:
            b = _backend(p["backend"], devices, p["seed"])
            r = run_dispatch(b, invs, DEFAULT_FUNCTIONS, profiles, pol, seed=p["seed"])
            s = r.summary()
            rows.append({"rate": rate, **{k: v for k, v in s.items() if k != "per_device"},
                         "per_device": " ".join(f"{k}={v}" for k, v in s["per_device"].items())})  # fmt: skip
            ctx.advance()
    ctx.write_csv("turnaround.csv", rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for pol in p["policies"]:
        pts = [r for r in rows if r["policy"] == pol]
        ax1.plot([r["rate"] for r in pts], [r["mean_turnaround_ms"] for r in pts], "o-", label=pol)
        ax2.plot([r["rate"] for r in pts], [r["p95_turnaround_ms"] for r in pts], "o-", label=pol)
    for ax, what in ((ax1, "mean"), (ax2, "p95")):
        ax.set_xlabel("invocations / s")
        ax.set_ylabel(f"{what} turnaround (ms)")
        ax.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"Heterogeneous dispatch over {', '.join(d.gpu_type.name for d in b.devices())} ({b.name})")
    ctx.savefig(fig, "turnaround.png")
    out: dict[str, Any] = {"backend": b.name, "devices": [d.gpu_type.name for d in b.devices()]}
    for rate in p["rates"]:
        pts = [r for r in rows if r["rate"] == rate]
        ctx.note(f"{rate:g}/s: " + ", ".join(f"{r['policy']} {r['mean_turnaround_ms']:.2f} ms" for r in pts))
        out[f"mean_ms@{rate:g}"] = {r["policy"]: r["mean_turnaround_ms"] for r in pts}
    return out
