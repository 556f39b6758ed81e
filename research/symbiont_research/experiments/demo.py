"""The demo: symbiotic overcommit on one host, against the same VMs left to libvirt alone.

It is the first experiment and the README's first command. A handful of lab VMs (default 4 ×
512 MiB, 1 vCPU each) share a memory budget smaller than their configured memory (default
1280 MiB for 2048 configured). Every VM starts ballooned down to ``start_mib`` (256 MiB: the
guest sees half its configured memory), so that memory has somewhere to flow. Some run a
page-touching workload (:data:`HOG`) that takes all the memory the guest gives it and prints
its rate (pages/s) to the serial console; the others stay idle. Two phases on the same VMs:

* **stock**: ``symbiontd`` with every part off (it only collects stats): what libvirt does alone,
  every VM keeps its 256 MiB;
* **symbiont**: the daemon restarted with ``profile: overcommit`` (sharing, then ballooning
  under the budget, then host paging), ``paging.idle_park`` and a short ``paging.idle_after_s``:
  the busy VMs' balloons deflate (they grow towards 512 MiB, their workload takes the memory),
  the idle VMs' balloons inflate (the guest chooses what goes), then they are paged out and
  paused (parked).

Every ~10 s a timeline line shows each VM's guest memory and the lever that moved last.

At the end each idle VM is pinged through ``POST /v1/vms/{name}/ping`` — which wakes a parked
VM and swaps its recorded working set in first — to show that it still answers. The report
prints each VM's guest memory at the start and the end of the symbiont phase, the busy VMs'
rate in both phases (so one sees they are not hurt), its host memory (its QEMU process's PSS plus its share of the zram tier's
compressed size, so shared and swapped pages are counted once) in both phases, and where the
memory is (``GET /v1/paging``). Everything is torn down at the end.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from pathlib import Path
from typing import Any

from symbiont.host.procmem import smaps_rollup_kib
from symbiont_research.experiments.framework import RunContext, experiment

MIB = 1 << 20

# The busy VMs' workload: like ``memory.HOG`` it takes memory while the guest has more than 8 %
# available (8 MiB buffers of unique pages, which KSM cannot merge), so it grows when the balloon
# deflates; it touches every page it holds in a loop (0.2 s pause after each pass), and every 2 s
# prints the pages it wrote per second of work (the pauses left out, so the rate does not rise
# just because a bigger buffer pauses less often) and the MiB it holds to the serial console
# (the host's console log keeps them). Host paging or CPU contention shows as a lower rate.
HOG = """
import mmap, os, time
out = open('/dev/ttyS0', 'w')
def avail():
    d = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/meminfo')}
    return d['MemAvailable'], d['MemTotal']
bufs = []
n, slept, last = 0, 0.0, time.monotonic()
while True:
    a, t = avail()
    if a >= 0.08 * t and len(bufs) * 8 < 448:
        b = mmap.mmap(-1, 8 << 20)
        for i in range(0, 8 << 20, 4096):
            b[i:i + 16] = os.urandom(16)
        bufs.append(b)
        n += 2048
    else:
        for b in bufs:
            for i in range(0, 8 << 20, 4096):
                b[i + 16] = (b[i + 16] + 1) & 255
            n += 2048
        z = time.monotonic()
        time.sleep(0.2)
        slept += time.monotonic() - z
    now = time.monotonic()
    if now - last >= 2.0:
        out.write('\\nSYMDEMO %.0f %d\\n' % (n / max(0.1, now - last - slept), len(bufs) * 8))
        out.flush()
        n, slept, last = 0, 0.0, now
"""
RATE = re.compile(rb"SYMDEMO ([0-9.]+) ([0-9]+)")


def hog_samples(lines: list[bytes]) -> list[tuple[float, int]]:
    """The (pages/s, MiB held) of the hog's lines among whole console-log lines."""
    return [(float(m.group(1)), int(m.group(2))) for line in lines for m in RATE.finditer(line)]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def lever_text(last: dict[str, Any] | None) -> str | None:
    """``GET /v1/paging/memory``'s last lever in a few words: part, action, the reason's head
    (whole words, at most 32 characters) and its age (``memory balloon: grant 64 MiB, 4 s ago``)."""
    if not last:
        return None
    why = str(last.get("reason") or "").removeprefix("policy: ").split(" (")[0].split(";")[0].strip()
    if len(why) > 32:
        why = why[:33].rsplit(" ", 1)[0]
    age = last.get("age_s")
    return (f"{last.get('part')} {last.get('action')}" + (f": {why}" if why else "")
            + (f", {age:.0f} s ago" if isinstance(age, (int, float)) else ""))


