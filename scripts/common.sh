# Sourced by the job scripts (quickstart.sh, well_read_students.sh, self_distillation*.sh):
# one set-up and one launch for all of them. Run from the repository root.

# The venv (made, or reused, by bootstrap.sh) and the environment every rank inherits.
setup_venv() {
  export VENV=${VENV:-.venv}
  bash scripts/bootstrap.sh
  . "$VENV/bin/activate"
  export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code, also in launched ranks
}

# The quickstart's digits shards (data/digits: train and a 20 % held-out split), packed once.
pack_digits() {
  [ -f data/digits/train/index.json ] || python -m data_shards pack sklearn:digits \
    --out data/digits --prefix digits --holdout 0.2 --seed 0 --max-samples-per-shard 300
}

# launch/run.py with ARGS on NUM_RANKS (default 2) local ranks; returns the job's status.
# MASTER_PORT fixes the rendezvous port (default: a random one in 29500-31499).
launch_job() {
  local port=${MASTER_PORT:-$((29500 + RANDOM % 2000))} status=0
  deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$port" launch/run.py "$@" || status=$?
  # DeepSpeed's CPU all-reduce leaves a buffer per rank in /dev/shm; remove ours.
  rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true
  return "$status"
}

# VADER's sentence splits under DIR (scripts/text_data.py), written and packed once.
text_splits() {
  local data=$1
  [ -f "$data/test/index.json" ] && return 0
  python scripts/text_data.py --out "$data"
  for split in labelled transfer test; do
    python -m data_shards pack "$data/$split.jsonl" --out "$data/$split" \
      --max-samples-per-shard 500 --no-progress
  done
}

# The --set arguments that run a self-distillation job's chain again under job seed SEED:
# further, selfdist, finetune_selfdist, finetune_further, finetune_initial (stages FIRST to
# FIRST+4, in that order) named NAME_seedSEED, each reading the models of its own seed. Seed 0
# is the job as written (no arguments). Prints the words; the caller splits them.
selfdist_seed_args() {
  local k=$1 f=$2
  [ "$k" = 0 ] && return 0
  echo --set seed="$k" \
    --set stages.$f.name=further_seed"$k" \
    --set stages.$((f + 1)).name=selfdist_seed"$k" \
    --set stages.$((f + 1)).teacher.arch=stage:further_seed"$k" \
    --set stages.$((f + 2)).name=finetune_selfdist_seed"$k" \
    --set stages.$((f + 2)).student.init=stage:selfdist_seed"$k" \
    --set stages.$((f + 3)).name=finetune_further_seed"$k" \
    --set stages.$((f + 3)).student.init=stage:further_seed"$k" \
    --set stages.$((f + 4)).name=finetune_initial_seed"$k"
}
