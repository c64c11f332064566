#!/usr/bin/env bash
# The GPU check: on a CUDA machine (one GPU or several), from a fresh clone of this
# repository, sets up the venv (scripts/bootstrap.sh, plus the bench extra) and the digits
# shards, then, within a budget of 8 minutes, runs
#   1. the quickstart (jobs/quickstart.yaml) in bf16 on NCCL, on all GPUs;
#   2. bench/bench_engine_overhead.py (the engine's FD step against the identical bare step);
#   3. bench/bench_teacher_sharding.py for ViT-L at 1 GPU and at all GPUs;
#   4. bench/bench_peers.py (engine, bare step, timm's and torchdistill's FD at equal kernels);
# and writes one summary file (markdown: machine, versions, each step's status, time and
# result lines) for BENCHMARKS.md. It never falls back to the CPU: no GPU, no CUDA build of
# torch, no NCCL, or any step failing or running past the budget stops it with
# "GPU CHECK FAILED: ..." and exit status 1.
#
#   bash bench/gpu_check.sh [--summary FILE] [--budget SECONDS] [--python PY]
#   bash bench/gpu_check.sh --dry-run [--gpus N]     # on the CPU: everything but the GPU runs
#
# --python PY uses an interpreter that already holds the pinned stack (a machine without
# network) instead of setting up .venv. --dry-run checks on any machine what can be checked
# without a GPU: the set-up, the bench extra's pin, each benchmark's command line (--help),
# the quickstart's bf16 overrides against freshly packed digits shards (--check, with the
# world size of --gpus, default 2), the device checks (reported, not enforced), and the
# summary writer; it runs no training step and exits 0 when all of that holds.
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS="$*"
DRY_RUN=0
SUMMARY=runs/gpu_check/summary.md
BUDGET=480
PY=
DRY_GPUS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --summary) SUMMARY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --python) PY=$2; shift ;;
    --gpus) DRY_GPUS=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

LOGS=$(dirname "$SUMMARY")
mkdir -p "$LOGS"
: >"$SUMMARY"
note() { printf '%s\n' "$@" >>"$SUMMARY"; }  # one line per argument
say() { printf 'gpu_check: %s\n' "$*" >&2; }
fail() {
  printf '\nGPU CHECK FAILED: %s\n' "$*" >&2
  note "" "**GPU CHECK FAILED**: $*"
  exit 1
}

note "# GPU check$([ "$DRY_RUN" = 1 ] && echo ' (dry run on the CPU: nothing below was timed)')" ""
note "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u '+%Y-%m-%d %H:%M UTC'), \`bash bench/gpu_check.sh${ARGS:+ $ARGS}\`." ""

# ------------------------------------------------------------------ the GPUs, before set-up
if command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU '); then
  MACHINE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sort | uniq -c | sed 's/^ *//')
else
  GPUS=0
  MACHINE="no NVIDIA GPU (nvidia-smi missing or lists none)"
fi
if [ "$GPUS" -lt 1 ]; then
  [ "$DRY_RUN" = 1 ] || fail "$MACHINE: this check measures the GPU and does not fall back to the CPU (use --dry-run to check the rest on a CPU machine)"
  say "dry run: $MACHINE; checking for $DRY_GPUS GPU(s)"
  GPUS=$DRY_GPUS
fi
note "Machine: $MACHINE; $(nproc) CPU cores; load average $(cut -d' ' -f1-3 /proc/loadavg)." ""

# ------------------------------------------------------------------ set-up (not timed)
if [ -z "$PY" ]; then
  . scripts/common.sh
  setup_venv >&2 || fail "scripts/bootstrap.sh could not set up .venv"
  PY=$VENV/bin/python
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code, also in launched ranks
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
fi
"$PY" - <<'EOF' || fail "pyproject.toml does not pin torchdistill==1.1.5 in its bench extra"
import sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
sys.exit("torchdistill==1.1.5" not in extras.get("bench", []))
EOF
if ! "$PY" -c "import torchdistill" 2>/dev/null; then
  if [ "$DRY_RUN" = 1 ]; then
    say "dry run: torchdistill is not installed; the real run installs the bench extra (pip install -e '.[bench]')"
  else
    "$PY" -m pip --disable-pip-version-check -q install -e ".[bench]" >&2 \
      || fail "could not install the bench extra (torchdistill) into $PY's environment"
  fi
fi
DATA=data/digits
if [ "$DRY_RUN" = 1 ]; then
  SCRATCH=$(mktemp -d)
  trap 'rm -rf "$SCRATCH"' EXIT
  DATA=$SCRATCH/digits  # a fresh pack, so that the check sees what a fresh clone packs
fi
if [ ! -f "$DATA/train/index.json" ]; then
  "$PY" -m data_shards pack sklearn:digits --out "$DATA" --prefix digits --holdout 0.2 \
    --seed 0 --max-samples-per-shard 300 --no-progress >&2 || fail "could not pack the digits shards"
fi

