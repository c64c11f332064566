#!/usr/bin/env bash
# Self-distillation for further pre-training on the digits (jobs/self_distillation.yaml):
# packs the class splits, runs the job on 2 ranks (pre-training stages once, fine-tuning with
# data seeds 0, 1, 2; FINETUNE_SEEDS="" for seed 0 only), and prints the held-out accuracies (runs/self-distillation/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
bash scripts/bootstrap.sh
. "$VENV/bin/activate"
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
RUN=runs/self-distillation
# Source: digits 0-4 (the initial MAE only). Target: digits 5-9, relabelled 0-4, with a
# held-out split; fine-tuning sees 20 labelled images per class of the target's train split.
[ -f data/selfdist/source/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 0,1,2,3,4 --out data/selfdist/source --no-progress
[ -f data/selfdist/target/train/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 5,6,7,8,9 --holdout 0.2 --out data/selfdist/target --no-progress
[ -f data/selfdist/labelled/train/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 5,6,7,8,9 --holdout 0.2 --max-per-class 20 --out data/selfdist/labelled --no-progress

run_job() {
  local port=$((29500 + RANDOM % 2000)) status=0
  deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$port" launch/run.py \
    --spec jobs/self_distillation.yaml --set run_dir="$RUN" "$@" || status=$?
  # DeepSpeed's CPU all-reduce leaves a buffer per rank in /dev/shm; remove ours.
  rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true
  return "$status"
}

start=$(date +%s)
run_job "$@"                                  # all stages; fine-tuning with data seed 0
for seed in ${FINETUNE_SEEDS-1 2}; do        # the pre-training stages are done: skipped
  sets=()
  for stage in 3 4 5; do
    name=$(python -c "import yaml; print(yaml.safe_load(open('jobs/self_distillation.yaml'))['stages'][$stage]['name'])")
    sets+=(--set "stages.$stage.name=${name}_seed$seed" --set "stages.$stage.data.seed=$seed")
  done
  run_job "${sets[@]}" "$@"
done
echo "self_distillation.sh: $(( $(date +%s) - start )) s"
python scripts/self_distillation_results.py "$RUN" 0 ${FINETUNE_SEEDS-1 2} | tee "$RUN/results.md"
