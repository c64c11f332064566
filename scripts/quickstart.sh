#!/usr/bin/env bash
# Sets up .venv, packs the digits shards (held-out split included) exactly as a user would,
# and runs jobs/quickstart.yaml on 2 ranks, placement auto (CPU ranks where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
setup_venv
if [ ! -f data/digits/train/index.json ]; then
  python -m data_shards pack sklearn:digits --out data/digits --prefix digits \
    --holdout 0.2 --seed 0 --max-samples-per-shard 300
fi
launch_job --spec jobs/quickstart.yaml "$@"