def timeline_line(t_s: float, phase: str, per_vm: list[dict[str, Any]]) -> str:
    """One progress line: each VM's guest memory (its balloon), parked or not, and its last lever
    (none in the stock phase)."""
    cells = []
    for v in per_vm:
        mem = "?" if v.get("mib") is None else f"{v['mib']:.0f}"
        state = " parked" if v.get("parked") else ""
        lever = f" ({v['lever']})" if v.get("lever") else ""  # not [..]: the progress console reads markup
        cells.append(f"VM{v['label']} {mem} MiB{state}{lever}")
    return f"t={t_s:>4.0f}s {phase:<8} " + " | ".join(cells)


def host_mib(rollup: dict[str, int], zram_ratio: float | None) -> float:
    """A VM's host memory: PSS (shared pages split among their sharers) plus what its swapped
    pages take in zram (its proportional swap, divided by the tier's compression ratio)."""
    swap_kib = rollup.get("SwapPss", rollup.get("Swap", 0))
    in_zram = swap_kib / zram_ratio if zram_ratio and zram_ratio > 0 else 0.0
    return round((rollup.get("Pss", 0) + in_zram) / 1024, 1)


def roles(names: list[str], busy: int) -> dict[str, str]:
    """The first ``busy`` VMs run the workload, the rest stay idle."""
    if not 1 <= busy < len(names):
        raise ValueError(f"busy must be between 1 and vms - 1 (got busy={busy} for {len(names)} VMs)")
    return {n: ("busy" if i < busy else "idle") for i, n in enumerate(names)}


def check_params(p: dict[str, Any]) -> None:
    """Bad parameters fail before anything boots."""
    if p["vms"] < 2:
        raise ValueError("vms must be at least 2 (some busy, some idle)")
    roles([f"vm{i}" for i in range(p["vms"])], p["busy"])
    configured = p["vms"] * p["memory_mib"]
    if not 0 < p["budget_mib"] < configured:
        raise ValueError(f"budget_mib must be above 0 and below the configured memory ({configured} MiB) "
                         "to overcommit")
    if p["budget_mib"] < p["vms"] * p["min_mib"]:
        raise ValueError(f"budget_mib {p['budget_mib']} is below the VMs' floors ({p['vms']} × {p['min_mib']} MiB)")
    if not p["min_mib"] <= p["start_mib"] <= p["memory_mib"]:
        raise ValueError(f"start_mib {p['start_mib']} must be between min_mib ({p['min_mib']}) and "
                         f"memory_mib ({p['memory_mib']})")


