"""The dedup part's settings: the host-wide KSM policy (:class:`Mode`) and the per-VM options.

Nothing is tuned unless asked (opt-in): the policy is ``off`` until either

* the API sets one (``PUT /v1/dedup/policy``; persisted in sqlite, so a restarted daemon resumes
  it), or
* a registered VM asks for one in its registration: ``extra: {dedup: {policy: hint}}`` (the API's
  setting wins; among VMs, the first by name).

While ``off`` the part only *reads*: KSM counters, ksmd's CPU, each VM's merged pages, whether
its RAM is mergeable. Per-VM options, in the registration's ``extra.dedup``:

``cross_vm`` (default true)
    false: the VM opts out of cross-VM sharing (see :mod:`symbiont.dedup.tenancy` for what is
    enforced and how);
``scan`` (default true)
    whether the hashing engine reads this VM's RAM for the sharing estimate;
``policy`` (optional)
    one of ``stock``, ``ksmtuned``, ``hint``, ``fixed``, ``advisor``, ``off``: requests a host-wide policy.

Every knob change goes through the daemon's knob ledger (original saved first) and is restored
when the policy goes back to ``off``, when the daemon stops, and at the next start after a crash:
see :mod:`symbiont.dedup.part`, the part itself. This module holds the policy's settings.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from symbiont.dedup.backends import BACKENDS
from symbiont.dedup.policy import (
    POLICIES,
    AdvisorParams,
    HintParams,
    KsmtunedParams,
    params_from,
)

log = logging.getLogger(__name__)

SETTINGS_SCHEMA = "CREATE TABLE IF NOT EXISTS dedup_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
PART = "dedup"


class ModeError(ValueError):
    """An invalid policy request (the message names the field)."""


@dataclass
class Mode:
    """The host-wide KSM policy and its parameters."""

    policy: str = "off"
    source: str = "default"  # api | registration:<vm> | default
    pages_to_scan: int | None = None  # fixed
    sleep_millisecs: int | None = None  # fixed
    max_page_sharing: int | None = None  # set while active, restored after
    use_zero_pages: int | None = None
    hint: dict[str, Any] = field(default_factory=dict)
    ksmtuned: dict[str, Any] = field(default_factory=dict)
    advisor: dict[str, Any] = field(default_factory=dict)  # AdvisorParams overrides (policy advisor)
    backend: str = "auto"
    gpu_type: str = "A100"
    scan_interval_s: float = 30.0
    unmerge_on_stop: bool = False

    def validate(self) -> Mode:
        if self.policy not in POLICIES:
            raise ModeError(f"policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.policy == "fixed" and (self.pages_to_scan is None or self.sleep_millisecs is None):
            raise ModeError("policy fixed needs pages_to_scan and sleep_millisecs")
        if self.pages_to_scan is not None and not 1 <= self.pages_to_scan <= 1_000_000:
            raise ModeError("pages_to_scan: must be between 1 and 1000000")
        if self.sleep_millisecs is not None and not 1 <= self.sleep_millisecs <= 600_000:
            raise ModeError("sleep_millisecs: must be between 1 and 600000")
        if self.max_page_sharing is not None and not 2 <= self.max_page_sharing <= 1 << 20:
            raise ModeError("max_page_sharing: must be between 2 and 1048576")
        if self.use_zero_pages not in (None, 0, 1):
            raise ModeError("use_zero_pages: must be 0 or 1")
        if self.backend not in BACKENDS and self.backend not in ("sim", "simulated"):
            raise ModeError(f"backend: must be one of {', '.join(BACKENDS)}")
        if not 1.0 <= self.scan_interval_s <= 86400:
            raise ModeError("scan_interval_s: must be between 1 and 86400")
        for name, cls, d in (("hint", HintParams, self.hint), ("ksmtuned", KsmtunedParams, self.ksmtuned),
                             ("advisor", AdvisorParams, self.advisor)):  # fmt: skip
            unknown = set(d) - {f.name for f in fields(cls)} - {"unknown"}
            if unknown:
                raise ModeError(f"{name}: unknown parameter(s) {', '.join(sorted(unknown))}")
            try:
                params_from(d, cls)
            except (TypeError, ValueError) as exc:
                raise ModeError(f"{name}: {exc}") from None
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mode:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModeError(f"unknown field(s): {', '.join(sorted(unknown))}")
        return cls(**d).validate()


@dataclass(frozen=True)
class VmSettings:
    """A VM's dedup options from its registration (``policy["extra"]["dedup"]``)."""

    cross_vm: bool = True
    scan: bool = True
    policy: str | None = None
    errors: tuple[str, ...] = ()


def vm_settings(policy: dict[str, Any] | None) -> VmSettings:
    """Parse and validate a registration's dedup options; bad values are ignored and reported."""
    raw = ((policy or {}).get("extra") or {}).get(PART)
    if raw is None:
        return VmSettings()
    if not isinstance(raw, dict):
        return VmSettings(errors=(f"extra.dedup must be a mapping, got {type(raw).__name__}",))
    errors: list[str] = []
    out: dict[str, Any] = {}
    for key, val in raw.items():
        if key in ("cross_vm", "scan"):
            if isinstance(val, bool):
                out[key] = val
            else:
                errors.append(f"extra.dedup.{key} must be true or false")
        elif key == "policy":
            if val in POLICIES:
                out[key] = val
            else:
                errors.append(f"extra.dedup.policy must be one of {', '.join(POLICIES)}")
        else:
            errors.append(f"extra.dedup.{key}: unknown option")
    return VmSettings(**out, errors=tuple(errors))


__all__ = ["SETTINGS_SCHEMA", "Mode", "ModeError", "VmSettings", "vm_settings"]
