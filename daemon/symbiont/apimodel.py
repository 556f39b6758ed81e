"""The strict pydantic base of every API body, and bounds for the free-form JSON the API accepts.

Strict because a lax model turns bad input into plausible values (``true`` → 1, ``"1000"`` →
1000, ``false`` → a deflate to 0); ``allow_inf_nan=False`` because NaN and infinities pass
range checks nobody wrote for them. JSON numbers still validate as floats where a float is
expected (an ``int`` for a ``float`` field is accepted in strict mode too).

Free-form JSON (``extra`` of a registration, a plan to execute) is stored and served back, so
its depth and size are bounded on the way in (:func:`bounded_json`), and whatever is read back
from storage is made serialisable on the way out (:func:`json_safe`): one bad row must never
turn a whole list into a 500.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

# pydantic-core refuses to serialise deeper than 255 levels; served objects wrap stored JSON in
# a few levels of their own (a VM view holds the policy, which holds extra, ...).
MAX_DEPTH = 16
MAX_NODES = 10_000
MAX_STR = 64 << 10
SAFE_DEPTH = 64  # what json_safe keeps of data read back from storage


class StrictModel(BaseModel):
    """Base of the API's request bodies: no coercion, no unknown keys, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def check_json(value: Any, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES, max_str: int = MAX_STR) -> Any:
    """Raise ValueError unless ``value`` is plain JSON (str keys, finite numbers) within the bounds.

    Iterative, so that the check itself cannot hit the recursion limit on hostile input."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    nodes = 0
    while stack:
        v, depth, where = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise ValueError(f"more than {max_nodes} values in all")
        if isinstance(v, dict):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels at {where or 'the top'}")
            for k, x in v.items():
                if not isinstance(k, str) or len(k) > 256:
                    raise ValueError(f"keys must be strings of at most 256 characters at {where or 'the top'}")
                stack.append((x, depth + 1, f"{where}.{k}" if where else k))
        elif isinstance(v, list):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels at {where or 'the top'}")
            stack.extend((x, depth + 1, f"{where}[{i}]") for i, x in enumerate(v))
        elif isinstance(v, str):
            if len(v) > max_str:
                raise ValueError(f"string longer than {max_str} characters at {where or 'the top'}")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{v} is not a finite number at {where or 'the top'}")
        elif v is not None and not isinstance(v, (bool, int)):
            raise ValueError(f"{type(v).__name__} is not JSON at {where or 'the top'}")
    return value


def bounded_json(max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Callable[[Any], Any]:
    """An ``AfterValidator`` function bounding a free-form JSON field."""
    return lambda v: check_json(v, max_depth, max_nodes)


# A free-form JSON object accepted by the API (nested at most MAX_DEPTH, MAX_NODES values).
JsonObject = Annotated[dict[str, Any], AfterValidator(bounded_json())]


def json_depth_exceeds(text: str, limit: int = SAFE_DEPTH) -> bool:
    """Cheap pre-check on stored JSON text: only text with ``limit`` or more brackets can nest that deep."""
    return text.count("[") + text.count("{") >= limit


def json_safe(value: Any, max_depth: int = SAFE_DEPTH, max_str: int | None = None) -> Any:
    """A copy of ``value`` that always serialises: deeper levels become a marker string,
    non-finite floats become None, keys become strings, anything else its ``repr``."""

    def walk(v: Any, depth: int) -> Any:
        if isinstance(v, (dict, list, tuple)) and depth >= max_depth:
            return f"<truncated: nested deeper than {max_depth} levels>"
        if isinstance(v, dict):
            return {str(k): walk(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, str):
            return v if max_str is None or len(v) <= max_str else v[:max_str] + "…"
        if v is None or isinstance(v, (bool, int)):
            return v
        r = repr(v)
        return r if max_str is None or len(r) <= max_str else r[:max_str] + "…"

    return walk(value, 0)
