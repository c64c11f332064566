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


def random_teacher(plan):
    """``engines.build_teacher`` of a sharded teacher without the weights: the same config
    (the working set sized from the plan), zero.Init, pruning, inference engine and taps,
    with the model's random initialisation."""
    import deepspeed
    import torch

    from distill_engine.accelerator import resolve_dtype
    from distill_engine.modeling.tracing import prune_after
    from distill_engine.training.engines import ds_config
    from distill_engine.training.models import TeacherModel
    stage = plan.spec
    dtype = resolve_dtype(stage.teacher.dtype)
    placement = plan.placement.teacher
    assert placement.sharded, "measure a sharded teacher: name its config in the job"
    config = ds_config(placement.config, stage.deepspeed.teacher_overrides, placement.defaults,
                       train_micro_batch_size_per_gpu=stage.data.micro_batch_size,
                       gradient_accumulation_steps=1, bf16={"enabled": dtype == torch.bfloat16})
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = plan.teacher.family.create(plan.teacher)
    prune_after(model, plan.models.teacher_trace, plan.teacher_taps)
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=TeacherModel(model, plan.teacher.family), config=config)
    engine.module.attach_taps(plan.teacher_taps)
    engine.eval()
    return engine, dtype


def alternate_with_bare(plan, teacher, images, pairs: int) -> dict[str, list[float]]:
    """Seconds per forward of the teacher engine and of the same (pruned) model as a plain
    module in the same dtype, alternating step by step."""
    import torch

    from distill_engine.modeling.tracing import prune_after
    bare = plan.teacher.family.create(plan.teacher)
    prune_after(bare, plan.models.teacher_trace, plan.teacher_taps)
    bare.to(device=images.device, dtype=images.dtype).eval().requires_grad_(False)
    seconds = {"engine": [], "bare": []}
    for _ in range(pairs):
        for name, forward in (("engine", teacher), ("bare", common.synchronised(bare.forward_features))):
            started = time.perf_counter()
            with torch.no_grad():
                forward(images)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--teacher-only", action="store_true",
                        help="build the teacher alone and time forwards")
    parser.add_argument("--random-teacher", action="store_true",
                        help="with --teacher-only: random init instead of a weights file "
                             "(teachers too large to save on this machine)")
    parser.add_argument("--compare-bare", action="store_true",
                        help="with --teacher-only: after measuring memory, time forwards of the "
                             "engine and of the bare model in its dtype, alternating")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from distill_engine.planning.load import load_plan
    from distill_engine.training.engines import build_teacher
    common.init_distributed()
    world = dist.get_world_size()
    job = load_plan(args.job, world_size=world, missing_inputs_ok=args.random_teacher)
    plan = job.stages[0]
    # A warm-up all-reduce maps DeepSpeed's shm buffer before the baseline is taken.
    dist.all_reduce(torch.zeros(1, device=common.device()))
    common.trim()
    common.reset_peak_held()
    base = common.held()
    result = {"rank": dist.get_rank(), "world_size": world}
    size = plan.spec.data.views.geometry.size
    batch = plan.spec.data.micro_batch_size
    if args.teacher_only:
        teacher, dtype = (random_teacher(plan) if args.random_teacher
                          else build_teacher(plan, job.spec.seed, plan.placement.teacher))
        result["build_peak"] = common.peak_held() - base
        common.trim()
        result["teacher_held"] = common.held() - base
        images = next(common.fixed_batches(batch, size))["image"].to(common.device(), dtype)
        teacher = common.synchronised(teacher)
        times, peaks = [], []
        for _ in range(args.steps):
            started = time.perf_counter()
            teacher(images)
            times.append(time.perf_counter() - started)
            peaks.append(common.peak_held() - base)  # from the second on: ZeRO-3 prefetches
        result["forward_s"] = times
        result["peak_after_forward"] = peaks
        if args.compare_bare:
            result["peak"] = common.peak_held() - base
            result["alternating"] = alternate_with_bare(plan, teacher, images, args.steps)
    else:
        trainer = common.engine_trainer(job, plan, common.fixed_batches(batch, size))
        common.trim()
        result["held_after_build"] = common.held() - base
        result["step_s"] = []
        result["threads"] = torch.get_num_threads()
        step = common.synchronised(trainer.train_step)
        for _ in range(args.steps):
            started = time.perf_counter()
            step()
            result["step_s"].append(time.perf_counter() - started)
        result["placement"] = [p.name for p in (plan.placement.teacher,
                                                plan.placement.student) if p is not None]
    result.setdefault("peak", common.peak_held() - base)
    print("MEASURED " + json.dumps(result), flush=True)
    common.remove_shm_buffers()


if __name__ == "__main__":
    main()
