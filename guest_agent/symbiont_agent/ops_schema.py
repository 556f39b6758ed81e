"""Every agent operation, declared once: its name, request, reply, payload and error codes.

Standard library only: the agent validates what the host asks with it, and the daemon
(``symbiont.gateway``) validates what the untrusted guest answers with the same codec.

An op is ``<part>.<verb>`` (``core.stats``, ``memory.wss-sample``, ``cpu.container-create``,
``ssdcache.twolevel-split``, ``migration.dump``, ``paging.cold``); the names of earlier
releases (``stats``, ``ct-create``, ``doubledecker-split``, ``mig-dump``...) are kept as
aliases for one release so old daemons and old guest images keep working.

A request or reply is a dataclass whose fields carry their bounds (:func:`i`, :func:`num`,
:func:`s`, :func:`lst`, :func:`js`). The codec checks types (``True`` is not an int), ranges,
lengths and nesting, and refuses unknown keys. A reply class with ``EXTRA = True`` declares
the fields the daemon relies on and passes the rest through as bounded JSON (``extra``): its
full shape belongs to the part's own validator (containers' records, cache status...).
Deeply structured arguments that the agent's parts validate themselves (a container spec, a
migration manifest) are :data:`Json` fields, bounded in size and depth.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Union

# -- error codes -------------------------------------------------------------------------------
INVALID = "invalid"  # the request is malformed or out of range
NOT_FOUND = "not_found"  # what it names does not exist
CONFLICT = "conflict"  # the state forbids it now (already exists, not running...)
UNSUPPORTED = "unsupported"  # this agent does not serve the op
BUSY = "busy"  # try again later
TIMEOUT = "timeout"  # the op (or the host waiting for it) ran out of time
INTERNAL = "internal"  # the op failed inside the guest
BAD_REPLY = "bad_reply"  # the daemon's verdict on an answer that fails the schema
ERROR_CODES = frozenset({INVALID, NOT_FOUND, CONFLICT, UNSUPPORTED, BUSY, TIMEOUT, INTERNAL, BAD_REPLY})

MAX_MESSAGE = 2000  # characters of an error message
MAX_BINARY = 16 << 20  # = protocol.MAX_BINARY (kept import-free of protocol)
MAX_STR = 4096  # default bound of a string field
MAX_LIST = 4096  # default bound of a list or object field
MAX_JSON_CHARS = 1 << 20  # default bound of a Json field, serialised
MAX_DEPTH = 16


class SchemaError(ValueError):
    """A value does not match its op's schema; ``field`` names where (``a.b[3]``)."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field = field_path or "(root)"
        super().__init__(f"{self.field}: {message}")


class Json:
    """Annotation: any JSON value, bounded by ``max`` serialised characters and MAX_DEPTH."""


