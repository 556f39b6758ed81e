"""Placement data model: named resource vectors, hosts, VM requests, quotas.

Why: the heuristics, the lower bound and the simulator all work on dense numpy matrices. This
module turns named, human-written inputs into validated vectors once, so that the hot loops never
look at dictionaries and every malformed input fails early with a message naming the culprit.

Resources are a vector of any dimension. The conventional names and units (seeds/003, "VM sizes")
are ``cpu`` (cores), ``mem`` (GiB), ``disk_bw`` (MB/s), ``disk_size`` (GiB), ``net`` (Mbit/s) and
``gpu`` (devices); any other name is allowed, the units only have to agree between hosts and
requests. A cluster's dimensions are the union of the names its hosts declare; a host that does
not name a dimension has capacity 0 in it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_DIMS: tuple[str, ...] = ("cpu", "mem", "disk_bw", "disk_size", "net", "gpu")

# Absolute slack for comparisons of times (deadlines, ends) and of counts.
TOL = 1e-9
# Relative slack in capacity comparisons, so that sums of floats that should be exact are: a demand
# fits when it exceeds the free capacity by at most RTOL x the host's capacity in that dimension. It is
# relative so that tiny units (bytes in TiB, cores in millions) neither admit a VM five times larger
# than its host (as a fixed 1e-9 did with capacities below 1e-9) nor refuse one that fits.
RTOL = 1e-9


def cap_tol(capacity: np.ndarray | float) -> np.ndarray | float:
    """The capacity slack for ``capacity`` (elementwise): RTOL x |capacity|."""
    return RTOL * np.abs(capacity)


Vector = Mapping[str, float] | Sequence[float]


@dataclass(frozen=True)
class Host:
    """A server: physical ``capacity`` per resource and an ``overcommit`` ratio per resource.

    The placeable (effective) capacity is ``capacity * overcommit``; a missing ratio is 1.0.
    A ratio below 1 keeps headroom free (e.g. 0.9 reserves 10% for the host itself).
    """

    id: str
    capacity: Mapping[str, float]
    overcommit: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """A VM to place, with its allocation constraints (seeds/003, "High-level resource allocation flow").

    * ``demand``: the allocation, by resource name (or a sequence in the cluster's dimension order).
    * ``user``: charged against that user's quota, if one is set.
    * ``app``: the application label that co-location exclusion refers to.
    * ``affinity``: all requests with the same group must land on the same host.
    * ``anti_affinity``: requests with the same group must land on pairwise different hosts.
    * ``exclude_apps``: this VM must not share a host with any VM whose ``app`` is in the set (and,
      symmetrically, no later VM of those apps may join it).
    * ``start``/``end``: when the VM starts running and when it is released (the simulator replays
      them; a static plan treats all requests as running at once, which is conservative).
    * ``deadline``: the latest time at which the VM may still be started; past it the request is
      rejected instead of waiting for room.
    """

    id: str
    demand: Vector
    user: str = ""
    app: str = ""
    affinity: str | None = None
    anti_affinity: str | None = None
    exclude_apps: frozenset[str] = frozenset()
    start: float = 0.0
    end: float | None = None
    deadline: float | None = None

    def __post_init__(self) -> None:
        ex = self.exclude_apps
        if isinstance(ex, str):
            ex = frozenset([ex]) if ex else frozenset()
        elif not isinstance(ex, frozenset):
            ex = frozenset(ex)
        object.__setattr__(self, "exclude_apps", ex)


def _check_id(kind: str, ident: object) -> str:
    if not isinstance(ident, str) or not ident.strip():
        raise ValueError(f"{kind} id must be a non-empty string, got {ident!r}")
    return ident


def resolve_dims(hosts: Iterable[Host]) -> tuple[str, ...]:
    """The cluster's dimensions: the conventional names first (in seed order), then others as met."""
    seen: list[str] = []
    for h in hosts:
        for name in h.capacity:
            if name not in seen:
                seen.append(name)
    known = [d for d in DEFAULT_DIMS if d in seen]
    return tuple(known + [d for d in seen if d not in DEFAULT_DIMS])


def to_vector(
    values: Vector,
    dims: Sequence[str],
    what: str,
    *,
    default: float = 0.0,
    allow_zero: bool = True,
) -> np.ndarray:
    """Validate ``values`` against ``dims`` and return a float vector in dimension order.

    Raises ValueError for an unknown resource name, a wrong number of values, or a negative,
    NaN or infinite value; ``what`` names the input in the message ("request vm1: demand").
    """
    out = np.full(len(dims), float(default))
    if isinstance(values, Mapping):
        index = _dim_index(dims)
        for name, v in values.items():
            i = index.get(name)
            if i is None:
                raise ValueError(
                    f"{what}: unknown resource {name!r}; the cluster's resources are {', '.join(dims)}"
                )
            out[i] = v if type(v) is float else _number(v, f"{what} {name}")
    else:
        seq = list(values)
        if len(seq) != len(dims):
            raise ValueError(
                f"{what}: has {len(seq)} values but the cluster has {len(dims)} resources ({', '.join(dims)})"
            )
        for i, v in enumerate(seq):
            out[i] = v if type(v) is float else _number(v, f"{what} {dims[i]}")
    if not np.isfinite(out).all() and not (default == math.inf and not np.isnan(out).any()):
        i = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(f"{what} {dims[i]}: {out[i]} is not finite")
    bad = np.flatnonzero(out < 0) if allow_zero else np.flatnonzero(out <= 0)
    if bad.size:
        i = int(bad[0])
        rel = "negative" if allow_zero else "not positive"
        raise ValueError(f"{what} {dims[i]}: {out[i]:g} is {rel}")
    return out


_DIM_INDEX: dict[tuple[str, ...], dict[str, int]] = {}


def _dim_index(dims: Sequence[str]) -> dict[str, int]:
    key = tuple(dims)
    index = _DIM_INDEX.get(key)
    if index is None:
        index = _DIM_INDEX[key] = {d: i for i, d in enumerate(key)}
    return index


def _number(v: object, what: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what}: expected a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{what}: {f} is not finite")
    return f


def host_matrices(hosts: Sequence[Host], dims: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(capacity, overcommit)`` matrices of shape (hosts, dims)."""
    if not hosts:
        raise ValueError("no hosts given")
    ids = [_check_id("host", h.id) for h in hosts]
    dup = _first_duplicate(ids)
    if dup is not None:
        raise ValueError(f"host {dup!r} is listed twice")
    cap = np.array([to_vector(h.capacity, dims, f"host {h.id}: capacity") for h in hosts])
    oc = np.array(
        [
            to_vector(h.overcommit, dims, f"host {h.id}: overcommit", default=1.0, allow_zero=False)
            for h in hosts
        ]
    )
    return cap, oc


def validate_requests(requests: Sequence[Request]) -> None:
    """Check ids, times and constraint groups for contradictions; raise ValueError on the first.

    Contradictions are rejected up front rather than reported per request because no placement
    can ever satisfy them: two VMs in the same affinity group and the same anti-affinity group,
    or an affinity group whose members exclude each other's apps.
    """
    ids = [_check_id("request", r.id) for r in requests]
    dup = _first_duplicate(ids)
    if dup is not None:
        raise ValueError(f"request {dup!r} is listed twice")
    groups: dict[str, list[Request]] = {}
    for r in requests:
        _number(r.start, f"request {r.id}: start")
        if r.end is not None and _number(r.end, f"request {r.id}: end") <= r.start:
            raise ValueError(f"request {r.id}: end {r.end:g} is not after start {r.start:g}")
        if r.deadline is not None and _number(r.deadline, f"request {r.id}: deadline") < r.start:
            raise ValueError(f"request {r.id}: deadline {r.deadline:g} is before start {r.start:g}")
        if r.affinity is not None:
            groups.setdefault(r.affinity, []).append(r)
    for g, members in groups.items():
        anti: dict[str, str] = {}
        for m in members:
            if m.anti_affinity is not None:
                if m.anti_affinity in anti:
                    raise ValueError(
                        f"requests {anti[m.anti_affinity]!r} and {m.id!r} share affinity group {g!r} "
                        f"and anti-affinity group {m.anti_affinity!r}: no placement can satisfy both"
                    )
                anti[m.anti_affinity] = m.id
        apps = {m.app: m.id for m in members if m.app}
        for m in members:
            for x in m.exclude_apps:
                if x in apps and apps[x] != m.id:
                    raise ValueError(
                        f"request {m.id!r} excludes app {x!r} of {apps[x]!r}, "
                        f"but both are in affinity group {g!r}"
                    )


def quota_matrix(quotas: Mapping[str, Vector] | None, dims: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-user quota vectors; a resource a quota does not name is unlimited."""
    out: dict[str, np.ndarray] = {}
    for user, q in (quotas or {}).items():
        out[user] = to_vector(q, dims, f"quota of user {user!r}", default=math.inf)
    return out


def _first_duplicate(items: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def fmt(x: float) -> str:
    """Short number formatting for messages (no trailing zeros, at most 4 significant decimals)."""
    if math.isinf(x):
        return "unlimited"
    return f"{x:.4g}"
