"""Config section ``gpu:`` of the gpu part (discovered by :mod:`symbiont.config`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from symbiont.config import _check


@dataclass
class GpuConfig:
    """The GPU part (Flyt endpoints, FaaS, dispatch); the endpoint server runs only when enabled."""

    enabled: bool = False  # start the GPU endpoint server with the daemon (else /v1/gpu answers 503)
    backend: str = "auto"  # auto: CuPy when a CUDA device is present, else the simulator; cupy|simulated force one
    # Simulated devices declared at start when the backend is the simulator (ids sim0, sim1, ...):
    # each {type: A100|V100|T4|H100, server: NAME, sharing: spatial|spatial-strict|timeslice-...}.
    # With CuPy every CUDA device is declared instead (ids cuda0, ...). More can be added through the API.
    devices: list[dict[str, Any]] = field(default_factory=lambda: [{"type": "A100"}])
    endpoint_socket: str = ""  # empty: gpu-endpoint.sock next to the API socket
    socket_mode: int = 0o660
    default_sm_share: float = 1.0  # quotas of a client created without them
    default_mem_mib: int = 1024
    seed: int = 0  # the simulator's jitter seed

    def validate(self, key: str) -> None:
        _check(self.backend in ("auto", "simulated", "cupy"), f"{key}.backend", "must be auto, simulated or cupy")
        _check(isinstance(self.devices, list), f"{key}.devices", "must be a list of {type, server, sharing}")
        for i, d in enumerate(self.devices):
            _check(isinstance(d, dict), f"{key}.devices[{i}]", "must be a mapping {type, server, sharing}")
            extra = set(d) - {"type", "server", "sharing"}
            _check(not extra, f"{key}.devices[{i}].{min(extra) if extra else ''}",
                   "unknown key (known: sharing, server, type)")
            _check("type" in d, f"{key}.devices[{i}].type", "is required")
            for k in d:
                _check(isinstance(d[k], str) and bool(d[k]), f"{key}.devices[{i}].{k}", "must be a non-empty string")
        if self.enabled and self.devices:
            from symbiont.gpu.simulated import GPU_TYPES, SCHED_MODES  # imports numpy: only when enabled

            for i, d in enumerate(self.devices):
                _check(d["type"].strip().upper() in GPU_TYPES, f"{key}.devices[{i}].type",
                       f"unknown GPU type {d['type']!r} (known: {', '.join(GPU_TYPES)})")
                _check(d.get("sharing", "spatial") in SCHED_MODES, f"{key}.devices[{i}].sharing",
                       f"must be one of {', '.join(SCHED_MODES)}")
                _check(len(d.get("server", "")) <= 64, f"{key}.devices[{i}].server", "must be at most 64 characters")
        _check(not self.endpoint_socket or os.path.isabs(self.endpoint_socket), f"{key}.endpoint_socket",
               "must be an absolute path (or empty for the default)")
        _check(0 <= self.socket_mode <= 0o777, f"{key}.socket_mode", "must be an octal file mode such as 0660")
        _check(0.0 < self.default_sm_share <= 1.0, f"{key}.default_sm_share", "must be in (0, 1]")
        _check(1 <= self.default_mem_mib <= 1 << 24, f"{key}.default_mem_mib", "must be between 1 and 16777216")


CONFIG = GpuConfig
