"""Engine overhead: samples/s of the engine's FD step (1 rank, ZeRO-3, the real DeepSpeed
teacher and student engines, ``StageTrainer.train_step``) against a bare PyTorch loop
computing the identical step: same teacher (weights, pruned to its tap), same student
(same initial weights), same FD objective and projection head, same AdamW and gradient
clipping, same batch and dtype. Steps alternate between the two (engine, bare, engine,
...), because this shared machine's speed drifts within seconds; the ratio is the median of
the per-pair ratios of step times (bare / engine = engine samples/s / bare samples/s;
goal >= 0.9).

    python bench/bench_engine_overhead.py [--pairs 12 --batch 16 --size 112]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# ViT-B/16 teacher and ViT-S/16 student, at 112 px (50 tokens) so that a step takes seconds.
TEACHER = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000)
STUDENT = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000)


def bare_step_fn(plan, images):
    """The same FD step in plain PyTorch: no DeepSpeed, no hooks of ours but one tap."""
    import timm
    import torch
    from distill_engine.engines import param_groups
    from distill_engine.tracing import prune_after
    from distill_engine.weights import read_state_dict
    from distill_engine.objectives import build_objective
    from distill_engine.objectives.feature import feature_distillation_loss  # noqa: F401
    stage = plan.spec
    teacher = plan.teacher.family.create(plan.teacher)
    teacher.load_state_dict(read_state_dict(plan.teacher.weights))
    prune_after(teacher, plan.models.teacher_trace, plan.teacher_taps)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(0)  # the job seed: the engine's student starts from the same weights
    student = plan.student.family.create(plan.student, stage.student.drop_path_rate)
    objective = build_objective(stage.objectives[0], plan.models.tap_shapes)
    holder = torch.nn.Module()
    holder.model, holder.objectives = student, torch.nn.ModuleList([objective])
    holder.family = plan.student.family
    opt = stage.optimisation
    optimizer = torch.optim.AdamW(param_groups(holder, opt.weight_decay), lr=plan.lr,
                                  betas=opt.betas, eps=opt.eps)
    tap = stage.objectives[0].student_tap

    def step():
        with torch.no_grad():
            target = teacher.forward_features(images)  # ends at the tapped final norm
        captured = {}
        handle = student.get_submodule(tap).register_forward_hook(
            lambda m, a, out: captured.__setitem__(tap, out))
        student(images)
        handle.remove()
        loss = objective(captured, {tap: target}, {})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=12, help="alternating engine/bare steps")
    parser.add_argument("--student-overrides", default="{}",
                        help="JSON merged into the student's DeepSpeed config (to try settings)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch
    common.init_distributed()
    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    job = common.fd_job(work, {**TEACHER, "img_size": args.size}, {**STUDENT, "img_size": args.size},
                        batch=args.batch, size=args.size, dtype="fp32")
    plan = job.stages[0]
    plan.spec.deepspeed.student_overrides.update(json.loads(args.student_overrides))
    batches = common.fixed_batches(args.batch, args.size)
    images = next(batches)["image"]
    engine = common.engine_trainer(job, plan, batches)
    bare = bare_step_fn(plan, images)
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    for _ in range(2):  # warm-up: allocator, first-step optimizer state, DeepSpeed caches
        engine.train_step()
        bare()
    seconds = {"engine": [], "bare": []}
    for _ in range(args.pairs):
        for name, step in (("engine", engine.train_step), ("bare", bare)):
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    ratios = [b / e for e, b in zip(seconds["engine"], seconds["bare"])]
    ratio = common.median(ratios)
    rate = {k: args.batch / common.median(v) for k, v in seconds.items()}
    overrides = f"; student config overrides `{args.student_overrides}`" \
        if args.student_overrides != "{}" else ""
    body = (f"FD step, ViT-B/16 teacher (pruned at `norm`) -> ViT-S/16 student, {args.size} px, "
            f"batch {args.batch}, fp32, 1 rank, ZeRO-3 student and teacher engines "
            f"(ds_configs as shipped{overrides}), torch threads {torch.get_num_threads()}; "
            f"{args.pairs} alternating engine/bare steps after 2 warm-up steps each.\n\n"
            f"| | median samples/s | step times (s) |\n|---|---|---|\n"
            f"| engine (`StageTrainer.train_step`) | {rate['engine']:.2f} | "
            f"{fmt(seconds['engine'])} |\n"
            f"| bare PyTorch loop | {rate['bare']:.2f} | {fmt(seconds['bare'])} |\n\n"
            f"Per-pair ratios engine/bare samples/s: {fmt(ratios)}.\n\n"
            f"**Median ratio engine / bare samples/s: {ratio:.3f}** (goal >= 0.9)")
    print(body)
    if not args.no_record:
        common.record("Engine overhead", body)
    common.remove_shm_buffers()
    print(f"ratio engine/bare samples/s: {ratio:.3f}")


if __name__ == "__main__":
    main()
