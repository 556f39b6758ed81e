"""VM traces: a CSV format, a reader/writer, and a seeded generator with documented distributions.

Why: the simulator and the experiments must replay the *same* arrivals, departures and usage
through every policy, and users must be able to bring their own (e.g. converted from a public
cloud trace). A trace is a list of events; times are minutes.

CSV format (one event per row, header required, columns in any order)::

    time,event,vm_id,user,app,affinity,anti_affinity,exclude_apps,deadline,<resource columns...>

* ``time``: minutes since the start of the trace (float >= 0).
* ``event``: ``arrive`` (resource columns = the VM's allocation), ``usage`` (resource columns =
  what the VM actually uses from this time on, same units), or ``depart`` (resource columns empty).
* ``vm_id``: the VM. ``user``, ``app``, ``affinity``, ``anti_affinity``, ``deadline`` (latest start
  time, minutes) and ``exclude_apps`` (apps separated by ``;``) only matter on ``arrive`` rows and
  may be empty or absent.
* every other column is a resource dimension (e.g. ``cpu`` cores, ``mem`` GiB, ``net`` Mbit/s);
  empty cells are 0.

Events at the same time are applied departures first, then arrivals, then usage samples.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from symbiont.placement.model import Host, Request

FIXED = ("time", "event", "vm_id", "user", "app", "affinity", "anti_affinity", "exclude_apps", "deadline")
KINDS = ("depart", "arrive", "usage")  # also the order of events at equal times
_RANK = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class Event:
    time: float
    kind: str
    vm: str
    values: np.ndarray | None = None
    request: Request | None = None


@dataclass
class Trace:
    """Events sorted by (time, kind order, input order), and the resource dimensions they use."""

    dims: tuple[str, ...]
    events: list[Event]

    def requests(self) -> list[Request]:
        return [e.request for e in self.events if e.kind == "arrive" and e.request is not None]

    @property
    def horizon(self) -> float:
        return max((e.time for e in self.events), default=0.0)


def _sort(events: Iterable[Event]) -> list[Event]:
    indexed = list(enumerate(events))
    indexed.sort(key=lambda ie: (ie[1].time, _RANK[ie[1].kind], ie[0]))
    return [e for _, e in indexed]


def make_trace(dims: Sequence[str], events: Iterable[Event]) -> Trace:
    """Sort and check a list of events: every VM arrives once, before its usage and departure."""
    evs = _sort(events)
    arrived: dict[str, float] = {}
    departed: set[str] = set()
    for e in evs:
        if e.kind not in _RANK:
            raise ValueError(
                f"event for {e.vm} at {e.time:g}: unknown kind {e.kind!r}; known: {', '.join(KINDS)}"
            )
        if e.kind == "arrive":
            if e.vm in arrived:
                raise ValueError(f"{e.vm} arrives twice (at {arrived[e.vm]:g} and {e.time:g})")
            arrived[e.vm] = e.time
        elif e.vm not in arrived:
            raise ValueError(f"{e.kind} of {e.vm} at {e.time:g} before it arrives")
        elif e.vm in departed:
            raise ValueError(f"{e.kind} of {e.vm} at {e.time:g} after it departed")
        if e.kind == "depart":
            departed.add(e.vm)
    return Trace(tuple(dims), evs)


def read_csv(path: str | Path) -> Trace:
    """Read a trace CSV (format in the module docstring); ValueError naming the line on bad input."""
    p = Path(path)
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise ValueError(f"{p}: empty file, expected a header row")
        cols = [c.strip() for c in reader.fieldnames]
        for need in ("time", "event", "vm_id"):
            if need not in cols:
                raise ValueError(f"{p}: missing column {need!r} (have: {', '.join(cols)})")
        dims = tuple(c for c in cols if c not in FIXED)
        if not dims:
            raise ValueError(f"{p}: no resource columns (any column besides {', '.join(FIXED)})")
        rows = list(reader)
    departs = {}
    parsed: list[tuple[int, dict[str, str]]] = []
    for i, raw in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        parsed.append((i, row))
        if row.get("event") == "depart":
            departs[row.get("vm_id", "")] = _float(row["time"], p, i, "time")
    events: list[Event] = []
    for i, row in parsed:
        kind, vm = row.get("event", ""), row.get("vm_id", "")
        if not vm:
            raise ValueError(f"{p}:{i}: empty vm_id")
        if kind not in _RANK:
            raise ValueError(f"{p}:{i}: unknown event {kind!r}; known: {', '.join(KINDS)}")
        t = _float(row["time"], p, i, "time")
        if t < 0:
            raise ValueError(f"{p}:{i}: time {t:g} is negative")
        if kind == "depart":
            events.append(Event(t, kind, vm))
            continue
        vals = np.array([_float(row.get(d, ""), p, i, d, empty=0.0) for d in dims])
        if (vals < 0).any():
            raise ValueError(f"{p}:{i}: negative value for {dims[int(np.flatnonzero(vals < 0)[0])]}")
        req = None
        if kind == "arrive":
            dl = row.get("deadline", "")
            req = Request(
                id=vm,
                demand=dict(zip(dims, vals.tolist(), strict=True)),
                user=row.get("user", ""),
                app=row.get("app", ""),
                affinity=row.get("affinity") or None,
                anti_affinity=row.get("anti_affinity") or None,
                exclude_apps=frozenset(x for x in row.get("exclude_apps", "").split(";") if x),
                start=t,
                end=departs.get(vm),
                deadline=_float(dl, p, i, "deadline") if dl else None,
            )
        events.append(Event(t, kind, vm, vals, req))
    try:
        return make_trace(dims, events)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc


def _float(s: str, p: Path, line: int, col: str, empty: float | None = None) -> float:
    if s == "" and empty is not None:
        return empty
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"{p}:{line}: column {col}: {s!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{p}:{line}: column {col}: {s!r} is not finite")
    return v


def write_csv(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` in the CSV format above (numbers with up to 6 significant digits)."""
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(FIXED) + list(trace.dims))
        for e in trace.events:
            r = e.request
            fixed = [
                f"{e.time:.6g}",
                e.kind,
                e.vm,
                r.user if r else "",
                r.app if r else "",
                (r.affinity or "") if r else "",
                (r.anti_affinity or "") if r else "",
                ";".join(sorted(r.exclude_apps)) if r else "",
                "" if r is None or r.deadline is None else f"{r.deadline:.6g}",
            ]
            vals = [""] * len(trace.dims) if e.values is None else [f"{v:.6g}" for v in e.values]
            w.writerow(fixed + vals)
    return p


