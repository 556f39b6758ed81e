#!/usr/bin/env bash
# The whole test suite: lint, unit tests, host tests (root, libvirtd, KSM, loop devices) and
# VM tests (boot real guests under QEMU/libvirt). Installs what it needs first.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not vm" for a quick run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "==> ruff"
.venv/bin/ruff check daemon guest_agent research tests benchmarks
echo "==> pytest"
# The real-GPU tests (tests/gpu) need CuPy and a CUDA device; everywhere else the simulated
# GPU backend carries the GPU tests in tests/unit.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec .venv/bin/pytest -ra "$@"
fi
echo "    (no GPU: deselecting tests marked gpu; tests/unit covers the simulated backend)"
exec .venv/bin/pytest -ra -m "not gpu" "$@"