# -- field helpers: bounds live in the field's metadata ------------------------------------------
def _f(default: Any, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


def i(lo: int, hi: int, default: Any = MISSING) -> Any:
    """An int in ``lo..hi``."""
    return _f(default, min=lo, max=hi)


def num(lo: float, hi: float, default: Any = MISSING) -> Any:
    """A finite number (int or float, not bool) in ``lo..hi``."""
    return _f(default, min=lo, max=hi)


def s(max_len: int = 256, default: Any = MISSING, choices: tuple[str, ...] | None = None) -> Any:
    """A string of at most ``max_len`` characters (one of ``choices`` if given)."""
    return _f(default, max_len=max_len, choices=choices)


def lst(max_len: int = MAX_LIST, default: Any = MISSING, item: dict[str, Any] | None = None) -> Any:
    """A list (or object) of at most ``max_len`` items; ``item`` bounds each (min/max/max_len)."""
    return _f(default, max_len=max_len, item=item or {})


def js(max_chars: int = 64 << 10, default: Any = MISSING) -> Any:
    """A JSON value of at most ``max_chars`` serialised characters."""
    return _f(default, max=max_chars)


# -- the op table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpSpec:
    name: str  # canonical: <part>.<verb>
    request: type
    reply: type
    aliases: tuple[str, ...] = ()
    payload_in: int = 0  # bytes of binary payload the request may carry
    payload_out: int = 0  # ... and the reply
    cap: str = ""  # the capability (hello caps entry) it needs; the name itself
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.cap:
            object.__setattr__(self, "cap", self.name)


OPS: dict[str, OpSpec] = {}
ALIASES: dict[str, str] = {}  # any name (canonical or old) -> canonical


def declare(spec: OpSpec) -> OpSpec:
    """Add an op to the table (this module declares the agent's; tests may add probes)."""
    for n in (spec.name, *spec.aliases):
        if n in ALIASES and ALIASES[n] != spec.name:
            raise ValueError(f"op name {n!r} already belongs to {ALIASES[n]!r}")
    _fields_of(spec.request)
    _fields_of(spec.reply)
    OPS[spec.name] = spec
    for n in (spec.name, *spec.aliases):
        ALIASES[n] = spec.name
    return spec


def canonical(name: str) -> str:
    """The canonical name of ``name`` (an old alias or already canonical); KeyError if unknown."""
    return ALIASES[name]


def spec(name: str) -> OpSpec:
    return OPS[ALIASES[name]]


# -- the codec ---------------------------------------------------------------------------------
_HINTS: dict[type, tuple[tuple[dataclasses.Field[Any], Any], ...]] = {}


def _fields_of(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    got = _HINTS.get(cls)
    if got is None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        hints = typing.get_type_hints(cls, globalns=globals())
        got = tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.name != "extra")
        _HINTS[cls] = got
    return got


def _name(v: Any) -> str:
    return type(v).__name__


def _depth(v: Any, path: str) -> None:
    stack = [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            if d > MAX_DEPTH:
                raise SchemaError(path, f"nests deeper than {MAX_DEPTH} levels")
            stack.extend((c, d + 1) for c in (x.values() if isinstance(x, dict) else x))


def _json(v: Any, meta: dict[str, Any], path: str) -> Any:
    _depth(v, path)
    try:
        text = json.dumps(v, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise SchemaError(path, f"not JSON: {exc}") from None
    limit = meta.get("max", MAX_JSON_CHARS)
    if len(text) > limit:
        raise SchemaError(path, f"{len(text)} characters of JSON exceed {limit}")
    return json.loads(text)  # a copy: nothing aliases the caller's objects


def _check(tp: Any, meta: dict[str, Any], v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, meta, v, path)
    if tp is Json or tp is Any:
        return _json(v, meta, path)
    if tp is bool:
        if not isinstance(v, bool):
            raise SchemaError(path, f"expected true or false, not {_name(v)}")
        return v
    if tp is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise SchemaError(path, f"expected an integer, not {_name(v)}")
        lo, hi = meta.get("min", -(2**63)), meta.get("max", 2**63 - 1)
        if not lo <= v <= hi:
            raise SchemaError(path, f"{v} is outside {lo}..{hi}")
        return v
    if tp is float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise SchemaError(path, f"expected a number, not {_name(v)}")
        if not math.isfinite(v):
            raise SchemaError(path, "expected a finite number")
        lo, hi = meta.get("min", -1e18), meta.get("max", 1e18)
        if not lo <= v <= hi:
            raise SchemaError(path, f"{v} is outside {lo}..{hi}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise SchemaError(path, f"expected a string, not {_name(v)}")
        limit = meta.get("max_len") or MAX_STR
        if len(v) > limit:
            raise SchemaError(path, f"string of {len(v)} characters exceeds {limit}")
        choices = meta.get("choices")
        if choices and v not in choices:
            raise SchemaError(path, f"{v[:60]!r} is not one of {', '.join(choices)}")
        return v
    if origin is list:
        if not isinstance(v, list):
            raise SchemaError(path, f"expected a list, not {_name(v)}")
        limit = meta.get("max_len") or MAX_LIST
        if len(v) > limit:
            raise SchemaError(path, f"list of {len(v)} items exceeds {limit}")
        (item_tp,) = typing.get_args(tp)
        item_meta = meta.get("item") or {}
        return [_check(item_tp, item_meta, x, f"{path}[{n}]") for n, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise SchemaError(path, f"expected an object, not {_name(v)}")
        limit = meta.get("max_len") or MAX_LIST
        if len(v) > limit:
            raise SchemaError(path, f"object of {len(v)} keys exceeds {limit}")
        _, val_tp = typing.get_args(tp)
        item_meta = meta.get("item") or {}
        out = {}
        for k, x in v.items():
            if not isinstance(k, str) or len(k) > 256:
                raise SchemaError(path, "keys must be strings of at most 256 characters")
            out[k] = _check(val_tp, item_meta, x, f"{path}.{k}")
        return out
    if dataclasses.is_dataclass(tp):
        if isinstance(v, tp):
            v = to_dict(v)
        return _decode_obj(tp, v, path)  # type: ignore[arg-type]
    raise TypeError(f"{path}: unsupported schema type {tp!r}")


def _decode_obj(cls: type, obj: Any, path: str = "") -> Any:
    if not isinstance(obj, dict):
        raise SchemaError(path, f"expected an object, not {_name(obj)}")
    fields = _fields_of(cls)
    known = {f.name for f, _ in fields}
    unknown = [k for k in obj if k not in known]
    kw: dict[str, Any] = {}
    if unknown:
        if not getattr(cls, "EXTRA", False):
            shown = ", ".join(repr(str(k)[:40]) for k in sorted(map(str, unknown))[:5])
            raise SchemaError(f"{path}.{unknown[0]}" if path else str(unknown[0])[:64], f"unknown field(s) {shown}")
        kw["extra"] = _json({k: obj[k] for k in unknown}, {"max": MAX_JSON_CHARS}, f"{path}(extra)" or "extra")
    for f, tp in fields:
        p = f"{path}.{f.name}" if path else f.name
        if f.name in obj:
            kw[f.name] = _check(tp, dict(f.metadata), obj[f.name], p)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise SchemaError(p, "required")
    return cls(**kw)


def to_dict(obj: Any) -> dict[str, Any]:
    """A decoded request/reply back to its JSON object (extras merged back)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name == "extra":
            continue
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = to_dict(v)
        elif isinstance(v, list):
            v = [to_dict(x) if dataclasses.is_dataclass(x) and not isinstance(x, type) else x for x in v]
        out[f.name] = v
    extra = getattr(obj, "extra", None)
    if extra:
        out.update({k: v for k, v in extra.items() if k not in out})
    return out


def decode_request(op: str, args: Any) -> Any:
    """The request of ``op`` (any of its names) from a JSON object; SchemaError if it does not fit."""
    return _decode_obj(spec(op).request, {} if args is None else args)


def encode_request(op: str, req: Any) -> dict[str, Any]:
    """A request (dataclass or dict) to its JSON object, validated; only the keys given are sent."""
    sp = spec(op)
    if isinstance(req, sp.request):
        return to_dict(req)
    args = {} if req is None else req
    _decode_obj(sp.request, args)
    return dict(args)


def decode_reply(op: str, obj: Any) -> Any:
    """The reply of ``op`` from what the guest answered; SchemaError if it does not fit."""
    return _decode_obj(spec(op).reply, obj)


def encode_reply(op: str, reply: Any) -> dict[str, Any]:
    """A reply (dataclass or dict) to its JSON object, validated."""
    sp = spec(op)
    if not isinstance(reply, sp.reply):
        reply = _decode_obj(sp.reply, reply)
    return to_dict(reply)


def check_payload(op: str, payload: bytes, direction: str) -> None:
    sp = spec(op)
    limit = sp.payload_in if direction == "request" else sp.payload_out
    if len(payload) > limit:
        raise SchemaError("payload", f"{len(payload)} bytes exceed {limit} for {sp.name}")


def error(code: str, message: str) -> dict[str, str]:
    """The ``error`` object of a failed response."""
    if code not in ERROR_CODES:
        code = INTERNAL
    return {"code": code, "message": str(message)[:MAX_MESSAGE]}


# -- shared shapes -----------------------------------------------------------------------------
NAME = 64  # a container name
MID = 128  # a migration id
PATH = 1024
MiB = 1 << 20
BLOCKS = 1 << 24  # ssdcache blocks
EPOCH = 1 << 62
CPU = {'min': 0, 'max': 4095}


@dataclass
class Empty:
    """No arguments."""


@dataclass
class Open:
    """Any JSON object (bounded): the part validates it."""

    EXTRA: ClassVar[bool] = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Named:
    name: str = s(NAME)


# core
@dataclass
class PingReq:
    echo: Json | None = js(4096, None)


@dataclass
class PingReply:
    pong: bool
    echo: Json | None = js(4096, None)
    payload_len: int = i(0, MAX_BINARY, 0)
    time: float = num(0, 1e12, 0.0)


@dataclass
class StatsReply:
    """The guest's /proc view; ``meminfo`` and ``cpus`` are what the core reads."""

    EXTRA: ClassVar[bool] = True
    meminfo: dict[str, int] = lst(512, {})
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OnlineReq:
    target: int | None = i(1, 4096, None)


@dataclass
class OnlineReply:
    EXTRA: ClassVar[bool] = True
    online: list[int] = lst(4096, item=CPU)
    onlined: list[int] = lst(4096, [], item=CPU)
    offlined: list[int] = lst(4096, [], item=CPU)
    present: list[int] = lst(4096, [], item=CPU)
    extra: dict[str, Any] = field(default_factory=dict)


# memory
@dataclass
class WssReq:
    reset: bool = True


@dataclass
class WssReply:
    EXTRA: ClassVar[bool] = True
    referenced_bytes: int = i(0, 1 << 50)
    resident_bytes: int = i(0, 1 << 50, 0)
    mem_total_bytes: int = i(0, 1 << 50, 0)
    processes: int = i(0, 1 << 22, 0)
    interval_s: float | None = num(0, 1e9, None)
    active_fraction: float | None = num(0, 1e6, None)
    active_fraction_of_resident: float | None = num(0, 1e6, None)
    extra: dict[str, Any] = field(default_factory=dict)


MAX_RELEASE_MIB = 1 << 20


@dataclass
class BalloonPrepareReq:
    release_mib: int = i(0, MAX_RELEASE_MIB)


@dataclass
class BalloonPrepareReply:
    requested_bytes: int = i(0, 1 << 50)
    freed_bytes: int = i(0, 1 << 50)
    mem_available_bytes: int = i(0, 1 << 50, 0)
    steps: list[Json] = lst(16, [], item={'max': 64 << 10})


# cpu (containers)
@dataclass
class ContainerCreateReq:
    name: str = s(NAME)
    command: list[str] = lst(256, item={'max_len': MAX_STR})
    limits: Json | None = js(16 << 10, None)
    hostname: str | None = s(NAME, None)
    netns: bool = False
    start: bool = True


@dataclass
class ContainerSetReq:
    name: str = s(NAME)
    limits: Json = js(16 << 10)


@dataclass
class ContainerModeReq:
    nesting_aware: bool | None = None
    cpu_strategy: str | None = s(32, None)


@dataclass
class RebalanceReq:
    reason: str = s(16, "request", choices=("request", "cpus"))


@dataclass
class ReclaimReq:
    bytes: int = i(0, 1 << 50)
    use_free: bool = True
    reserve: int = i(0, 1 << 50, 32 << 20)
    hold: bool = True


# ssdcache
@dataclass
class CacheConfigReq:
    size_blocks: int = i(1, BLOCKS)
    backed: Json = js(1 << 20, [])
    vm: str = s(256, "")
    epoch: int = i(0, EPOCH, 0)


@dataclass
class CacheLbnsReq:
    lbns: Json = js(1 << 20, [])
    epoch: int | None = i(0, EPOCH, None)


@dataclass
class CacheReleaseReq:
    count: int = i(0, BLOCKS)
    epoch: int | None = i(0, EPOCH, None)


@dataclass
class CacheReleaseReply:
    EXTRA: ClassVar[bool] = True
    lbns: list[list[int]] = lst(1 << 16, item={})
    epoch: int = i(0, EPOCH, 0)
    backed_blocks: int = i(0, BLOCKS, 0)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheColdestReq:
    count: int = i(0, BLOCKS, 16)


@dataclass
class CacheColdestReply:
    lbns: list[int] = lst(BLOCKS, item={'min': 0, 'max': BLOCKS})


@dataclass
class WorkloadStartReq:
    working_set_mib: int = i(1, 1 << 16, 32)
    seconds: float = num(1e-3, 86400, 3600)
    io_kib: int = i(4, 1024, 4)
    seed: int = i(0, 1 << 31, 1)
    verify: bool = False


@dataclass
class TwoLevelSplitReq:
    share: dict[str, int] = lst(4, {}, item={'min': 0, 'max': 1 << 50})
    containers: dict[str, Json] = lst(256, {}, item={'max': 4096})


@dataclass
class TwoLevelSplitReply:
    EXTRA: ClassVar[bool] = True
    split: dict[str, Json] = lst(256, item={'max': 4096})
    ssd_capacity: int = i(0, 1 << 50, 0)
    extra: dict[str, Any] = field(default_factory=dict)


# migration
@dataclass
class MigNameReq:
    name: str = s(NAME)
    mid: str | None = s(MID, None)


@dataclass
class MigPredumpReq:
    name: str = s(NAME)
    mid: str = s(MID)
    n: int = i(1, 16, 1)


@dataclass
class MigDumpReq:
    name: str = s(NAME)
    mid: str = s(MID)
    parent: int = i(0, 16, 0)


@dataclass
class MigMidReq:
    mid: str = s(MID)


@dataclass
class MigMidNameReq:
    mid: str = s(MID)
    name: str | None = s(NAME, None)


@dataclass
class MigManifestReq:
    mid: str = s(MID)
    paths: list[str] | None = lst(4096, None, item={'max_len': PATH})


@dataclass
class MigCreditReq:
    mid: str = s(MID)
    acked: int = i(0, 1 << 40, 0)
    bw: float | None = num(1.0, 1e12, None)
    stop: bool = False
    taken: int = i(0, 1 << 40, 0)  # shm channel: chunks the relay took out of the source's region


@dataclass
class MigSendReq:
    mid: str = s(MID)
    paths: list[str] = lst(4096, item={'max_len': PATH})
    mode: str = s(32, "adaptive")
    chunk: int = i(0, MAX_BINARY, 1 << 20)
    window: int = i(0, 1 << 30, 4 << 20)
    rate: float = num(1e3, 1e12, 8e6)
    bw: float = num(1.0, 1e12, 8e6)
    shm: Json | None = js(1024, None)  # the shm channel's region {dev, size, token}; None: serial frames


@dataclass
class MigRecvReq:
    mid: str = s(MID)
    path: str = s(PATH)
    crc: int | None = i(0, 0xFFFFFFFF, None)  # None: an shm chunk, checked with its file by mig-verify
    off: int = i(0, 1 << 40, 0)
    len: int = i(0, MAX_BINARY, 0)
    shm: Json | None = js(1024, None)  # the chunk lies in this guest's region at ``at``
    at: int | None = i(0, 1 << 30, None)


@dataclass
class MigShmReq:
    mid: str = s(MID)
    shm: Json | None = js(1024, None)
    release: bool = False
    wait: float = num(0.0, 120.0, 20.0)


@dataclass
class MigAddrReq:
    ip: str = s(15)
    up: bool = False
    fenced: bool = False


@dataclass
class MigVerifyReq:
    mid: str = s(MID)
    files: Json = js(4 << 20)


@dataclass
class MigRestoreReq:
    mid: str = s(MID)
    record: Json = js(64 << 10)
    lazy: bool = False  # memory after the tasks run: criu lazy-pages through userfaultfd


@dataclass
class MigNetRecvReq:
    mid: str = s(MID)
    files: Json = js(4 << 20)
    port: int = i(1024, 65535, 47800)


@dataclass
class MigNetSendReq:
    mid: str = s(MID)
    host: str = s(256)
    paths: list[str] = lst(4096, [], item={'max_len': PATH})
    port: int = i(1024, 65535, 47800)


# paging
@dataclass
class ColdReply:
    page_size: int = i(512, 1 << 30)
    pfns: int = i(0, 1 << 50)
    free: list[list[int]] = lst(1 << 16, item={})
    cold: list[list[int]] = lst(1 << 16, item={})
    truncated: bool = False
    free_pages: int = i(0, 1 << 50, 0)
    cold_pages: int = i(0, 1 << 50, 0)


def _d(name: str, req: type, reply: type, *aliases: str, payload_in: int = 0, doc: str = "") -> None:
    declare(OpSpec(name, req, reply, aliases, payload_in=payload_in, doc=doc))


_d("core.ping", PingReq, PingReply, "ping", payload_in=MAX_BINARY, doc="liveness; echoes and counts a payload")
_d("core.stats", Empty, StatsReply, "stats", doc="the guest's memory, CPU and PSI figures")
_d("cpu.online", OnlineReq, OnlineReply, "online-cpus", doc="online vCPUs (all present, or up to target)")
_d("memory.wss-sample", WssReq, WssReply, "wss-sample", doc="referenced vs resident memory since the last reset")
_d("memory.balloon-prepare", BalloonPrepareReq, BalloonPrepareReply, "balloon-prepare",
   doc="free release_mib in the guest's own order before the balloon inflates")
for _verb, _req, _doc in (
    ("create", ContainerCreateReq, "create (and start) a container"),
    ("list", Empty, "the containers"),
    ("show", Named, "one container"),
    ("start", Named, "start a container"),
    ("stop", Named, "stop a container"),
    ("destroy", Named, "remove a container"),
    ("set", ContainerSetReq, "change a container's limits"),
    ("logs", Named, "a container's output"),
    ("mode", ContainerModeReq, "nesting-aware or agnostic management"),
    ("rebalance", RebalanceReq, "apply the CPU ratio plan now"),
    ("reclaim", ReclaimReq, "free memory from containers by their shares"),
    ("release", Empty, "lift reclaim holds"),
    ("protect", Empty, "refresh no-reclaim containers' memory.min"),
):
    _d(f"cpu.container-{_verb}", _req, Open, f"ct-{_verb}", doc=_doc)
for _verb, _req, _reply, _doc in (
    ("config", CacheConfigReq, Open, "the guest's cache geometry and backed blocks"),
    ("grant", CacheLbnsReq, Open, "blocks the host lends"),
    ("revoke", CacheLbnsReq, Open, "blocks the host takes back"),
    ("release", CacheReleaseReq, CacheReleaseReply, "the guest picks count blocks to give back"),
    ("coldest", CacheColdestReq, CacheColdestReply, "the guest's coldest blocks"),
    ("status", Empty, Open, "cache and workload counters"),
    ("workload-start", WorkloadStartReq, Open, "start the in-guest cache workload"),
    ("workload-stop", Empty, Open, "stop it"),
):
    _d(f"ssdcache.{_verb}", _req, _reply, f"ssdcache-{_verb}", doc=_doc)
_d("ssdcache.twolevel-split", TwoLevelSplitReq, TwoLevelSplitReply, "doubledecker-split",
   doc="split the VM's share among its containers (DoubleDecker's VM level)")
_d("ssdcache.twolevel-status", Empty, Open, "doubledecker-status", doc="the in-guest two-level store")
for _verb, _req, _doc, _pin in (
    ("check", MigNameReq, "can this container be migrated", 0),
    ("predump", MigPredumpReq, "CRIU pre-dump (iterative)", 0),
    ("dump", MigDumpReq, "CRIU dump (freezes)", 0),
    ("manifest", MigManifestReq, "the image files with sizes and hashes", 0),
    ("credit", MigCreditReq, "flow-control credit for a send", 0),
    ("send", MigSendReq, "stream image files as events", 0),
    ("recv", MigRecvReq, "write one chunk (binary payload)", MAX_BINARY),
    ("verify", MigVerifyReq, "check received files against the manifest", 0),
    ("prepare", MigMidReq, "warm up CRIU on the destination before the freeze", 0),
    ("restore", MigRestoreReq, "recreate the container and CRIU-restore it", 0),
    ("status", MigMidNameReq, "a migration's state in this guest", 0),
    ("resume", MigNameReq, "thaw the source container", 0),
    ("abort", MigMidNameReq, "stop and clean up", 0),
    ("finish", MigMidNameReq, "destroy the source container", 0),
    ("cleanup", MigMidReq, "remove a migration's files", 0),
    ("net-setup", Empty, "bring the migration link up", 0),
    ("net-recv", MigNetRecvReq, "receive files over the migration network", 0),
    ("net-send", MigNetSendReq, "send files over the migration network", 0),
    ("addr", MigAddrReq, "add or remove the container's own address on the link", 0),
    ("shm", MigShmReq, "map (or let go of) the migration's shared region (the relay's shm channel)", 0),
):
    _d(f"migration.{_verb}", _req, Open, f"mig-{_verb}", payload_in=_pin, doc=_doc)
_d("paging.cold", Empty, ColdReply, "paging-cold", doc="runs of free and cold guest frames")


# -- documentation -----------------------------------------------------------------------------
def _type_name(tp: Any, meta: dict[str, Any]) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _type_name(inner, meta) + "?"
    if tp is Json:
        return f"json≤{meta.get('max', MAX_JSON_CHARS)}"
    if tp in (int, float) and "min" in meta:
        return f"{tp.__name__} {meta['min']}..{meta['max']}"
    if tp is str:
        ch = meta.get("choices")
        return " or ".join(ch) if ch else f"str≤{meta.get('max_len') or MAX_STR}"
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"[{_type_name(item, meta.get('item') or {})}]≤{meta.get('max_len') or MAX_LIST}"
    if origin is dict:
        _, val = typing.get_args(tp)
        return f"{{str: {_type_name(val, meta.get('item') or {})}}}≤{meta.get('max_len') or MAX_LIST}"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type) -> str:
    """One line: ``name: type`` for each field (``=`` default when optional; ``…`` when open)."""
    parts = []
    for f, tp in _fields_of(cls):
        opt = f.default is not MISSING or f.default_factory is not MISSING
        parts.append(f"{f.name}{'?' if opt else ''}: {_type_name(tp, dict(f.metadata))}")
    if getattr(cls, "EXTRA", False):
        parts.append("…")
    return ", ".join(parts) or "—"


def markdown_table() -> str:
    """The op table of docs/protocol.md (tests/unit/test_ops_schema.py checks the doc has it)."""
    rows = ["| op | old name (alias) | request | reply | payload in | what |", "|---|---|---|---|---|---|"]
    for name in sorted(OPS):
        sp = OPS[name]
        rows.append(
            f"| `{name}` | {', '.join(f'`{a}`' for a in sp.aliases)} | {describe(sp.request)} | "
            f"{describe(sp.reply)} | {sp.payload_in or '—'} | {sp.doc} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