# -- generator ------------------------------------------------------------------------------

#: "azure": (cores, GiB) pairs from Azure's A- and D-series size menu; 1 core/0.75 GB, 1 core/1.75 GB
#: and 8 cores/56 GB all occur in the Azure 2017 public VM trace's vmtable (Cortez et al., "Resource
#: Central", SOSP'17; github.com/Azure/AzurePublicDataset). The *weights* are this project's
#: approximation of that trace's shape (most VMs have 1-2 cores, a few per cent 8 or more), not
#: numbers taken from it: 1 core 45%, 2 cores 27%, 4 cores 16%, 8 cores 10%, 16 cores 2%.
AZURE_MIX: tuple[tuple[float, float, float], ...] = (
    # cores, mem GiB, probability
    (1, 0.75, 0.10),
    (1, 1.75, 0.25),
    (1, 3.5, 0.10),
    (2, 3.5, 0.15),
    (2, 7, 0.12),
    (4, 7, 0.08),
    (4, 14, 0.08),
    (8, 14, 0.04),
    (8, 28, 0.04),
    (8, 56, 0.02),
    (16, 112, 0.02),
)
MIXES = ("azure", "uniform", "anticorrelated")
#: Per-core allocation of the other resources (network grows with VM size on public clouds).
PER_CORE = {"net": 200.0, "disk_bw": 25.0, "disk_size": 16.0}
#: The standard host (seeds/003's example server: 48 cores, 512 GB) with a 25 Gbit/s NIC, 2 GB/s of
#: disk bandwidth and 4 TiB of disk.
STANDARD_HOST = {
    "cpu": 48.0,
    "mem": 512.0,
    "net": 25000.0,
    "disk_bw": 2000.0,
    "disk_size": 4096.0,
    "gpu": 4.0,
}


