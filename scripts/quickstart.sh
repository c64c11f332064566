#!/usr/bin/env bash
# Sets up .venv, packs the digits shards (held-out split included) exactly as a user would,
# and runs jobs/quickstart.yaml on 2 ranks, placement auto (CPU ranks where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
setup_venv
pack_digits
launch_job --spec jobs/quickstart.yaml "$@"
