"""Stopping when asked: SIGTERM / SIGINT (a cluster preempting the job, Ctrl-C), or the
launcher above this rank going away.

A signal only raises a flag here. The training loop finishes the step it is in, asks
every rank whether any of them was asked to stop (one all-reduce of one number per step),
and if so all ranks save one complete checkpoint together and exit with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT): the interrupted step is finished and saved, so
no work is lost as long as the step and the save fit in the time the cluster allows.

Who gets the signal differs by how the job is stopped, which is why the ranks agree
rather than each acting alone:

- the whole process group (SLURM at the end of a job, Kubernetes, Ctrl-C): every rank and
  DeepSpeed's per-node launcher (``deepspeed/launcher/launch.py``). That launcher forwards
  SIGTERM to each rank's process tree and kills what is still alive 30 s later
  (``terminate_process_tree``: ``psutil.wait_procs(timeout=30)``): the step and the save
  must fit in those 30 s.
- the ``deepspeed`` runner alone (``kill PID``, a batch script's shell): DeepSpeed 0.19.8's
  runner installs no handler on a single node and dies at once, leaving its launcher and
  the ranks running. Each rank therefore watches the launcher and the runner above it and
  treats their disappearance like SIGTERM: the ranks save, exit, and the launcher follows.
- the per-node launcher alone: it SIGTERMs its ranks one after the other (the next one
  only once the previous has exited); the first one's flag reaches the others through the
  all-reduce.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("distill_engine")

_requested: dict[str, object] = {}  # {"signal": signal number, "why": words}; first wins
_WATCH_INTERVAL_S = 1.0


class Preempted(Exception):
    """Raised by the training loop on every rank after the checkpoint is complete."""

    def __init__(self, why: str, signum: int, step: int, tag: str | None):
        super().__init__(why)
        self.why, self.signum, self.step, self.tag = why, signum, step, tag

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a job killed by that signal


def request_stop(signum: int, why: str) -> None:
    _requested.setdefault("signal", signum)
    _requested.setdefault("why", why)


def stop_requested_here() -> bool:
    return "signal" in _requested


def stop_signal() -> int:
    return int(_requested.get("signal", signal.SIGTERM))


def stop_reason() -> str:
    return str(_requested.get("why", "asked to stop"))


def install() -> None:
    """On this rank: SIGTERM and SIGINT raise the flag (no KeyboardInterrupt, no traceback),
    and a thread watches the DeepSpeed launcher and runner above this process."""
    def on_signal(signum, _frame):
        request_stop(signum, signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watched = _launchers_above()
    if watched:
        threading.Thread(target=_watch, args=(watched,), name="launcher-watch",
                         daemon=True).start()


def _launchers_above() -> list[tuple[int, float, str]]:
    """(pid, start time, what) of DeepSpeed's launcher (this rank's parent) and of the
    runner that started it, when this process was started by them."""
    import psutil
    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return []  # started by something else (python launch/run.py, torchrun, srun)
        watched = [(parent.pid, parent.create_time(), "DeepSpeed's launcher")]
        runner = parent.parent()
        if runner is not None and "deepspeed" in " ".join(runner.cmdline()):
            watched.append((runner.pid, runner.create_time(), "the deepspeed runner"))
        return watched
    except (psutil.Error, OSError):
        return []


def _watch(watched: list[tuple[int, float, str]]) -> None:
    import time

    import psutil
    while not stop_requested_here():
        for pid, started, what in watched:
            try:
                alive = psutil.Process(pid).create_time() == started  # not a reused pid
            except psutil.Error:
                alive = False
            if not alive:
                request_stop(signal.SIGTERM, f"{what} (pid {pid}) went away")
                return
        time.sleep(_WATCH_INTERVAL_S)


def stop_requested_everywhere() -> bool:
    """Collective, called by every rank at the end of each step: True on every rank when
    any rank was asked to stop."""
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        return stop_requested_here()
    flag = torch.tensor([stop_signal() if stop_requested_here() else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return False
    # Once per job: every rank adopts the reason of the first rank that has one, so that
    # rank 0's message says what happened even when another rank noticed it.
    reasons = [None] * dist.get_world_size()
    here = (stop_signal(), stop_reason()) if stop_requested_here() else None
    dist.all_gather_object(reasons, here)
    signum, why = next(r for r in reasons if r is not None)
    _requested.update(signal=signum, why=why)
    return True