def standard_hosts(
    n: int, dims: Sequence[str] = ("cpu", "mem", "net"), overcommit: dict[str, float] | None = None
) -> list[Host]:
    """``n`` identical standard hosts restricted to ``dims``."""
    unknown = [d for d in dims if d not in STANDARD_HOST]
    if unknown:
        raise ValueError(f"no standard capacity for {', '.join(unknown)}; known: {', '.join(STANDARD_HOST)}")
    return [Host(f"h{i:03d}", {d: STANDARD_HOST[d] for d in dims}, dict(overcommit or {})) for i in range(n)]


def sizes(
    n: int,
    rng: np.random.Generator,
    mix: str = "azure",
    dims: Sequence[str] = ("cpu", "mem", "net"),
    gpu_fraction: float = 0.0,
) -> np.ndarray:
    """(n, dims) allocations drawn from ``mix``:

    * ``azure``: (cores, GiB) from :data:`AZURE_MIX`;
    * ``uniform``: cores uniform on {1..8}, memory uniform on [1, 32] GiB, independent (the
      synthetic instances of Panigrahy et al., "Heuristics for Vector Bin Packing", 2011);
    * ``anticorrelated``: half CPU-heavy (cores {4..16}, 1-8 GiB), half memory-heavy (cores {1..4},
      32-64 GiB), where multi-dimensional heuristics matter most.

    Other resources: ``net``, ``disk_bw``, ``disk_size`` = :data:`PER_CORE` x cores; ``gpu`` = 1 for
    a ``gpu_fraction`` of VMs, else 0.
    """
    if mix == "azure":
        probs = np.array([m[2] for m in AZURE_MIX])
        pick = rng.choice(len(AZURE_MIX), size=n, p=probs / probs.sum())
        cores = np.array([AZURE_MIX[i][0] for i in pick], dtype=float)
        mem = np.array([AZURE_MIX[i][1] for i in pick], dtype=float)
    elif mix == "uniform":
        cores = rng.integers(1, 9, size=n).astype(float)
        mem = np.round(rng.uniform(1, 32, size=n), 2)
    elif mix == "anticorrelated":
        heavy_cpu = rng.random(n) < 0.5
        cores = np.where(heavy_cpu, rng.integers(4, 17, size=n), rng.integers(1, 5, size=n)).astype(float)
        mem = np.round(np.where(heavy_cpu, rng.uniform(1, 8, size=n), rng.uniform(32, 64, size=n)), 2)
    else:
        raise ValueError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    cols = []
    for d in dims:
        if d == "cpu":
            cols.append(cores)
        elif d == "mem":
            cols.append(mem)
        elif d in PER_CORE:
            cols.append(cores * PER_CORE[d])
        elif d == "gpu":
            cols.append((rng.random(n) < gpu_fraction).astype(float))
        else:
            raise ValueError(f"the generator knows no resource {d!r}")
    return np.column_stack(cols) if cols else np.zeros((n, 0))


