"""Watcher's unit-test package sets up eventlet and the oslo.service backend; it must come first,
as it does in Watcher's own test runs."""

import watcher.tests.unit  # noqa: F401
