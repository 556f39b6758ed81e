"""Reading inventories (hosts, running VMs, quotas) and request lists from YAML or plain dicts.

Why: the CLI reads YAML files and the API receives JSON; both must accept exactly the same shape
and reject mistakes (a misspelt field, a string where a number belongs) with a message that
points at the entry, rather than silently ignoring them. One parser serves both.

Inventory::

    quotas:                      # optional, per user; unnamed resources are unlimited
      alice: {cpu: 16, mem: 64}
    hosts:
      - id: h1
        capacity: {cpu: 16, mem: 64, net: 10000}
        overcommit: {cpu: 2.0}   # optional, default 1.0 per resource
        vms:                     # optional: VMs already running there (same fields as a request)
          - {id: db1, demand: {cpu: 4, mem: 16}, app: db}

Requests (a list, or a mapping with a ``requests`` list)::

    requests:
      - id: web1
        demand: {cpu: 2, mem: 4}
        user: alice              # optional fields: user, app, affinity, anti_affinity,
        anti_affinity: web       # exclude_apps (list), start, end, deadline
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from symbiont.placement.model import Host, Request

REQUEST_FIELDS = (
    "id",
    "demand",
    "user",
    "app",
    "affinity",
    "anti_affinity",
    "exclude_apps",
    "start",
    "end",
    "deadline",
)
HOST_FIELDS = ("id", "capacity", "overcommit", "vms")


@dataclass
class Inventory:
    hosts: list[Host]
    existing: list[tuple[Request, str]] = field(default_factory=list)
    quotas: dict[str, dict[str, float]] = field(default_factory=dict)


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(v).__name__}")
    return v


def _check_fields(d: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(known)}")


def _num(x: Any, where: str) -> float:
    """A finite real number: ints and floats, not bools, not NaN or infinity."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{where}: expected a number, got {x!r}")
    try:
        f = float(x)
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"{where}: {x} is too large") from None
    if not math.isfinite(f):
        raise ValueError(f"{where}: {x!r} is not a finite number")
    return f


def _num_map(v: Any, where: str) -> dict[str, float]:
    return {str(k): _num(x, f"{where}.{k}") for k, x in _mapping(v, where).items()}


def _id(v: Any, where: str) -> str:
    """An identifier: a non-empty string (an integer is taken as its decimal form); never null."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"{where}: expected a non-empty string, got {v!r}")
    s = str(v)
    if not s.strip():
        raise ValueError(f"{where}: expected a non-empty string, got {v!r}")
    return s


def _opt_str(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"{where}: expected a string, got {v!r}")
    return str(v)


def _opt_num(v: Any, where: str) -> float | None:
    return None if v is None else _num(v, where)


def parse_request(d: Any, where: str) -> Request:
    """One request from a mapping (fields in the module docstring)."""
    d = _mapping(d, where)
    _check_fields(d, REQUEST_FIELDS, where)
    if "id" not in d or "demand" not in d:
        raise ValueError(f"{where}: needs 'id' and 'demand'")
    ex = d.get("exclude_apps") or []
    if isinstance(ex, str):
        ex = [ex]
    if not isinstance(ex, list):
        raise ValueError(f"{where}.exclude_apps: expected a list of app names")
    apps = [_id(x, f"{where}.exclude_apps[{i}]") for i, x in enumerate(ex)]
    start = _opt_num(d.get("start"), f"{where}.start")
    return Request(
        id=_id(d["id"], f"{where}.id"),
        demand=_num_map(d["demand"], f"{where}.demand"),
        user=_opt_str(d.get("user"), f"{where}.user") or "",
        app=_opt_str(d.get("app"), f"{where}.app") or "",
        affinity=_opt_str(d.get("affinity"), f"{where}.affinity"),
        anti_affinity=_opt_str(d.get("anti_affinity"), f"{where}.anti_affinity"),
        exclude_apps=frozenset(apps),
        start=0.0 if start is None else start,
        end=_opt_num(d.get("end"), f"{where}.end"),
        deadline=_opt_num(d.get("deadline"), f"{where}.deadline"),
    )


def parse_requests(data: Any, where: str = "requests") -> list[Request]:
    if isinstance(data, Mapping):
        _check_fields(data, ("requests",), where)
        data = data.get("requests")
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of requests (or a mapping with a 'requests' list)")
    return [parse_request(r, f"{where}[{i}]") for i, r in enumerate(data)]


def parse_inventory(data: Any, where: str = "inventory") -> Inventory:
    data = _mapping(data, where)
    _check_fields(data, ("hosts", "quotas"), where)
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ValueError(f"{where}: needs a non-empty 'hosts' list")
    hosts: list[Host] = []
    existing: list[tuple[Request, str]] = []
    for i, h in enumerate(raw_hosts):
        w = f"{where}.hosts[{i}]"
        h = _mapping(h, w)
        _check_fields(h, HOST_FIELDS, w)
        if "id" not in h or "capacity" not in h:
            raise ValueError(f"{w}: needs 'id' and 'capacity'")
        hid = _id(h["id"], f"{w}.id")
        hosts.append(
            Host(
                hid,
                _num_map(h["capacity"], f"{w}.capacity"),
                _num_map(h.get("overcommit") or {}, f"{w}.overcommit"),
            )
        )
        vms = h.get("vms") or []
        if not isinstance(vms, list):
            raise ValueError(f"{w}.vms: expected a list")
        existing.extend((parse_request(v, f"{w}.vms[{j}]"), hid) for j, v in enumerate(vms))
    quotas = {
        str(u): _num_map(q, f"{where}.quotas.{u}")
        for u, q in _mapping(data.get("quotas") or {}, f"{where}.quotas").items()
    }
    return Inventory(hosts, existing, quotas)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 / JSON floats such as ``1e3`` and ``4e0`` as numbers.

    Why: YAML 1.1 (PyYAML) wants a dot and a signed exponent (``1.0e+3``) and reads ``1e3`` as a
    string, so valid JSON numbers in a .json inventory were refused as "expected a number".
    """


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML (or JSON) file, reading YAML 1.2 floats as numbers; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {exc}") from exc


def load_inventory(path: str | Path) -> Inventory:
    return parse_inventory(load_yaml(path), str(path))


def load_requests(path: str | Path) -> list[Request]:
    return parse_requests(load_yaml(path), str(path))