def generate(
    n_vms: int = 200,
    seed: int = 0,
    mix: str = "azure",
    dims: Sequence[str] = ("cpu", "mem", "net"),
    horizon: float = 1440.0,
    interval: float = 5.0,
    life_median: float = 240.0,
    usage: bool = True,
    burst_fraction: float = 0.1,
    users: int = 4,
    gpu_fraction: float = 0.0,
) -> Trace:
    """A seeded synthetic trace (same arguments, same trace). Distributions:

    * arrivals: ``n_vms`` arrival times uniform on [0, 0.75 * horizon) — a Poisson process
      conditioned on its count;
    * lifetimes: log-normal with median ``life_median`` minutes and sigma 1.0 (short-lived majority,
      long tail — the qualitative shape Resource Central reports); VMs alive at ``horizon`` depart then;
    * sizes: :func:`sizes` with ``mix``; users ``u0..u{users-1}`` uniformly;
    * usage (when ``usage``), one sample every ``interval`` minutes (the Azure trace's 5-minute
      readings), as a fraction of the allocation, clipped to [0, 1]:
      CPU = base * (1 + 0.3 sin(2 pi (t + phase) / 1440)) + N(0, 0.03) with base ~ Beta(2, 6)
      (mean 0.25: most VMs are lightly used) and phase uniform over a day;
      memory = m + N(0, 0.02) with m ~ Beta(6, 3) (mean 0.67), plus 0.25 during the first 30
      minutes (boot and warm-up; the guest frees it afterwards, which a black-box hypervisor
      cannot see — see :mod:`~symbiont.placement.simulator`); network and disk bandwidth
      ~ Beta(1.5, 8) (mean 0.16) + N(0, 0.02); disk size 0.5; GPU 1 if allocated;
      a ``burst_fraction`` of VMs has one burst (start uniform in its life, 30-120 minutes) during
      which CPU is uniform on [0.85, 1] and network x3 — the load spikes that make hotspots.
    """
    if n_vms < 0 or horizon <= 0 or interval <= 0 or life_median <= 0:
        raise ValueError("n_vms must be >= 0 and horizon, interval, life_median > 0")
    rng = np.random.default_rng(seed)
    dims = tuple(dims)
    alloc = sizes(n_vms, rng, mix, dims, gpu_fraction)
    arrive = np.sort(rng.uniform(0, 0.75 * horizon, size=n_vms))
    life = rng.lognormal(math.log(life_median), 1.0, size=n_vms)
    depart = np.minimum(arrive + np.maximum(life, interval), horizon)
    user = rng.integers(0, max(users, 1), size=n_vms)
    events: list[Event] = []
    for v in range(n_vms):
        vm = f"vm{v:05d}"
        req = Request(
            vm,
            dict(zip(dims, alloc[v].tolist(), strict=True)),
            user=f"u{user[v]}",
            start=float(arrive[v]),
            end=float(depart[v]),
        )
        events.append(Event(float(arrive[v]), "arrive", vm, alloc[v], req))
        if usage:
            events.extend(
                _usage_events(vm, arrive[v], depart[v], alloc[v], dims, interval, burst_fraction, rng)
            )
        events.append(Event(float(depart[v]), "depart", vm))
    return make_trace(dims, events)


def _usage_events(
    vm: str,
    t0: float,
    t1: float,
    alloc: np.ndarray,
    dims: tuple[str, ...],
    interval: float,
    burst_fraction: float,
    rng: np.random.Generator,
) -> list[Event]:
    ts = np.arange(t0, t1, interval)
    n = ts.size
    base = rng.beta(2, 6)
    phase = rng.uniform(0, 1440)
    memf = rng.beta(6, 3)
    bw = rng.beta(1.5, 8)
    burst = np.zeros(n, dtype=bool)
    if rng.random() < burst_fraction and n:
        b0 = rng.uniform(t0, t1)
        burst = (ts >= b0) & (ts < b0 + rng.uniform(30, 120))
    frac = np.zeros((n, len(dims)))
    for j, d in enumerate(dims):
        if d == "cpu":
            f = base * (1 + 0.3 * np.sin(2 * np.pi * (ts + phase) / 1440)) + rng.normal(0, 0.03, n)
            f = np.where(burst, rng.uniform(0.85, 1.0, n), f)
        elif d == "mem":
            f = memf + rng.normal(0, 0.02, n) + np.where(ts < t0 + 30, 0.25, 0.0)
        elif d in ("net", "disk_bw"):
            f = bw + rng.normal(0, 0.02, n)
            f = np.where(burst, 3 * f, f)
        elif d == "disk_size":
            f = np.full(n, 0.5)
        else:  # gpu and anything else: used as allocated
            f = np.ones(n)
        frac[:, j] = np.clip(f, 0.0, 1.0)
    used = frac * alloc
    return [Event(float(t), "usage", vm, used[i]) for i, t in enumerate(ts)]


# -- standard bin-packing instances ------------------------------------------------------------
# Why: "hosts used / lower bound" on our own traces cannot tell a heuristic near the optimum from
# a loose bound. The classic benchmark families have known optima (by construction) or are the
# ones the literature reports against. These are *generated* from the published recipes with fixed
# seeds (the original files were not available offline); the recipes are in each docstring.


@dataclass(frozen=True)
class Instance:
    """One packing instance: item sizes (n, dims), identical hosts of ``capacity`` (dims), and the
    optimum when it is known by construction (else None)."""

    name: str
    family: str
    sizes: np.ndarray
    capacity: np.ndarray
    optimum: int | None = None


