"""Peak resident memory of the real engines on this rank, for one FD job (a job.yaml that
``common.fd_job`` wrote): after building the teacher, and after a few training steps.
Prints one JSON line per rank. Run alone (one process) or under ``deepspeed --num_gpus N``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--teacher-only", action="store_true",
                        help="build the teacher alone and time forwards")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from distill_engine.engines import build_teacher
    from distill_engine.plan import load_plan
    common.init_distributed()
    world = dist.get_world_size()
    job = load_plan(args.job, world_size=world)
    plan = job.stages[0]
    # A warm-up all-reduce maps DeepSpeed's shm buffer before the baseline is taken.
    dist.all_reduce(torch.zeros(1))
    common.trim()
    common.reset_peak()
    base = common.rss()
    result = {"rank": dist.get_rank(), "world_size": world}
    size = plan.spec.data.views.geometry.size
    batch = plan.spec.data.micro_batch_size
    if args.teacher_only:
        teacher, dtype = build_teacher(plan, job.spec.seed)
        common.trim()
        result["teacher_held"] = common.rss() - base
        images = next(common.fixed_batches(batch, size))["image"].to(dtype)
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            teacher(images)
            times.append(time.perf_counter() - started)
        result["forward_s"] = times
    else:
        trainer = common.engine_trainer(job, plan, common.fixed_batches(batch, size))
        common.trim()
        result["held_after_build"] = common.rss() - base
        for _ in range(args.steps):
            trainer.train_step()
    result["peak"] = common.peak_rss() - base
    print("MEASURED " + json.dumps(result), flush=True)
    common.remove_shm_buffers()


if __name__ == "__main__":
    main()
