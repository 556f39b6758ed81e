"""The migration API's request model: bad input is refused before anything reaches a guest."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from symbiont.migration.api import MigrationSpec


def test_defaults_and_limits() -> None:
    s = MigrationSpec(vm="vm1", ct="web", to="vm2")
    assert (s.path, s.rate, s.predumps, s.fault, s.ip) == ("relay", "adaptive", 4, None, None)
    assert (s.chunk_kib, s.window_kib, s.converge_kib) == (4096, 16384, 1024)
    assert MigrationSpec(vm="vm1", ct="web", to="vm2", ip="10.211.200.1").ip == "10.211.200.1"
    for bad in (
        {"path": "carrier-pigeon"}, {"rate": "fast"}, {"predumps": -1}, {"predumps": 9}, {"window_kib": 1},
        {"chunk_kib": 16384}, {"rate_mbps": 0}, {"ip": "10.211.256.1"}, {"ip": "192.168.1.1"}, {"converge_kib": -1}, {"fault": "explode"}, {"ct": "../x"}, {"vm": ""}, {"extra": 1},
    ):  # fmt: skip
        with pytest.raises(ValidationError):
            MigrationSpec(**{"vm": "vm1", "ct": "web", "to": "vm2", **bad})
