#!/usr/bin/env bash
# The demo: symbiotic overcommit on one host. Build or reuse the golden image, boot 4 VMs whose
# configured memory (4 x 512 MiB) exceeds the demo's budget (1280 MiB), balloon each down to
# 256 MiB, run a page-touching workload in 2 of them and leave 2 idle; first with symbiontd's
# parts off (stock), then with `profile: overcommit` and idle parking: memory flows to the busy
# VMs (their balloons deflate, the workload takes it), the idle ones are shrunk, paged out and
# parked, and still answer a ping (which wakes them). Prints a timeline every ~10 s (guest
# memory and last lever per VM), then per VM guest memory start -> end, host memory stock vs
# symbiont and the busy VMs' pages/s in both phases; results (CSV, PNG, run.json) land in
# results/demo/<timestamp>/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec .venv/bin/symbiont experiment run demo "$@"
