"""The migration API's request model: bad input is refused before anything reaches a guest."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from symbiont.migration.api import MigrationSpec


def test_defaults_and_limits() -> None:
    s = MigrationSpec(vm="vm1", ct="web", to="vm2")
    assert (s.path, s.rate, s.predumps, s.fault) == ("relay", "adaptive", 1, None)
    for bad in (
        {"path": "carrier-pigeon"}, {"rate": "fast"}, {"predumps": -1}, {"predumps": 9}, {"window_kib": 1},
        {"chunk_kib": 8192}, {"rate_mbps": 0}, {"fault": "explode"}, {"ct": "../x"}, {"vm": ""}, {"extra": 1},
    ):  # fmt: skip
        with pytest.raises(ValidationError):
            MigrationSpec(**{"vm": "vm1", "ct": "web", "to": "vm2", **bad})
