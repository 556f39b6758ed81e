"""The agent op schema and its codec (issue 14 item 4): every op the agent serves is declared
once, valid values round-trip, and wrong types, out-of-range values and unknown keys are
refused with an error naming the field."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symbiont_agent import agent
from symbiont_agent import ops_schema as schema
from symbiont_agent import protocol as proto

agent.load_op_modules()
CANONICAL = sorted(schema.OPS)
PARTS = ("core", "memory", "cpu", "ssdcache", "migration", "paging", "gpu")


def test_every_op_the_agent_serves_is_declared_and_every_declared_op_is_served() -> None:
    served = set(agent.OPS)
    assert served - set(schema.ALIASES) == set(), "ops registered with @op but not declared in ops_schema"
    for name, sp in schema.OPS.items():
        assert name in served and all(a in served for a in sp.aliases), name


def test_the_agent_tree_registers_no_name_outside_the_schema() -> None:
    """A static check too: an ``@op("x")`` in any agent module must be a declared name."""
    root = Path(agent.__file__).parent
    for f in root.glob("*.py"):
        for name in re.findall(r'@op\("([^"]+)"', f.read_text()):
            assert name in schema.ALIASES, f"{f.name}: @op({name!r}) is not in ops_schema"


def test_op_names_have_one_style_and_old_names_are_aliases() -> None:
    for name, sp in schema.OPS.items():
        part, _, verb = name.partition(".")
        assert part in PARTS and re.fullmatch(r"[a-z][a-z0-9-]*", verb), name
        assert sp.cap == name
        for a in sp.aliases:
            assert schema.canonical(a) == name
    assert schema.canonical("doubledecker-split") == "ssdcache.twolevel-split"
    assert schema.canonical("mig-dump") == "migration.dump"
    assert schema.canonical("ct-create") == "cpu.container-create"
    assert schema.canonical("stats") == "core.stats"
    with pytest.raises(KeyError):
        schema.canonical("format-disk")


def test_hello_caps_list_canonical_names_and_aliases_within_the_protocol_bound() -> None:
    caps = agent.hello_frame()["caps"]
    assert {"core.stats", "stats", "memory.balloon-prepare", "balloon-prepare", "migration.dump"} <= set(caps)
    assert len(caps) <= proto.MAX_CAPS and all(len(c) <= proto.MAX_SHORT for c in caps)
    proto.validate_hello(agent.hello_frame())


# -- strategies built from the schema itself ---------------------------------------------------
def _json_values() -> st.SearchStrategy[Any]:
    leaf = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8)
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=8)


def strategy(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return st.none() | strategy(inner, meta)
    if tp is schema.Json or tp is Any:
        return _json_values()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(meta.get("min", -(2**63)), meta.get("max", 2**63 - 1))
    if tp is float:
        return st.floats(meta.get("min", -1e18), meta.get("max", 1e18), allow_nan=False, allow_infinity=False)
    if tp is str:
        if meta.get("choices"):
            return st.sampled_from(meta["choices"])
        return st.text(max_size=min(meta.get("max_len") or 20, 20))
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(strategy(item, meta.get("item") or {}), max_size=min(meta.get("max_len") or 4, 4))
    if origin is dict:
        _, val = typing.get_args(tp)
        return st.dictionaries(st.text(max_size=6), strategy(val, meta.get("item") or {}),
                               max_size=min(meta.get("max_len") or 3, 3))
    if dataclasses.is_dataclass(tp):
        return objects(tp)
    raise AssertionError(tp)


def fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls, globalns=vars(schema))
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.name != "extra"]


def required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@st.composite
def objects(draw: st.DrawFn, cls: type) -> dict[str, Any]:
    out = {}
    for f, tp in fields(cls):
        if required(f) or draw(st.booleans()):
            out[f.name] = draw(strategy(tp, dict(f.metadata)))
    if getattr(cls, "EXTRA", False):
        known = {f.name for f in dataclasses.fields(cls)}
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in known),
                                     _json_values(), max_size=3))
        out.update(extra)
    return out


@pytest.mark.parametrize("op", CANONICAL)
def test_valid_requests_and_replies_round_trip(op: str) -> None:
    sp = schema.OPS[op]

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(req=objects(sp.request), rep=objects(sp.reply))
    def check(req: dict[str, Any], rep: dict[str, Any]) -> None:
        wire = json.loads(json.dumps(schema.encode_request(op, req)))  # what crosses the channel
        decoded = schema.decode_request(op, wire)
        assert isinstance(decoded, sp.request)
        assert schema.decode_request(op, schema.to_dict(decoded)) == decoded
        for alias in sp.aliases:
            assert schema.decode_request(alias, wire) == decoded
        answer = json.loads(json.dumps(schema.encode_reply(op, rep)))
        got = schema.decode_reply(op, answer)
        assert isinstance(got, sp.reply)
        assert schema.decode_reply(op, schema.encode_reply(op, got)) == got
        back = schema.to_dict(got)
        assert all(back[k] == v for k, v in rep.items())  # nothing given is lost or changed

    check()


def _wrong_type(tp: Any) -> list[Any]:
    """Values of the wrong JSON type for ``tp`` (True is not an int, 1 is not a bool)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if tp is schema.Json:
        return [float("nan")]
    if tp is bool:
        return [1, "true"]
    if tp is int:
        return [True, 1.5, "3"]
    if tp is float:
        return [False, "1.0", float("inf")]
    if tp is str:
        return [5, [], {}]
    if origin in (list, dict):
        return ["x", 3] + ([{}] if origin is list else [[]])
    return ["x"]


