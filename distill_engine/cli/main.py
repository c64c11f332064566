"""The command line behind ``launch/run.py``:
``deepspeed [--num_gpus N | --hostfile H] launch/run.py --spec JOB.yaml``.

Also ``python launch/run.py --spec JOB.yaml`` for one process, ``--check`` to validate and
print the resolved plan without training, ``--plan [--gpu-memory 80GB]`` to estimate
memory per GPU at ``--world-size`` GPUs. Exit codes: 0 done, 2 bad spec (or a spec that
changed since the run started, or a run directory another job holds), 1 a failure while
running (bad weights, bad data, non-finite loss), each with a one-paragraph message;
128 + the signal (143, 130) when SIGTERM/SIGINT stopped the job after a checkpoint
(docs/reliability.md).
Launching (the process group, quiet ranks, the run lock) is ``launch.py``; what each
failure exits with, ``failures.py``; what --check and --plan print, ``report.py``. Heavy
modules (torch, deepspeed) are imported only once they are needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distill_engine.spec.units import memory_size


def count(what: str):
    """An argparse type: a whole number of at least 1 (``--world-size -3`` was planned
    with, as -96 samples per step; ``--world-size 0`` was silently 1)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {what}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} is not a number of {what}; give 1 or more")
        return value
    return parse


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
    parser.add_argument("--world-size", type=count("ranks"), default=None,
                        help="ranks to check batch arithmetic against (default: $WORLD_SIZE or 1)")
    parser.add_argument("--stop-after", type=count("steps"), default=None, metavar="STEPS",
                        help="stop (with a checkpoint) after this many steps in this run; "
                             "running the same command again resumes")
    parser.add_argument("--restart-from", default=None, metavar="STAGE",
                        help="start STAGE and every stage after it again: their directories "
                             "in run_dir are moved aside (NAME.replaced-TIME), not deleted. "
                             "Needed to train a stage whose spec changed since it started")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not for users")
    return parser


def recordings_beyond_disk(job) -> str | None:
    """--plan refuses a recording larger than the disk it writes to: one paragraph each."""
    from distill_engine.planning.job import RecordPlan
    from distill_engine.planning.targets import disk_problem
    found = [f"error: {job.source}: stages[{plan.index}].record: {problem}"
             for plan in job.stages if isinstance(plan, RecordPlan) and (problem := disk_problem(plan))]
    return "\n".join(found) or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        # Say it ourselves rather than let DeepSpeed warn on every rank that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world_size = args.world_size if args.world_size is not None else int(
        os.environ.get("WORLD_SIZE", "1"))
    is_first_rank = os.environ.get("RANK", "0") == "0"

    from distill_engine.planning.load import load_plan
    from distill_engine.spec.yaml_io import SpecError
    try:
        # --plan plans for GPUs (bf16); otherwise the models are placed for this machine.
        job = load_plan(args.spec, args.set, world_size, missing_inputs_ok=args.plan,
                        accelerator_bf16=True if args.plan else None,
                        restart_from=args.restart_from)
    except SpecError as err:
        if is_first_rank:
            print(err, file=sys.stderr)
        return 2
    if args.plan:
        from distill_engine.planning.placement import memory_reports

        from .report import print_memory
        for where, message in job.warnings:
            print(f"warning: {where}: {message} (a memory plan needs shapes only)", file=sys.stderr)
        if refused := recordings_beyond_disk(job):
            if is_first_rank:
                print(refused, file=sys.stderr)
            return 2
        gpu_memory = args.gpu_memory
        return 0 if print_memory(memory_reports(job, world_size, gpu_memory), gpu_memory) else 3
    stage_names = [stage.name for stage in job.spec.stages]
    if args.restart_from is not None and args.restart_from not in stage_names:
        if is_first_rank:
            print(f"error: --restart-from {args.restart_from}: the job has no stage of that "
                  f"name; its stages: {', '.join(stage_names)}", file=sys.stderr)
        return 2
    from distill_engine.training.fingerprint import changed_stages
    changed = changed_stages(job, restarting=args.restart_from)
    if changed:
        if is_first_rank:
            print(changed, file=sys.stderr)
        return 2
    if args.check:
        from .report import print_plan
        print_plan(job)
        return 0
    from .launch import train
    return train(job, args.stop_after, args.restart_from)
