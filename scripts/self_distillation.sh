#!/usr/bin/env bash
# Self-distillation for further pre-training on the digits (jobs/self_distillation.yaml):
# packs the class splits, runs the job on 2 ranks (pre-training stages once, fine-tuning with
# data seeds 0, 1, 2; FINETUNE_SEEDS="" for seed 0 only), and prints the held-out accuracies (runs/self-distillation/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
setup_venv
SPEC=jobs/self_distillation.yaml
RUN=runs/self-distillation
# Source: digits 0-4 (the initial MAE only). Target: digits 5-9, relabelled 0-4, with a
# held-out split; fine-tuning sees 20 labelled images per class of the target's train split.
[ -f data/selfdist/source/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 0,1,2,3,4 --out data/selfdist/source --no-progress
[ -f data/selfdist/target/train/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 5,6,7,8,9 --holdout 0.2 --out data/selfdist/target --no-progress
[ -f data/selfdist/labelled/train/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 5,6,7,8,9 --holdout 0.2 --max-per-class 20 --out data/selfdist/labelled --no-progress

start=$(date +%s)
launch_job --spec "$SPEC" --set run_dir="$RUN" "$@"   # all stages; fine-tuning with data seed 0
for seed in ${FINETUNE_SEEDS-1 2}; do                  # the pre-training stages are done: skipped
  reseeded_stages "$SPEC" "$seed" 3 4 5
  launch_job --spec "$SPEC" --set run_dir="$RUN" "${RESEEDED[@]}" "$@"
done
echo "self_distillation.sh: $(( $(date +%s) - start )) s"
python scripts/self_distillation_results.py "$RUN" 0 ${FINETUNE_SEEDS-1 2} | tee "$RUN/results.md"
