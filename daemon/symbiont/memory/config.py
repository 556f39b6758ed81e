"""Config section ``memory:`` of the memory part (discovered by :mod:`symbiont.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from symbiont.config import _check


@dataclass
class MemoryConfig:
    """The ESX-style memory policy (part 'memory'); off unless enabled."""

    enabled: bool = False  # run the policy every control period (else balloons move on API calls only)
    budget_mib: int = 0  # memory all VMs may use together; 0: host MemTotal - reserve_mib
    reserve_mib: int = 2048  # kept for the host when budget_mib is 0
    free_target_mib: int = 0  # keep this much of the budget free
    max_step_mib: int = 128  # largest balloon change per VM per period
    chunk_mib: int = 16  # balloon changes smaller than this are not applied (no churn)
    tax_rate: float = 0.75  # default idle-memory tax τ (per VM: policy memory.tax_rate)
    safety_margin_mib: int = 64  # never balloon a guest below its used memory + this
    pressure_grant_mib: int = 64  # what a VM under pressure asks for per period
    psi_threshold: float = 10.0  # guest PSI memory some avg10 above this is pressure
    min_available_fraction: float = 0.10  # guest MemAvailable/MemTotal below this is pressure
    prepare_timeout_s: float = 10.0  # how long the guest may take to free memory before inflation

    def validate(self, key: str) -> None:
        _check(self.budget_mib >= 0, f"{key}.budget_mib", "must be >= 0 (0: derive from host memory)")
        _check(self.reserve_mib >= 0, f"{key}.reserve_mib", "must be >= 0")
        _check(self.free_target_mib >= 0, f"{key}.free_target_mib", "must be >= 0")
        _check(1 <= self.max_step_mib <= 1 << 20, f"{key}.max_step_mib", "must be between 1 and 1048576")
        _check(1 <= self.chunk_mib <= self.max_step_mib, f"{key}.chunk_mib", "must be between 1 and max_step_mib")
        _check(0.0 <= self.tax_rate < 1.0, f"{key}.tax_rate", "must be in [0, 1)")
        _check(0 <= self.safety_margin_mib <= 1 << 20, f"{key}.safety_margin_mib", "must be >= 0")
        _check(0 <= self.pressure_grant_mib <= 1 << 20, f"{key}.pressure_grant_mib", "must be >= 0")
        _check(0.0 <= self.psi_threshold <= 100.0, f"{key}.psi_threshold", "must be between 0 and 100")
        _check(0.0 <= self.min_available_fraction < 1.0, f"{key}.min_available_fraction", "must be in [0, 1)")
        _check(0.1 <= self.prepare_timeout_s <= 600, f"{key}.prepare_timeout_s", "must be between 0.1 and 600")


CONFIG = MemoryConfig
