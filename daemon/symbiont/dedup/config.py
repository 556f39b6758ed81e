"""Config section ``dedup:`` of the dedup part (discovered by :mod:`symbiont.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from symbiont.config import check
from symbiont.dedup.policy import POLICIES


@dataclass
class DedupConfig:
    """The KSM policy in force when neither the API nor a VM's registration asks for one."""

    policy: str = "off"  # one of off, stock, ksmtuned, hint, fixed, advisor (profile overcommit: hint)

    def validate(self, key: str) -> None:
        check(self.policy in POLICIES, f"{key}.policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")


CONFIG = DedupConfig
