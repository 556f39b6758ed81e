"""The ssdcache manager talks to guests through the agent gateway: a guest whose hello lists
the canonical op names (today's image) and one listing the old names are both asked."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from symbiont.gateway import AgentGateway
from symbiont.ssdcache.manager import CacheManager
from symbiont.state import StateStore


class Link:
    """An agent link as the daemon holds it, with the caps a guest's hello listed."""

    def __init__(self, caps: list[str], reply: Any) -> None:
        self.ready, self.caps, self.hello = True, caps, {"caps": caps}
        self.reply = reply
        self.sent: list[str] = []

    async def request(self, op: str, args: dict, payload: bytes = b"", timeout: float | None = None):
        self.sent.append(op)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply, b""


def _status(tmp_path: Path, link: Link) -> tuple[dict | None, bool]:
    async def run() -> tuple[dict | None, bool]:
        mgr = CacheManager(StateStore(":memory:"), tmp_path / "run", agents=AgentGateway({"vm1": link}))
        try:
            return await mgr.guest_status("vm1"), mgr.agents.supports("vm1", "ssdcache-config")
        finally:
            await mgr.stop()

    return asyncio.run(run())


def test_a_guest_listing_canonical_names_is_asked(tmp_path: Path) -> None:
    link = Link(["ssdcache.status", "ssdcache.config"], {"hits": 3, "misses": 1})
    st, aware = _status(tmp_path, link)
    assert link.sent == ["ssdcache.status"] and st is not None and st.get("hits") == 3
    assert aware


def test_an_old_guest_listing_old_names_is_asked_by_its_name(tmp_path: Path) -> None:
    link = Link(["ssdcache-status"], {"hits": 5})
    st, aware = _status(tmp_path, link)
    assert link.sent == ["ssdcache-status"] and st is not None and st.get("hits") == 5
    assert not aware

