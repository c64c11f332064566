#!/usr/bin/env bash
# Sets up .venv, packs the digits shards as the quickstart does, runs
# jobs/sweep_from_targets.yaml on 2 ranks (the teacher, one recording, three students from
# the records and the same three distilled live) and prints the comparison of both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
setup_venv
if [ ! -f data/digits/train/index.json ]; then
  python -m data_shards pack sklearn:digits --out data/digits --prefix digits \
    --holdout 0.2 --seed 0 --max-samples-per-shard 300
fi
launch_job --spec jobs/sweep_from_targets.yaml "$@"
python scripts/sweep_from_targets_results.py runs/sweep_from_targets
