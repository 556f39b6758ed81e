"""Prometheus metrics of the GPU part, on the default ``prometheus_client.REGISTRY``.

The daemon serves ``/metrics`` from the default registry, so defining the objects here is all
it takes. Creation is idempotent (a re-import, e.g. in tests, reuses the registered objects
instead of failing with "Duplicated timeseries").
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram


def _get_or_create(cls: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
    names = getattr(REGISTRY, "_names_to_collectors", {})
    for key in (name, f"{name}_total", f"{name}_bucket"):
        if key in names:
            return names[key]
    return cls(name, doc, labels, **kw)


DEVICES = _get_or_create(Gauge, "symbiont_gpu_devices", "GPUs registered, by backend and type", ("backend", "type"))
CLIENT_SM_SHARE = _get_or_create(
    Gauge, "symbiont_gpu_client_sm_share", "Effective SM share of an endpoint client", ("client",)
)
CLIENT_MEMORY = _get_or_create(
    Gauge, "symbiont_gpu_client_memory_bytes", "Device memory allocated by an endpoint client", ("client",)
)
CLIENT_MEMORY_QUOTA = _get_or_create(
    Gauge, "symbiont_gpu_client_memory_quota_bytes", "Device memory quota of an endpoint client", ("client",)
)
ENDPOINT_REQUESTS = _get_or_create(
    Counter, "symbiont_gpu_endpoint_requests", "Endpoint requests, by operation and outcome", ("op", "outcome")
)
VERTICAL_SCALE_SECONDS = _get_or_create(
    Histogram,
    "symbiont_gpu_vertical_scale_seconds",
    "Time for a share change to take effect on the device (control path + device)",
    buckets=(1e-5, 1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
)
MIGRATION_DOWNTIME_SECONDS = _get_or_create(
    Histogram,
    "symbiont_gpu_migration_downtime_seconds",
    "Downtime of a horizontal scaling (endpoint migration) on the device clock",
    buckets=(1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FAAS_TASKS = _get_or_create(
    Counter, "symbiont_gpu_faas_tasks", "FaaS tasks by scheduler and outcome (met, missed, dropped)",
    ("scheduler", "outcome"),
)  # fmt: skip
FAAS_WASTED_GFLOP = _get_or_create(
    Counter, "symbiont_gpu_faas_wasted_gflop", "GPU work spent on tasks that missed their deadline", ("scheduler",)
)
ENDPOINT_CONNECTIONS = _get_or_create(
    Gauge, "symbiont_gpu_endpoint_connections", "Open connections to the daemon's GPU endpoint socket"
)
CLIENTS = _get_or_create(Gauge, "symbiont_gpu_clients", "Endpoint clients with quotas, by GPU", ("gpu",))
WORKLOADS = _get_or_create(Gauge, "symbiont_gpu_workloads", "FaaS workloads kept in sqlite, by status", ("status",))
