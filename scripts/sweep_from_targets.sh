#!/usr/bin/env bash
# Sets up .venv, packs the digits shards as the quickstart does, runs
# jobs/sweep_from_targets.yaml on 2 ranks (the teacher, one recording, three students from
# the records and the same three distilled live) and prints the comparison of both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
setup_venv
pack_digits
launch_job --spec jobs/sweep_from_targets.yaml "$@"
python scripts/sweep_from_targets_results.py runs/sweep_from_targets