def last_known(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Each VM's last non-empty ``key`` in the timeline."""
    out: dict[str, Any] = {}
    for r in rows:
        if r.get(key) is not None:
            out[r["vm"]] = r[key]
    return out


def report_rows(phases: dict[str, dict[str, float]], role: dict[str, str], extra: dict[str, dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """One row per VM: host memory in each phase and the symbiont phase's state (guest memory
    start and end, the busy VMs' rates)."""
    rows = []
    for vm in role:
        stock, sym = phases["stock"].get(vm), phases["symbiont"].get(vm)
        rows.append({"vm": vm, "role": role[vm], "stock_host_mib": stock, "symbiont_host_mib": sym,
                     "saved_mib": None if stock is None or sym is None else round(stock - sym, 1),
                     **extra.get(vm, {})})
    return rows


def format_report(rows: list[dict[str, Any]], budget_mib: int) -> list[str]:
    """The table (fits 80 columns): guest memory start → end, host memory stock vs symbiont,
    the busy VMs' rate in both phases (thousands of pages/s), parked, ping; then the totals,
    what moved and the busy VMs' rate ratio."""
    def num(v: Any, fmt: str = ".0f") -> str:
        return "-" if v is None else format(v, fmt)

    def k(v: Any) -> str:
        return "-" if v is None else f"{v / 1000:.1f}"

    lines = [f"{'':<9} {'guest MiB':^12} {'host MiB':^16} {'k pages/s':^16} {'':>6} {'ping':>6}",
             f"{'VM':<4} {'role':<4} {'start->end':>12} {'stock':>7} {'symbiont':>8} {'stock':>7} {'symbiont':>8} "
             f"{'parked':>6} {'ms':>6}"]
    for r in rows:
        guest = f"{num(r.get('start_mib'))}->{num(r.get('end_mib'))}"
        lines.append(f"{'VM' + r['vm'].rsplit('-', 1)[-1]:<4} {r['role']:<4} {guest:>12} "
                     f"{num(r['stock_host_mib']):>7} {num(r['symbiont_host_mib']):>8} "
                     f"{k(r.get('stock_rate')):>7} {k(r.get('symbiont_rate')):>8} "
                     f"{('yes' if r.get('parked') else 'no'):>6} {num(r.get('ping_ms'), '.0f'):>6}")

    def tot(key: str) -> float:
        return round(sum(r.get(key) or 0 for r in rows), 1)

    guest = f"{tot('start_mib'):.0f}->{tot('end_mib'):.0f}"
    lines.append(f"{'all':<9} {guest:>12} {tot('stock_host_mib'):>7.0f} {tot('symbiont_host_mib'):>8.0f}"
                 f"   (host budget {budget_mib} MiB)")
    moved = {role: round(sum((r.get("end_mib") or 0) - (r.get("start_mib") or 0) for r in rows if r["role"] == role))
             for role in ("busy", "idle")}
    lines.append(f"guest memory moved: busy VMs {moved['busy']:+d} MiB, idle VMs {moved['idle']:+d} MiB")
    rates = [(r["stock_rate"], r["symbiont_rate"]) for r in rows
             if r["role"] == "busy" and r.get("stock_rate") and r.get("symbiont_rate") is not None]
    if rates:
        lines.append("busy VMs' rate under symbiont / stock: "
                     + ", ".join(f"{s / st:.2f}" for st, s in rates))
    return lines


def phase_rates(samples: list[dict[str, Any]], phase: str, skip: int = 2) -> dict[str, float | None]:
    """Each VM's median pages/s over a phase's hog samples (the first ``skip`` of each VM left
    out: the phase's start, when the workload or the daemon is starting)."""
    by_vm: dict[str, list[float]] = {}
    for r in samples:
        if r["phase"] == phase:
            by_vm.setdefault(r["vm"], []).append(r["pages_per_s"])
    return {vm: median(xs[skip:] or xs) for vm, xs in by_vm.items()}


def peak_total(rows: list[dict[str, Any]], phase: str) -> tuple[float, float] | None:
    """The highest host memory of all VMs together at one sample of ``phase``, and when."""
    tot: dict[float, float] = {}
    for r in rows:
        if r["phase"] == phase:
            tot[r["t_s"]] = tot.get(r["t_s"], 0.0) + r["host_mib"]
    if not tot:
        return None
    t = max(tot, key=lambda k: tot[k])
    return round(tot[t], 1), t


def settled(rows: list[dict[str, Any]], vms: list[str], window_s: float, chunk_mib: float = 16) -> bool:
    """True once each of ``vms``'s guest memory moved less than ``chunk_mib`` over the last
    ``window_s`` of the timeline (the policy has stopped moving it)."""
    for vm in vms:
        rs = [r for r in rows if r["vm"] == vm and r.get("balloon_actual_mib") is not None]
        if not rs or rs[-1]["t_s"] - rs[0]["t_s"] < window_s:
            return False
        recent = [r["balloon_actual_mib"] for r in rs if r["t_s"] >= rs[-1]["t_s"] - window_s]
        if max(recent) - min(recent) >= chunk_mib:
            return False
    return True


@experiment(
    "demo",
    "Symbiotic overcommit: 4 VMs over a memory budget, all started at 256 of 512 MiB, 2 busy and 2 idle; "
    "stock vs profile overcommit (memory flows to the busy VMs; idle VMs shrunk, paged out and parked, "
    "still answering a ping); guest and host memory and the busy VMs' rate per VM",
    params={"vms": 4, "busy": 2, "memory_mib": 512, "start_mib": 256, "budget_mib": 1280, "min_mib": 128,
            "stock_s": 30.0, "symbiont_s": 150.0, "settle_s": 10.0, "idle_after_s": 15.0, "idle_cpu_pct": 3.0,
            "period_s": 2.0, "timeline_s": 10.0},
    param_help={
        "vms": "lab VMs to boot (512 MiB, 1 vCPU each by default)",
        "busy": "how many of them run the page-touching workload (the rest stay idle)",
        "memory_mib": "configured memory of each VM (the balloon's ceiling)",
        "start_mib": "every VM's balloon before the stock phase (the guest's memory at the start)",
        "budget_mib": "host memory budget for the VMs in the symbiont phase (below vms × memory_mib)",
        "min_mib": "each VM's balloon floor",
        "stock_s": "seconds of the stock phase (daemon parts off)",
        "symbiont_s": "at most this long in the symbiont phase (ends once every idle VM is parked and the "
                      "busy VMs' memory has settled)",
        "settle_s": "the busy VMs' memory counts as settled after this long without a move",
        "idle_after_s": "paging.idle_after_s: how long a VM must look idle to be parked",
        "idle_cpu_pct": "paging.idle_cpu_pct: below this vCPU %, a period counts as idle",
        "period_s": "daemon control period",
        "timeline_s": "a timeline line (guest memory and last lever per VM) this often",
    },
    needs=("root", "libvirt", "vm"),
)
def run(ctx: RunContext) -> dict[str, Any]:
    import yaml

    from symbiont.client import ApiError
    from symbiont.config import load_config
    from symbiont_research.experiments.memory import run_guest_script
    from symbiont_research.lab.console import read_lines
    from symbiont_research.lab.session import DaemonProcess, LabSession

    p = ctx.params
    check_params(p)
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    hog_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"budget_mib": p["budget_mib"], "configured_mib": p["vms"] * p["memory_mib"],
                               "start_mib": p["start_mib"]}
    phase_mem: dict[str, dict[str, float]] = {"stock": {}, "symbiont": {}}
    extra: dict[str, dict[str, Any]] = {}
    ctx.stage(f"booting {p['vms']} VMs and symbiontd (parts off)", total=None)
    with LabSession(count=p["vms"], memory_mib=p["memory_mib"], max_vcpus=1, period_s=p["period_s"],
                    step=ctx.note) as lab:
        assert lab.host is not None and lab.daemon is not None
        host = lab.host
        summary["boot_to_agent_s"] = {k: round(v, 1) for k, v in lab.boot_seconds.items()}
        role = roles(lab.names, p["busy"])
        busy = [v for v in lab.names if role[v] == "busy"]
        idle = [v for v in lab.names if role[v] == "idle"]
        logs = {v.name: v.console_log for v in lab.vms}
        log_at = {n: (logs[n].stat().st_size if logs[n].exists() else 0) for n in busy}
        t0 = time.monotonic()

        def label(vm: str) -> str:
            return vm.rsplit("-", 1)[-1]

        def read_hogs(phase: str) -> None:
            for vm in busy:
                lines, log_at[vm] = read_lines(logs[vm], log_at[vm])
                samples = hog_samples(lines)
                t_s = round(time.monotonic() - t0, 1)
                hog_rows.extend({"t_s": t_s, "phase": phase, "vm": vm, "pages_per_s": r, "held_mib": h}
                                for r, h in samples)

        def zram_ratio(c: Any) -> float | None:
            try:
                return (c.get("/v1/paging").get("tier") or {}).get("ratio")
            except ApiError:
                return None  # stock: no paging part, no tier

        def sample(c: Any, phase: str) -> dict[str, float]:
            ratio = zram_ratio(c) if phase != "stock" else None
            vms = {v["name"]: v for v in c.get("/v1/vms")}
            parked = set()
            if phase != "stock":
                try:
                    parked = {v["name"] for v in c.get("/v1/paging")["vms"] if v.get("parked")}
                except ApiError:
                    pass
            out = {}
            t_s = round(time.monotonic() - t0, 1)
            for name in lab.names:
                pid = host.qemu_pid(name)
                try:
                    roll = smaps_rollup_kib(Path(f"/proc/{pid}/smaps_rollup").read_text())
                except (OSError, TypeError):
                    continue
                mib = host_mib(roll, ratio)
                out[name] = mib
                v = vms.get(name, {})
                rows.append({"t_s": t_s, "phase": phase, "vm": name, "role": role[name],
                             "host_mib": mib, "rss_mib": round(roll.get("Rss", 0) / 1024, 1),
                             "swap_mib": round(roll.get("Swap", 0) / 1024, 1),
                             "balloon_actual_mib": v.get("balloon_actual_mib"),
                             "guest_mem_available_mib": (v.get("guest") or {}).get("mem_available_mib"),
                             "qemu_cpu_percent": v.get("qemu_cpu_percent"), "parked": int(name in parked)})
            read_hogs(phase)
            return out

        next_line = [0.0]

        def timeline(c: Any, phase: str) -> None:
            """Every ``timeline_s``: each VM's guest memory and the lever that moved last."""
            now = time.monotonic()
            if now < next_line[0]:
                return
            next_line[0] = now + p["timeline_s"]
            levers: dict[str, dict[str, Any]] = {}
            if phase != "stock":
                with contextlib.suppress(ApiError):
                    levers = {v["name"]: v for v in c.get("/v1/paging/memory").get("vms", [])}
            mem = last_known(rows, "balloon_actual_mib")
            latest = {r["vm"]: r for r in rows[-len(lab.names):]}
            per_vm = [{"label": label(vm), "role": role[vm], "mib": mem.get(vm),
                       "parked": bool(latest.get(vm, {}).get("parked")),
                       "lever": lever_text((levers.get(vm) or {}).get("last")) if phase != "stock" else None}
                      for vm in lab.names]
            ctx.note(timeline_line(now - t0, phase, per_vm))

        def ping(c: Any, vm: str) -> tuple[float, bool, bool]:
            """Round trip of POST /v1/vms/{vm}/ping in ms (a wake included), answered, woken."""
            t = time.perf_counter()
            try:
                r = c.post(f"/v1/vms/{vm}/ping", None)
                return (time.perf_counter() - t) * 1000, True, bool(r.get("woke"))
            except ApiError as exc:
                ctx.note(f"{vm}: ping failed: {exc}")
                return (time.perf_counter() - t) * 1000, False, False

        ctx.note("roles: " + "; ".join(f"{', '.join('VM' + label(v) for v in vs)} {r}"
                                        for r, vs in (("busy (page-touching)", busy), ("idle", idle))))

        # -- every VM ballooned down to start_mib: the memory the policy may give back ---------
        ctx.stage(f"ballooning every VM down to {p['start_mib']} of {p['memory_mib']} MiB", total=None)
        for vm in lab.names:
            host.set_balloon(vm, p["start_mib"] * 1024)
        lab.wait_for(lambda: all(host.memory_stats(vm).get("actual", 0) // 1024 <= p["start_mib"] + 8
                                 for vm in lab.names), 60, f"every balloon at {p['start_mib']} MiB", interval=1)

        # -- phase 1: stock ----------------------------------------------------------------
        ctx.stage(f"stock: {', '.join(busy)} busy (page-touching), {', '.join(idle)} idle; daemon parts off",
                  total=p["stock_s"])
        for vm in busy:
            run_guest_script(lab, vm, HOG, "demohog")
        events.append({"t_s": round(time.monotonic() - t0, 1), "vm": ",".join(busy), "event": "workload starts"})
        with lab.client() as c:
            end = time.monotonic() + p["stock_s"]
            while time.monotonic() < end:
                phase_mem["stock"] = sample(c, "stock")
                timeline(c, "stock")
                time.sleep(p["period_s"])
                ctx.advance(p["period_s"])
            for vm in lab.names:
                ms, ok, _ = ping(c, vm)
                extra.setdefault(vm, {})["stock_ping_ms"] = round(ms, 1) if ok else None
        ctx.note("stock: host memory per VM " + ", ".join(f"VM{label(v)} {m:.0f} MiB"
                                                          for v, m in phase_mem["stock"].items()))
        start_mib = last_known(rows, "balloon_actual_mib")

        # -- phase 2: the same VMs under profile overcommit ----------------------------------
        ctx.stage("symbiont: restarting symbiontd with profile overcommit and idle parking", total=None)
        lab.daemon.stop()
        cfg_path = lab.daemon.config_path
        data = yaml.safe_load(cfg_path.read_text())
        data.update({
            "profile": "overcommit",
            "memory": {"enabled": True, "budget_mib": p["budget_mib"]},
            "paging": {"enabled": True, "zram_size_mib": max(256, p["vms"] * p["memory_mib"]),
                       "idle_park": True, "idle_after_s": p["idle_after_s"], "idle_cpu_pct": p["idle_cpu_pct"]},
        })
        cfg_path.write_text(yaml.safe_dump(data))
        lab.daemon = DaemonProcess(cfg_path, load_config(cfg_path), lab.daemon.log_path)
        lab.daemon.start()
        t_sym = round(time.monotonic() - t0, 1)
        events.append({"t_s": t_sym, "vm": "all", "event": "profile overcommit"})
        ctx.stage(f"symbiont: budget {p['budget_mib']} MiB for {summary['configured_mib']} MiB configured; "
                  f"waiting for the idle VMs to be parked and the busy ones to settle", total=p["symbiont_s"])
        next_line[0] = 0.0
        with lab.client() as c:
            end = time.monotonic() + p["symbiont_s"]
            parked_at: dict[str, float] = {}
            while time.monotonic() < end:
                phase_mem["symbiont"] = sample(c, "symbiont")
                timeline(c, "symbiont")
                for r in rows[-len(lab.names):]:
                    if r["parked"] and r["vm"] not in parked_at:
                        parked_at[r["vm"]] = r["t_s"]
                        events.append({"t_s": r["t_s"], "vm": r["vm"], "event": "parked"})
                        ctx.note(f"VM{label(r['vm'])}: parked at t={r['t_s']:.0f} s "
                                 f"(host memory {r['host_mib']:.0f} MiB)")
                sym_rows = [r for r in rows if r["phase"] == "symbiont"]
                if all(v in parked_at for v in idle) and settled(sym_rows, busy, p["settle_s"]):
                    break
                time.sleep(p["period_s"])
                ctx.advance(p["period_s"])
            if next_line[0] - time.monotonic() < p["timeline_s"] - p["period_s"]:  # none printed just now
                next_line[0] = 0.0
                timeline(c, "symbiont")
            summary["parked"] = sorted(parked_at)
            summary["symbiont_phase_s"] = round(time.monotonic() - t0 - t_sym, 1)
            end_mib = last_known(rows, "balloon_actual_mib")  # a paused (parked) VM reports none
            rates = {ph: phase_rates(hog_rows, ph) for ph in ("stock", "symbiont")}
            for vm in lab.names:
                extra.setdefault(vm, {}).update(start_mib=start_mib.get(vm), end_mib=end_mib.get(vm),
                                                stock_rate=rates["stock"].get(vm),
                                                symbiont_rate=rates["symbiont"].get(vm),
                                                parked=vm in parked_at)
            held = last_known(hog_rows, "held_mib")
            for vm in busy:
                extra[vm]["workload_held_mib"] = held.get(vm)
            where = {v["name"]: v for v in c.get("/v1/paging")["vms"]}
            ctx.stage("pinging every VM (a parked one is woken, its working set swapped in first)", total=None)
            for vm in lab.names:
                ms, ok, woke = ping(c, vm)
                extra[vm].update(ping_ms=round(ms, 1), answered=ok, woken=woke)
                events.append({"t_s": round(time.monotonic() - t0, 1), "vm": vm,
                               "event": f"ping {ms:.0f} ms{' (woken)' if woke else ''}"})
                ctx.note(f"VM{label(vm)} ({role[vm]}): ping {'answered' if ok else 'FAILED'} in {ms:.0f} ms"
                         f"{', woken from parked' if woke else ''}")
            phase_mem["symbiont_after_ping"] = sample(c, "after ping")
            status = c.get("/v1/status")
        for vm, w in where.items():
            if vm in extra:
                extra[vm].update(guest_ram_resident_mib=(w.get("guest_ram") or {}).get("resident_mib"),
                                 code_cache_resident_mib=(w.get("code_cache") or {}).get("resident_mib"),
                                 qemu_other_resident_mib=(w.get("qemu_other") or {}).get("resident_mib"),
                                 swapped_mib=w.get("swap_mib"))
        summary["daemon_loop_cpu_ms_per_iteration"] = round(
            1000 * status["loop_cpu_s"] / max(1, status["loop_iterations"]), 2)
        ctx.stage("tearing down (daemon restores knobs, VMs removed)", total=None)
    report = report_rows(phase_mem, role, extra)
    ctx.write_csv("timeline.csv", rows)
    ctx.write_csv("workload.csv", hog_rows)
    ctx.write_csv("events.csv", events)
    ctx.write_csv("report.csv", report)
    _plot(ctx, rows, events, p["budget_mib"], hog_rows)
    for line in format_report(report, p["budget_mib"]):
        ctx.note(line)
    tot = {ph: round(sum(phase_mem[ph].values()), 1) for ph in ("stock", "symbiont")}
    summary.update({
        "stock_host_mib": tot["stock"], "symbiont_host_mib": tot["symbiont"],
        "busy_grew": all((extra[v].get("end_mib") or 0) > (extra[v].get("start_mib") or 0) for v in busy),
        "idle_parked": all(extra[v].get("parked") for v in idle),
        "all_answered": all(extra[v].get("answered") for v in lab.names),
        "per_vm": report,
    })
    peak = peak_total(rows, "symbiont")
    if peak is not None:
        summary["symbiont_peak_host_mib"] = peak[0]
        ctx.note(f"peak host memory of all VMs under symbiont: {peak[0]:.0f} MiB at t={peak[1]:.0f} s "
                 f"(budget {p['budget_mib']} MiB)")
    ctx.note(f"report: VMs' host memory stock {tot['stock']:.0f} MiB -> symbiont {tot['symbiont']:.0f} MiB "
             f"(budget {p['budget_mib']} MiB); busy VMs grew: {summary['busy_grew']}; "
             f"idle VMs parked: {summary['idle_parked']}; every VM answered its ping: {summary['all_answered']}")
    return summary


def _plot(ctx: RunContext, rows: list[dict[str, Any]], events: list[dict[str, Any]], budget_mib: int,
          workload: list[dict[str, Any]] | None = None) -> None:
    """Host memory, guest memory (balloon) and the busy VMs' pages/s over both phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vms = sorted({r["vm"] for r in rows})
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    for vm in vms:
        rs = [r for r in rows if r["vm"] == vm]
        style = "-" if rs and rs[0]["role"] == "busy" else "--"
        t = [r["t_s"] for r in rs]
        label = f"VM {vm.rsplit('-', 1)[-1]} ({rs[0]['role']})"  # lab names end in -N
        ax1.plot(t, [r["host_mib"] for r in rs], style, label=label)
        ax2.plot(t, [r["balloon_actual_mib"] for r in rs], style, label=label)
    ts = sorted({r["t_s"] for r in rows})
    total = [sum(r["host_mib"] for r in rows if r["t_s"] == t) for t in ts]
    ax1.plot(ts, total, "k-", lw=1.5, label="all VMs")
    ax1.axhline(budget_mib, color="red", lw=0.8, ls=":", label=f"budget {budget_mib} MiB")
    for e in events:
        for ax in (ax1, ax2, ax3):
            ax.axvline(e["t_s"], color="grey", lw=0.6)
        who = ",".join(f"VM {v.rsplit('-', 1)[-1]}" if "-" in v else v for v in e["vm"].split(","))
        ax1.annotate(f"{who}: {e['event']}", (e["t_s"], ax1.get_ylim()[1]), fontsize=6, rotation=90,
                     va="top", ha="right")
    ax1.set_ylabel("host MiB (PSS + zram share)")
    ax1.set_title("Stock, then symbiont (profile overcommit): memory goes to the busy VMs, idle ones parked")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.set_ylabel("guest memory (balloon) MiB")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for vm in sorted({r["vm"] for r in workload or []}):
        ws = [r for r in workload or [] if r["vm"] == vm]
        ax3.plot([r["t_s"] for r in ws], [r["pages_per_s"] for r in ws], "-", label=f"VM {vm.rsplit('-', 1)[-1]}")
    ax3.set_ylabel("busy VMs' pages/s")
    ax3.set_xlabel("seconds since the VMs came up")
    if workload:
        ax3.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ctx.savefig(fig, "demo.png")
