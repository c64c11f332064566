"""TEST-ONLY fault injection, for the reliability tests (docs/reliability.md).

Nothing in a job spec can reach this module: it reads only the environment variable
``DISTILL_FAULT``, which no normal launch sets. Each fault fires at most once per process:

    DISTILL_FAULT=nan_loss_at_step:5          rank 0 feeds NaN pixels (a poisoned batch) at step 5
    DISTILL_FAULT=kill_rank_at_step:1:3       rank 1 SIGKILLs itself at the start of step 3
    DISTILL_FAULT=hang_rank_at_step:1:3       rank 1 stops answering (sleeps) at the start of step 3
    DISTILL_FAULT=die_in_save_at_step:4       rank 0 SIGKILLs itself in the middle of the step-4
                                              checkpoint (DeepSpeed's files written, no marker)

Several faults can be given separated by commas.
"""

from __future__ import annotations

import os
import signal
import sys
import time

_fired: set[str] = set()


def _wanted(kind: str) -> list[list[int]]:
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


def nan_loss_at(step: int, rank: int) -> bool:
    return rank == 0 and any(args == [step] for args in _wanted("nan_loss_at_step")) \
        and _fire_once(f"nan{step}")


def maybe_kill_rank(step: int, rank: int) -> None:
    if any(args == [rank, step] for args in _wanted("kill_rank_at_step")):
        _die(f"kill_rank_at_step: rank {rank} at step {step}")


def maybe_hang_rank(step: int, rank: int) -> None:
    if any(args == [rank, step] for args in _wanted("hang_rank_at_step")):
        print(f"DISTILL_FAULT (test-only): rank {rank} hangs at step {step} from unix time "
              f"{time.time():.3f}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def maybe_die_in_save(step: int, rank: int) -> None:
    if rank == 0 and any(args == [step] for args in _wanted("die_in_save_at_step")):
        _die(f"die_in_save_at_step: rank 0 in the middle of the step-{step} checkpoint")


def _die(what: str) -> None:
    # Plain print, not the logger: the tests read the time of death from this line.
    print(f"DISTILL_FAULT (test-only): {what}; SIGKILL at unix time {time.time():.3f}",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
