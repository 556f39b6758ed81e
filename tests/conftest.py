"""Shared fixtures. Tests marked root/libvirt/vm *fail* (never skip) when run without what
they need, so CI cannot go green by skipping them; deselect them with -m for a quick run."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (run scripts/test.sh as root, or deselect with -m 'not root')")


@pytest.fixture(scope="session")
def libvirtd(as_root: None):
    """libvirtd/virtlogd running (started if absent, and then stopped at the end)."""
    from symbiont.host.libvirt_host import ensure_libvirtd, stop_started_libvirtd

    started = ensure_libvirtd()
    yield
    if started and os.environ.get("SYMBIONT_KEEP_LIBVIRTD") != "1":
        stop_started_libvirtd()
