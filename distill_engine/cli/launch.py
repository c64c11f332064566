"""Training a checked job in this process: one rank of the job's process group.

The order matters: the preemption handler first (a SIGTERM from then on ends in a
checkpoint), then the process group, the quiet ranks, the run lock; then the stages.
"""

from __future__ import annotations

import datetime
import os
import sys

from distill_engine.planning.job import JobPlan


def train(job: JobPlan, stop_after: int | None, restart_from: str | None = None) -> int:
    from distill_engine.training import preemption
    preemption.install()  # first: a SIGTERM from here on ends in a checkpoint, not a kill
    single_process_environment()
    import deepspeed
    import torch.distributed as dist
    from rich.markup import escape

    from distill_engine.training.progress import console, setup_logging, summary_table
    from distill_engine.training.run_lock import RunLock
    from distill_engine.training.trainer import train_job

    from .failures import failure_of

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    if rank != 0:
        quiet_stdout()
    timeout = datetime.timedelta(seconds=min(s.deepspeed.timeout_s for s in job.spec.stages))
    deepspeed.init_distributed(timeout=timeout)
    rank = dist.get_rank()

    lock = RunLock(job.spec.run_dir) if rank == 0 else None
    if not hold_run_dir(lock, job, restart_from):
        return 2
    try:
        rows = train_job(job, stop_after)
    except preemption.Preempted as stop:
        if rank == 0:
            saved = (f"saved checkpoint {stop.tag} (complete)" if stop.tag
                     else "nothing to save yet")
            console.print(f"[yellow]stopped:[/yellow] {escape(stop.why)}; every rank finished "
                          f"step {stop.step} and the job {saved}; run the same command "
                          f"again to resume from it", highlight=False, soft_wrap=True)
        return stop.exit_code
    except Exception as err:
        failure = failure_of(err)
        if failure is None:
            raise  # a bug: keep its traceback
        # A verdict every rank reaches together is reported once, by rank 0; a failure of
        # one rank (its data, its disk, a peer it lost) by the rank it happened on.
        # escape: messages quote file names and library errors that contain [brackets];
        # soft_wrap: one unbroken line that grep and log collectors keep whole.
        if rank == 0 or not failure.every_rank:
            console.print(f"[red]error on rank {rank}:[/red] {escape(failure.message)}",
                          highlight=False, soft_wrap=True)
        return failure.exit_code
    finally:
        if lock is not None:
            lock.release()
    if rank == 0 and rows is not None:
        console.print(summary_table(rows))
    dist.barrier()
    return 0


def single_process_environment() -> None:
    """``python launch/run.py`` without a launcher: one rank. Without RANK & co. DeepSpeed
    would look for MPI (and fail without mpi4py). Left alone when an MPI or SLURM launch
    of several tasks is under way: their own discovery applies there."""
    if "RANK" in os.environ or any(int(os.environ.get(v, "1") or 1) > 1 for v in
                                   ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")):
        return
    import socket
    with socket.socket() as sock:  # a free port for the one-rank process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def quiet_stdout() -> None:
    """Ranks other than 0 stay quiet: DeepSpeed's op loaders print to stdout on every rank.
    Warnings and errors go to stderr, which stays open."""
    sys.stdout = open(os.devnull, "w")


def hold_run_dir(lock, job: JobPlan, restart_from: str | None) -> bool:
    """Collective. Rank 0 takes the run directory's lock (and, with --restart-from, moves
    the restarted stages aside); False on every rank when another job holds it."""
    import torch.distributed as dist

    from distill_engine.training.fingerprint import restart_from as move_aside
    from distill_engine.training.progress import console
    from distill_engine.training.run_lock import RunDirInUse, RunDirUnusable
    problem = None
    if lock is not None:
        try:
            note = lock.acquire()
        except (RunDirInUse, RunDirUnusable) as err:
            problem = f"error: {err}"
            print(problem, file=sys.stderr)
        else:
            if note:
                console.print(f"note: {note}", highlight=False, soft_wrap=True)
            if restart_from:
                move_aside(job, restart_from)
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0] is None
