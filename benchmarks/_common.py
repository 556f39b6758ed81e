"""Helpers shared by the foundation benchmarks (repo root on sys.path for tests.host.fakeguest)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary_ms(values: list[float]) -> str:
    return (f"p50 {1000 * statistics.median(values):.2f} ms  p99 {1000 * pct(values, 0.99):.2f} ms  "
            f"mean {1000 * statistics.fmean(values):.2f} ms")
