#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (the distributed tests start real DeepSpeed
# ranks on the CPU with gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
# --durations: the slowest tests, to keep the whole suite under its 20-minute goal.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
