#!/usr/bin/env bash
# Sets up .venv, packs the digits shards (held-out split included) exactly as a user would,
# and runs jobs/quickstart.yaml on 2 ranks, placement auto (CPU ranks where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
if [ ! -f data/digits/train/index.json ]; then
  python -m data_shards pack sklearn:digits --out data/digits --prefix digits \
    --holdout 0.2 --seed 0 --max-samples-per-shard 300
fi
port=$((29500 + RANDOM % 2000))
status=0
deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$port" launch/run.py \
  --spec jobs/quickstart.yaml "$@" || status=$?
# DeepSpeed's CPU all-reduce leaves a buffer per rank in /dev/shm; remove ours.
rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true
exit $status