def _out_of_range(tp: Any, meta: dict[str, Any]) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if tp in (int, float) and "max" in meta:
        return [meta["max"] + 1, meta["min"] - 1]
    if tp is str:
        return ["x" * ((meta.get("max_len") or schema.MAX_STR) + 1)]
    if origin is list:
        return [[None] * ((meta.get("max_len") or schema.MAX_LIST) + 1)]
    if tp is schema.Json:
        return [["x" * 64] * (meta.get("max", schema.MAX_JSON_CHARS) // 64 + 1)]
    return []


CASES = [(op, kind, cls) for op in CANONICAL for kind, cls in
         (("request", schema.OPS[op].request), ("reply", schema.OPS[op].reply))]


@pytest.mark.parametrize(("op", "kind", "cls"), CASES, ids=[f"{o}-{k}" for o, k, _ in CASES])
def test_wrong_types_out_of_range_and_unknown_keys_are_refused_naming_the_field(op: str, kind: str, cls: type) -> None:
    decode = schema.decode_request if kind == "request" else schema.decode_reply
    base = _minimal(cls)
    decode(op, base)  # the minimal valid object passes
    for f, tp in fields(cls):
        for bad in _wrong_type(tp) + _out_of_range(tp, dict(f.metadata)):
            with pytest.raises(schema.SchemaError) as ei:
                decode(op, {**base, f.name: bad})
            assert ei.value.field.split("[")[0].split(".")[0] == f.name, (f.name, bad, ei.value)
        if required(f):
            with pytest.raises(schema.SchemaError, match=f"^{f.name}: required"):
                decode(op, {k: v for k, v in base.items() if k != f.name})
    if not getattr(cls, "EXTRA", False):
        with pytest.raises(schema.SchemaError) as ei:
            decode(op, {**base, "rm_rf": True})
        assert ei.value.field == "rm_rf" and "unknown field" in str(ei.value)
    for not_an_object in ([], "x", 3, *([None] if kind == "reply" else [])):
        with pytest.raises(schema.SchemaError):
            decode(op, not_an_object)


def _minimal(cls: type) -> dict[str, Any]:
    """The smallest valid object: each required field at a valid value."""
    out: dict[str, Any] = {}
    for f, tp in fields(cls):
        if not required(f):
            continue
        meta = dict(f.metadata)
        origin = typing.get_origin(tp)
        if tp is int or tp is float:
            out[f.name] = meta.get("min", 0)
        elif tp is str:
            out[f.name] = (meta.get("choices") or ["a"])[0]
        elif tp is bool:
            out[f.name] = False
        elif origin is list:
            out[f.name] = []
        elif origin is dict:
            out[f.name] = {}
        else:
            out[f.name] = {}
    return out


def test_nesting_and_payload_bounds() -> None:
    deep: Any = 1
    for _ in range(schema.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(schema.SchemaError, match="echo: nests deeper"):
        schema.decode_request("core.ping", {"echo": deep})
    schema.check_payload("migration.recv", b"x" * 1024, "request")
    with pytest.raises(schema.SchemaError, match="payload"):
        schema.check_payload("core.stats", b"x", "request")
    with pytest.raises(schema.SchemaError, match="payload"):
        schema.check_payload("core.ping", b"x", "reply")


def test_error_objects_carry_a_known_code() -> None:
    assert schema.error("not_found", "x") == {"code": "not_found", "message": "x"}
    assert schema.error("made-up", "x")["code"] == "internal"
    assert len(schema.error("invalid", "m" * 10_000)["message"]) == schema.MAX_MESSAGE


def test_docs_protocol_lists_every_op_as_the_schema_declares_it() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    start = doc.index("-->\n", doc.index("<!-- ops-table")) + 4
    table = doc[start:doc.index("<!-- /ops-table -->")]
    assert table == schema.markdown_table(), "docs/protocol.md is stale: python3 -m symbiont_agent.ops_schema"
    for name, sp in schema.OPS.items():
        assert f"| `{name}` |" in table and all(f"`{a}`" in table for a in sp.aliases)
    for code in schema.ERROR_CODES:
        assert f"| `{code}` |" in doc
