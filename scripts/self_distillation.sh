#!/usr/bin/env bash
# Self-distillation for further pre-training on the digits (jobs/self_distillation.yaml):
# packs the class splits, runs the job on 2 ranks, and prints the held-out accuracies
# (runs/self-distillation/results.md).
#
# The initial model (stage `initial`, MAE on the source digits) is made once: it plays the
# paper's given pre-trained checkpoint. Everything after it (further pre-training,
# self-distillation, the three fine-tunings) runs once per seed in SEEDS (default 0-4):
# seed 0 is the job's own stages, seed k the same stages named NAME_seedk under job seed k
# (their masks, sample order, augmentation and fresh classifier all derive from it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
setup_venv
SPEC=jobs/self_distillation.yaml
RUN=${RUN:-runs/self-distillation}
SEEDS=${SEEDS-0 1 2 3 4}
# Source: digits 0-4 (the initial MAE only). Target: digits 5-9, relabelled 0-4, with a
# held-out split; the target task's training set is 5 images per class of its train split
# (further pre-training and self-distillation see them unlabelled, fine-tuning labelled).
[ -f data/selfdist/source/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 0,1,2,3,4 --out data/selfdist/source --no-progress
[ -f data/selfdist/target/train/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 5,6,7,8,9 --holdout 0.2 --out data/selfdist/target --no-progress
[ -f data/selfdist/fewshot/train/index.json ] || python -m data_shards pack sklearn:digits \
  --classes 5,6,7,8,9 --holdout 0.2 --max-per-class 5 --out data/selfdist/fewshot --no-progress

start=$(date +%s)
for seed in $SEEDS; do
  # stage 0, `initial`, is made by seed 0 and skipped as complete after it
  # shellcheck disable=SC2046  # the seed's arguments are separate words
  launch_job --spec "$SPEC" --set run_dir="$RUN" $(selfdist_seed_args "$seed" 1) "$@"
  echo "self_distillation.sh: seed $seed done at $(( $(date +%s) - start )) s"
done
echo "self_distillation.sh: $(( $(date +%s) - start )) s"
# shellcheck disable=SC2086
python scripts/self_distillation_results.py "$RUN" $SEEDS --curves --heldout \
  | tee "$RUN/results.md"
