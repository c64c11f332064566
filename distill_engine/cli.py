"""The command line behind ``launch/run.py``:
``deepspeed [--num_gpus N | --hostfile H] launch/run.py --spec JOB.yaml``.

Also ``python launch/run.py --spec JOB.yaml`` for one process, ``--check`` to validate and
print the resolved plan without training, ``--plan [--gpu-memory 80GB]`` to estimate
memory per GPU at ``--world-size`` GPUs. Exit codes: 0 done, 2 bad spec (or a spec that
changed since the run started, or a run directory another job holds), 1 a failure while
running (bad weights, bad data, non-finite loss), each with a one-paragraph message;
128 + the signal (143, 130) when SIGTERM/SIGINT stopped the job after a checkpoint
(docs/reliability.md).
Heavy modules (torch, deepspeed) are imported only once they are needed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path



def memory_size(text: str) -> int:
    from .memory_plan import memory_size as parse  # torch comes with it: only when given
    return parse(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/run.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a teacher into a student, stage by stage, as a job spec says.\n"
                    "Train: deepspeed --num_gpus N launch/run.py --spec JOB.yaml",
        epilog="exit codes:\n"
               "  0  done (or --check / --plan: the spec is valid, the plan fits)\n"
               "  1  a failure while running (bad weights, bad data, non-finite loss, lost rank)\n"
               "  2  bad spec or arguments (every problem listed with its YAML path)\n"
               "  3  --plan with --gpu-memory: some stage does not fit")
    parser.add_argument("--spec", type=Path, required=True, help="the job spec (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set stages.0.optimisation.lr=1e-3")
    parser.add_argument("--check", action="store_true", help="validate and print the plan")
    parser.add_argument("--plan", action="store_true",
                        help="estimate memory per GPU at --world-size GPUs (meta device only; "
                             "missing weights and shards are warnings)")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE", type=memory_size,
                        help="with --plan: memory of one GPU, e.g. 80GB; says whether the job "
                             "fits and, if not, which setting would make it fit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to check batch arithmetic against (default: $WORLD_SIZE or 1)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                        help="stop (with a checkpoint) after this many steps in this run; "
                             "running the same command again resumes")
    parser.add_argument("--restart-from", default=None, metavar="STAGE",
                        help="start STAGE and every stage after it again: their directories "
                             "in run_dir are moved aside (NAME.replaced-TIME), not deleted. "
                             "Needed to train a stage whose spec changed since it started")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not for users")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        # Say it ourselves rather than let DeepSpeed warn on every rank that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    is_first_rank = os.environ.get("RANK", "0") == "0"

    from .plan import SpecError, load_plan
    try:
        job = load_plan(args.spec, args.set, world_size, missing_inputs_ok=args.plan)
    except SpecError as err:
        if is_first_rank:
            print(err, file=sys.stderr)
        return 2
    if args.plan:
        from .memory_plan import plan_job
        from .report import print_memory
        for where, message in job.warnings:
            print(f"warning: {where}: {message} (a memory plan needs shapes only)", file=sys.stderr)
        gpu_memory = args.gpu_memory
        return 0 if print_memory(plan_job(job, world_size, gpu_memory), gpu_memory) else 3
    stage_names = [stage.name for stage in job.spec.stages]
    if args.restart_from is not None and args.restart_from not in stage_names:
        if is_first_rank:
            print(f"error: --restart-from {args.restart_from}: the job has no stage of that "
                  f"name; its stages: {', '.join(stage_names)}", file=sys.stderr)
        return 2
    from .fingerprint import changed_stages
    changed = changed_stages(job, restarting=args.restart_from)
    if changed:
        if is_first_rank:
            print(changed, file=sys.stderr)
        return 2
    if args.check:
        from .report import print_plan
        print_plan(job)
        return 0
    return train(job, args.stop_after, args.restart_from)


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


def train(job, stop_after: int | None, restart_from: str | None = None) -> int:
    from . import preemption
    preemption.install()  # first: a SIGTERM from here on ends in a checkpoint, not a kill
    single_process_environment()
    import deepspeed
    import torch.distributed as dist
    from data_shards import DataError
    from .checkpoints import CheckpointError
    from .progress import console, setup_logging, summary_table
    from .run_lock import RunLock
    from .trainer import NonFiniteLoss, run_job
    from .weights import WeightsError
    from rich.markup import escape

    setup_logging(int(os.environ.get("RANK", "0")))
    if os.environ.get("RANK", "0") != "0":
        # Other ranks stay quiet: DeepSpeed's op loaders print to stdout on every rank.
        # Warnings and errors go to stderr, which stays open.
        sys.stdout = open(os.devnull, "w")
    timeout = datetime.timedelta(seconds=min(s.deepspeed.timeout_s for s in job.spec.stages))
    deepspeed.init_distributed(timeout=timeout)
    rank = dist.get_rank()

    def report(message: str, every_rank: bool = False) -> int:
        # A verdict every rank reaches together is reported once, by rank 0; a failure of
        # one rank (its data, its disk, a peer it lost) by the rank it happened on.
        # escape: messages quote file names and library errors that contain [brackets];
        # soft_wrap: one unbroken line that grep and log collectors keep whole.
        if rank == 0 or not every_rank:
            console.print(f"[red]error on rank {rank}:[/red] {escape(message)}",
                          highlight=False, soft_wrap=True)
        return 1

    lock = RunLock(job.spec.run_dir) if rank == 0 else None
    if not hold_run_dir(lock, job, restart_from):
        return 2
    try:
        rows = run_job(job, stop_after)
    except preemption.Preempted as stop:
        if rank == 0:
            saved = (f"saved checkpoint {stop.tag} (complete)" if stop.tag
                     else "nothing to save yet")
            console.print(f"[yellow]stopped:[/yellow] {escape(stop.why)}; every rank finished "
                          f"step {stop.step} and the job {saved}; run the same command "
                          f"again to resume from it", highlight=False, soft_wrap=True)
        return stop.exit_code
    except (WeightsError, DataError, NonFiniteLoss, CheckpointError) as err:
        return report(str(err), isinstance(err, NonFiniteLoss) or
                      getattr(err, "every_rank", False))
    except RuntimeError as err:
        if not lost_peer(err):
            raise  # a bug: keep its traceback
        return report(f"lost contact with another rank ({str(err).splitlines()[0]}): it died "
                      f"or stopped answering for deepspeed.timeout_s. Run the same command "
                      f"again to resume from the newest complete checkpoint")
    finally:
        if lock is not None:
            lock.release()
    if rank == 0 and rows is not None:
        console.print(summary_table(rows))
    dist.barrier()
    return 0


def hold_run_dir(lock, job, restart_from: str | None) -> bool:
    """Collective. Rank 0 takes the run directory's lock (and, with --restart-from, moves
    the restarted stages aside); False on every rank when another job holds it."""
    import torch.distributed as dist
    from .fingerprint import restart_from as move_aside
    from .progress import console
    from .run_lock import RunDirInUse
    problem = None
    if lock is not None:
        try:
            note = lock.acquire()
        except RunDirInUse as err:
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


def lost_peer(err: Exception) -> bool:
    """A collective that failed because another rank died or stopped answering (gloo raises
    plain RuntimeErrors for timeouts and closed connections)."""
    import torch.distributed as dist
    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
        s in text for s in ("Timed out waiting", "Connection closed by peer",
                            "Connection reset by peer")))
