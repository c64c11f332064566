#!/usr/bin/env bash
# TinyMIM's claims at micro-scale (jobs/tinymim_digits.yaml): packs the digits shards as the
# quickstart does, checks the job, runs it once per seed (SEEDS, default "0 1 2"; one 2-rank
# job at a time, each in runs/tinymim_digits/seedN) and prints the table of held-out
# accuracies with the paired differences (runs/tinymim_digits/results.md). Rerunning resumes:
# finished stages are skipped. Extra arguments go to every launch (e.g. --set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
setup_venv
SPEC=jobs/tinymim_digits.yaml
RUNS=${RUNS:-runs/tinymim_digits}
pack_digits
python launch/run.py --spec "$SPEC" --check --world-size "${NUM_RANKS:-2}" "$@" >/dev/null
runs=()
for seed in ${SEEDS:-0 1 2}; do
  started=$(date +%s)
  launch_job --spec "$SPEC" --set seed="$seed" --set run_dir="$RUNS/seed$seed" "$@"
  echo "tinymim_digits seed $seed: $(( $(date +%s) - started )) s"
  runs+=("$RUNS/seed$seed")
done
python scripts/tinymim_digits_results.py "${runs[@]}" | tee "$RUNS/results.md"
