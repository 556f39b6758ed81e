#!/usr/bin/env bash
# The whole test suite: lint, unit tests, host tests (root, libvirtd, KSM, loop devices) and
# VM tests (boot real guests under QEMU/libvirt). Installs what it needs first.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not vm" for a quick run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "==> ruff"
.venv/bin/ruff check daemon guest_agent tests benchmarks
echo "==> pytest"
exec .venv/bin/pytest -ra "$@"