# ------------------------------------------------------------------ the device, as torch and DeepSpeed see it
export DS_ACCELERATOR=cuda          # DeepSpeed would otherwise pick its CPU accelerator silently
export BENCH_REQUIRE_DEVICE=cuda    # bench/common.py refuses to time anything elsewhere
export PYTHONUNBUFFERED=1
DEVICE=$("$PY" - "$GPUS" <<'EOF' 2>/dev/null
import sys
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
want = int(sys.argv[1])
found = torch.cuda.device_count() if torch.cuda.is_available() else 0
problems = []
if torch.version.cuda is None:
    problems.append(f"torch {torch.__version__} is not a CUDA build")
if found < want:
    problems.append(f"torch sees {found} CUDA device(s) of the {want} expected")
if get_accelerator().device_name() != "cuda":
    problems.append(f"DeepSpeed's accelerator is {get_accelerator().device_name()!r}, not 'cuda'")
if not dist.is_nccl_available():
    problems.append("torch.distributed has no NCCL")
elif get_accelerator().communication_backend_name() != "nccl":
    problems.append(f"DeepSpeed would communicate over {get_accelerator().communication_backend_name()}, not NCCL")
if found and not torch.cuda.is_bf16_supported():
    problems.append(f"{torch.cuda.get_device_name(0)} has no bf16")
names = sorted({torch.cuda.get_device_name(i) for i in range(found)})
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {found} x {', '.join(names) or 'no device'}; "
      + ("; ".join(problems) if problems else "NCCL and bf16 available"))
sys.exit(1 if problems else 0)
EOF
) && DEVICE_OK=1 || DEVICE_OK=0
[ -n "$DEVICE" ] || DEVICE="torch or DeepSpeed could not be imported from $PY"
note "Device: $DEVICE." ""
if [ "$DEVICE_OK" = 0 ]; then
  [ "$DRY_RUN" = 1 ] || fail "$DEVICE"
  say "dry run: device check reports: $DEVICE"
fi
if [ "$DRY_RUN" = 1 ]; then  # the CPU checks below run on the accelerator there is
  unset DS_ACCELERATOR BENCH_REQUIRE_DEVICE
fi

# ------------------------------------------------------------------ the timed runs
WORLDS=1
[ "$GPUS" -gt 1 ] && WORLDS="1,$GPUS"
BF16=()
for stage in 0 1 2 3; do BF16+=(--set "stages.$stage.student.dtype=bf16"); done
BF16+=(--set stages.1.teacher.dtype=bf16 --set "data.train=$DATA/train" --set "data.eval=$DATA/holdout")
# Its own run folder: a CPU quickstart already in runs/quickstart is another run's spec.
BF16+=(--set run_dir=runs/gpu_check/quickstart)

started=$(date +%s)
# step NAME SECONDS DRY-RUN-COMMAND -- COMMAND...: COMMAND within SECONDS and within what
# is left of the budget; its output in LOGS/NAME.log and its last lines in the summary.
step() {
  local name=$1 cap=$2 dry=$3 log="$LOGS/$1.log" status=0 left took
  shift 4
  note "## $name" "" "\`$*\`" ""
  if [ "$DRY_RUN" = 1 ]; then
    say "dry run: $name: $dry"
    eval "$dry" >"$log" 2>&1 || { tail -20 "$log" >&2; fail "$name: its dry-run check failed ($dry)"; }
    note "Dry run: \`$dry\` passed." ""
    return 0
  fi
  left=$((BUDGET - ($(date +%s) - started)))
  [ "$left" -gt 10 ] || fail "$name: no time left of the ${BUDGET} s budget"
  [ "$cap" -lt "$left" ] && left=$cap
  say "$name (at most ${left} s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$left" "$@" >"$log" 2>&1 || status=$?
  took=$(($(date +%s) - t0))
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    [ "$status" -eq 124 ] && fail "$name: ran past its ${left} s (log: $log)"
    fail "$name: exit status $status (log: $log)"
  fi
  note "Passed in ${took} s. Last lines:" "" '```' "$(grep -v '^\s*$' "$log" | tail -${TAIL_LINES:-12})" '```' ""
}

TAIL_LINES=10 step quickstart 240 \
  "$PY launch/run.py --spec jobs/quickstart.yaml --check --world-size $GPUS ${BF16[*]}" -- \
  "$PY" -m deepspeed.launcher.runner --num_gpus "$GPUS" --master_port $((29500 + RANDOM % 2000)) \
  launch/run.py --spec jobs/quickstart.yaml "${BF16[@]}"
if [ "$DRY_RUN" = 0 ]; then  # a plain log line of each stage: time shares and MFU
  note "Logged lines (time shares, MFU):" "" '```' "$(grep -E 'step [0-9]+/[0-9]+ .*MFU' "$LOGS/quickstart.log" | tail -8)" '```' ""
fi
step engine_overhead 120 "$PY bench/bench_engine_overhead.py --help" -- \
  "$PY" bench/bench_engine_overhead.py --pairs 20 --no-record
step teacher_sharding 180 "$PY bench/bench_teacher_sharding.py --help" -- \
  "$PY" bench/bench_teacher_sharding.py --models vit_large_patch16_224 --worlds "$WORLDS" --forwards 3 --no-record
step peers 150 "$PY bench/bench_peers.py --help" -- \
  "$PY" bench/bench_peers.py --rounds 20 --no-record

if [ "$DRY_RUN" = 1 ]; then
  note "Dry run passed: set-up, bench extra, device checks (reported), quickstart --check in bf16 at world size $GPUS, and every benchmark's command line."
  say "dry run passed; summary in $SUMMARY"
else
  note "All steps passed in $(($(date +%s) - started)) s of the ${BUDGET} s budget."
  say "passed; summary in $SUMMARY"
fi
