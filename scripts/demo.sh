#!/usr/bin/env bash
# The demo lab: build or reuse the golden image, boot two VMs, start symbiontd, register the
# VMs, show live stats, balloon one VM and hot-plug vCPUs into the other through the API,
# show the guest seeing it, tear everything down and print a short report.
# Results (CSV, PNG, run.json) land in results/demo/<timestamp>/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec .venv/bin/symbiont experiment run demo "$@"
