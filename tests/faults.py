"""TEST-ONLY fault injection, for the reliability tests (docs/reliability.md).

A launcher in place of ``launch/run.py``: it wraps a few methods of the runtime with the
faults that ``DISTILL_FAULT`` asks for, then runs the command line as usual. Nothing of it
is in the package: a production run calls no fault code at all. Each fault fires at most
once per process:

    DISTILL_FAULT=nan_loss_at_step:5          rank 0 feeds NaN pixels (a poisoned batch) at step 5
    DISTILL_FAULT=kill_rank_at_step:1:3       rank 1 SIGKILLs itself at the start of step 3
    DISTILL_FAULT=hang_rank_at_step:1:3       rank 1 stops answering (sleeps) at the start of step 3
    DISTILL_FAULT=die_in_save_at_step:4       rank 0 SIGKILLs itself in the middle of the step-4
                                              checkpoint (DeepSpeed's files written, no marker)
    DISTILL_FAULT=kill_rank_at_record_batch:1:5   a recording stage's rank 1 SIGKILLs itself when
                                              it is about to write its 5th batch of records in
                                              this process (the batches since its last checkpoint
                                              sit in an open shard)

Several faults can be given separated by commas. Usage, as the tests launch it:
``DISTILL_FAULT=... deepspeed --num_gpus 2 tests/faults.py --spec JOB.yaml``.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from pathlib import Path

_fired: set[str] = set()


def wanted(kind: str) -> list[list[int]]:
    """The integer arguments of every ``kind:...`` entry in DISTILL_FAULT."""
    entries = []
    for entry in os.environ.get("DISTILL_FAULT", "").split(","):
        name, _, args = entry.strip().partition(":")
        if name == kind:
            entries.append([int(a) for a in args.split(":") if a])
    return entries


def _fire_once(key: str) -> bool:
    if key in _fired:
        return False
    _fired.add(key)
    return True


def _die(what: str) -> None:
    # Plain print, not the logger: the tests read the time of death from this line.
    print(f"DISTILL_FAULT (test-only): {what}; SIGKILL at unix time {time.time():.3f}",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    from distill_engine.training import checkpoints
    from distill_engine.training.trainer import StageTrainer

    train_step = StageTrainer.train_step

    @functools.wraps(train_step)
    def train_step_with_faults(self):
        step = self.step + 1
        if any(args == [self.rank, step] for args in wanted("kill_rank_at_step")):
            _die(f"kill_rank_at_step: rank {self.rank} at step {step}")
        if any(args == [self.rank, step] for args in wanted("hang_rank_at_step")):
            print(f"DISTILL_FAULT (test-only): rank {self.rank} hangs at step {step} from unix "
                  f"time {time.time():.3f}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        return train_step(self)

    forward_backward = StageTrainer.forward_backward

    @functools.wraps(forward_backward)
    def forward_backward_with_faults(self, batch, micro):
        step = self.step + 1
        if (self.rank == 0 and any(args == [step] for args in wanted("nan_loss_at_step"))
                and _fire_once(f"nan{step}")):  # a poisoned batch
            batch = {k: v.float().fill_(math.nan) if hasattr(v, "is_floating_point")
                     and v.is_floating_point() else v for k, v in batch.items()}
        return forward_backward(self, batch, micro)

    save_checkpoint = DeepSpeedEngine.save_checkpoint

    @functools.wraps(save_checkpoint)
    def save_checkpoint_with_faults(self, save_dir, tag=None, *args, **kwargs):
        result = save_checkpoint(self, save_dir, tag, *args, **kwargs)
        if int(os.environ.get("RANK", "0")) == 0:
            for (step,) in wanted("die_in_save_at_step"):
                if checkpoints.tag_of(step) == tag:
                    _die(f"die_in_save_at_step: rank 0 in the middle of the step-{step} "
                         f"checkpoint")
        return result

    from data_shards.targets import TargetWriter
    write_batch = TargetWriter.write_batch
    written = {"batches": 0}

    @functools.wraps(write_batch)
    def write_batch_with_faults(self, batch, blobs):
        written["batches"] += 1
        if any(args == [self.rank, written["batches"]] for args in wanted("kill_rank_at_record_batch")):
            _die(f"kill_rank_at_record_batch: rank {self.rank} at its batch {written['batches']}")
        return write_batch(self, batch, blobs)

    TargetWriter.write_batch = write_batch_with_faults
    StageTrainer.train_step = train_step_with_faults
    StageTrainer.forward_backward = forward_backward_with_faults
    DeepSpeedEngine.save_checkpoint = save_checkpoint_with_faults


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout
    install()
    from distill_engine.cli.main import main
    sys.exit(main())