def triplet_instance(n: int, seed: int, capacity: int = 1000) -> tuple[np.ndarray, int, int]:
    """Falkenauer's triplets (Falkenauer 1996, class t): every host is exactly full with three VMs.

    Per host: a ~ U[380, 490], b ~ U[250, (C - a) / 2], c = C - a - b (so 250 <= b <= c < C/2),
    integers, shuffled. The optimum is n / 3 by construction (the volume bound is met exactly).
    Returns (sizes, capacity, optimum).
    """
    if n % 3:
        raise ValueError("a triplet instance needs a multiple of 3 items")
    rng = np.random.default_rng(seed)
    m = n // 3
    a = rng.integers(380, 491, m)
    b = np.array([rng.integers(250, (capacity - x) // 2 + 1) for x in a])
    c = capacity - a - b
    w = np.concatenate([a, b, c]).astype(float)
    rng.shuffle(w)
    return w, capacity, m


def _vector_triplets(n: int, seed: int, capacity: int = 1000) -> np.ndarray:
    """2-D triplets: each dimension split like :func:`triplet_instance`, paired at random within a
    host, so every host of the optimum is exactly full in both dimensions (optimum n / 3)."""
    rng = np.random.default_rng(seed)
    m = n // 3
    rows = []
    for _ in range(m):
        parts = []
        for _d in range(2):
            a = rng.integers(380, 491)
            b = rng.integers(250, (capacity - a) // 2 + 1)
            p = np.array([a, b, capacity - a - b], dtype=float)
            parts.append(rng.permutation(p))
        rows.append(np.stack(parts, axis=1))
    w = np.concatenate(rows)
    return w[rng.permutation(len(w))]


def standard_instances(per_class: int = 3, seed: int = 0) -> list[Instance]:
    """Seeded instances after the published generators, ``per_class`` of each class:

    * ``gen-scholl1`` (Scholl, Klein & Juergens 1997, bin1data): n in {50, 100, 200, 500},
      C in {100, 120, 150}, w ~ U[1, 100], U[20, 100] or U[30, 100];
    * ``gen-scholl2`` (bin2data): n in {50, 100, 200, 500}, C = 1000, mean C/3, C/5, C/7 or C/9,
      spread 20 %, 50 % or 90 % around it;
    * ``gen-scholl3`` (bin3data, the hard class): n = 200, C = 100,000, w ~ U[20,000, 35,000];
    * ``gen-falkenauer-u``: n in {120, 250, 500}, C = 150, w ~ U[20, 100];
    * ``gen-falkenauer-t``: triplets, n in {60, 120, 249}, optimum n / 3;
    * ``vector-uniform``: 2-D, C = (100, 100), w ~ U[10, 40]^2, n in {60, 120};
    * ``vector-anticorrelated``: 2-D, w1 ~ U[5, 60], w2 = 65 - w1 +- 5, n in {60, 120};
    * ``vector-triplets``: 2-D triplets, n in {60, 120, 249}, optimum n / 3.

    Classes are sampled so each draws its parameters in turn; names carry them. The 1-D families are
    called ``gen-...`` to keep them apart from the stored originals (:func:`load_bpplib`).
    """
    rng = np.random.default_rng(seed)
    out: list[Instance] = []

    def one(x: float) -> np.ndarray:
        return np.array([x], dtype=float)

    for k in range(per_class):
        n = (50, 100, 200, 500)[k % 4]
        c = (100, 120, 150)[(k // 4 + k) % 3]
        lo = (1, 20, 30)[(k + 1) % 3]
        w = rng.integers(lo, 101, n).astype(float)
        out.append(Instance(f"scholl1-n{n}-c{c}-w{lo}-{k}", "gen-scholl1", w[:, None], one(c)))
    for k in range(per_class):
        n = (50, 100, 200, 500)[k % 4]
        div = (3, 5, 7, 9)[(k // 2) % 4]
        spread = (0.2, 0.5, 0.9)[k % 3]
        mean = 1000 / div
        w = np.round(rng.uniform(mean * (1 - spread), mean * (1 + spread), n))
        out.append(
            Instance(f"scholl2-n{n}-w{div}-s{int(spread * 100)}-{k}", "gen-scholl2", w[:, None], one(1000))
        )
    for k in range(per_class):
        w = rng.integers(20_000, 35_001, 200).astype(float)
        out.append(Instance(f"scholl3-hard-{k}", "gen-scholl3", w[:, None], one(100_000)))
    for k in range(per_class):
        n = (120, 250, 500)[k % 3]
        w = rng.integers(20, 101, n).astype(float)
        out.append(Instance(f"falkenauer-u{n}-{k}", "gen-falkenauer-u", w[:, None], one(150)))
    for k in range(per_class):
        n = (60, 120, 249)[k % 3]
        w, c, opt = triplet_instance(n, seed=int(rng.integers(1 << 31)))
        out.append(Instance(f"falkenauer-t{n}-{k}", "gen-falkenauer-t", w[:, None], one(c), opt))
    cap2 = np.array([100.0, 100.0])
    for k in range(per_class):
        n = (60, 120)[k % 2]
        out.append(
            Instance(
                f"vector-uniform-n{n}-{k}", "vector-uniform", rng.integers(10, 41, (n, 2)).astype(float), cap2
            )
        )
    for k in range(per_class):
        n = (60, 120)[k % 2]
        w1 = rng.integers(5, 61, n)
        w2 = np.clip(65 - w1 + rng.integers(-5, 6, n), 1, 100)
        out.append(Instance(f"vector-anticorrelated-n{n}-{k}", "vector-anticorrelated",
                            np.stack([w1, w2], axis=1).astype(float), cap2))  # fmt: skip
    for k in range(per_class):
        n = (60, 120, 249)[k % 3]
        w = _vector_triplets(n, seed=int(rng.integers(1 << 31)))
        out.append(
            Instance(f"vector-triplets-n{n}-{k}", "vector-triplets", w, np.array([1000.0, 1000.0]), n // 3)
        )
    return out


def instance_hosts(inst: Instance, count: int | None = None) -> tuple[list[Host], list[Request]]:
    """The instance as placement inputs: ``count`` identical hosts (default: one per item) and requests."""
    dims = (
        ("cpu", "mem")[: inst.sizes.shape[1]]
        if inst.sizes.shape[1] <= 2
        else tuple(f"r{j}" for j in range(inst.sizes.shape[1]))
    )
    n = inst.sizes.shape[0] if count is None else count
    cap = dict(zip(dims, map(float, inst.capacity), strict=True))
    hosts = [Host(f"h{i}", cap) for i in range(n)]
    reqs = [
        Request(f"v{i}", dict(zip(dims, map(float, row), strict=True))) for i, row in enumerate(inst.sizes)
    ]
    return hosts, reqs


def load_bpplib(root: str | Path) -> list[Instance]:
    """Instances in BPPLIB's text format under ``root`` (``family/NAME.txt``: item count, capacity,
    one weight per line), with the optima listed in ``root/optima.tsv`` (file, lower, upper bound;
    the optimum is set where they agree). Errors name the file and line."""
    base = Path(root)
    opt: dict[str, int] = {}
    tsv = base / "optima.tsv"
    if tsv.exists():
        for i, line in enumerate(tsv.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) != 3:
                raise ValueError(f"{tsv}:{i}: expected file, lower bound, upper bound")
            if parts[1] == parts[2]:
                opt[parts[0]] = int(parts[1])
    out: list[Instance] = []
    for f in sorted(base.glob("*/*.txt")):
        try:
            nums = [float(x) for x in f.read_text().split()]
        except ValueError as exc:
            raise ValueError(f"{f}: not a BPPLIB instance ({exc})") from None
        if len(nums) < 2 or len(nums) != 2 + int(nums[0]):
            raise ValueError(f"{f}: expected the item count, the capacity and that many weights")
        rel = f"{f.parent.name}/{f.name}"
        out.append(
            Instance(f.stem, f.parent.name, np.array(nums[2:])[:, None], np.array([nums[1]]), opt.get(rel))
        )
    if not out:
        raise ValueError(f"{base}: no instances (expected FAMILY/NAME.txt files)")
    return out
