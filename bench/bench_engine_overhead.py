"""Engine overhead, and the engine against its peer: samples/s of the engine's FD step
(1 rank, placement ``auto`` as a user gets it: on one rank a replicated teacher and a ZeRO-0
student; the real engines, ``StageTrainer.train_step``) against

- a bare PyTorch loop computing the identical step: same teacher (weights, pruned to its
  tap), same student (same initial weights), same FD objective and projection head, same
  AdamW (fused, as the engine configures it) and gradient clipping, same batch and dtype
  (goal >= 0.95);
- the same bare loop with torch's default (foreach) AdamW: what the fused kernel saves;
- timm 1.0.31's ``timm.task.distillation.FeatureDistillationTask`` on the same teacher,
  student, batch, dtype and clipping, driven as timm's train script drives it
  (``task(input, target)``, backward, clip, step) with the AdamW its ``--opt adamw`` gives
  (``torch.optim.AdamW``, torch's default foreach kernels). Its loss differs in shape: MSE between
  the pooled pre-logits (plus a cross-entropy term), where FD matches whole token maps
  (goal >= 1.0);
- with ``--compile``, the same engine after DeepSpeed's ``engine.compile()`` of the student.

Steps alternate (engine, bare, timm, [compiled], engine, ...), because this shared
machine's speed drifts within seconds; each ratio is the median of the per-round ratios of
step times (other / engine = engine samples/s / other samples/s).

    python bench/bench_engine_overhead.py [--pairs 12 --batch 16 --size 112 --compile]
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


def bare_step_fn(plan, images, fused: bool = True):
    """The same FD step in plain PyTorch: no DeepSpeed, no hooks of ours but one tap."""
    import torch

    from distill_engine.accelerator import fused_adamw_available
    from distill_engine.modeling.tracing import prune_after
    from distill_engine.objectives import build_objective
    from distill_engine.objectives.feature import feature_distillation_loss  # noqa: F401
    from distill_engine.training.engines import param_groups
    from distill_engine.weights import read_state_dict
    stage = plan.spec
    teacher = plan.teacher.family.create(plan.teacher)
    teacher.load_state_dict(read_state_dict(plan.teacher.weights))
    prune_after(teacher, plan.models.teacher_trace, plan.teacher_taps)
    teacher.to(device=images.device, dtype=images.dtype).eval().requires_grad_(False)
    torch.manual_seed(0)  # the job seed: the engine's student starts from the same weights
    student = plan.student.family.create(plan.student, stage.student.drop_path_rate)
    objective = build_objective(stage.objectives[0], plan.models.tap_shapes)
    student.to(device=images.device, dtype=images.dtype)
    objective.to(device=images.device, dtype=images.dtype)
    holder = torch.nn.Module()
    holder.model, holder.objectives = student, torch.nn.ModuleList([objective])
    holder.family = plan.student.family
    opt = stage.optimisation
    optimizer = torch.optim.AdamW(param_groups(holder, opt.weight_decay), lr=plan.lr,
                                  betas=opt.betas, eps=opt.eps,
                                  fused=fused and fused_adamw_available())
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


def timm_task_step_fn(plan, images):
    """timm's FeatureDistillationTask on the same models, as timm's train script runs it."""
    import torch
    from timm.task.distillation import DistillationTeacher, FeatureDistillationTask

    from distill_engine.weights import read_state_dict
    teacher = plan.teacher.family.create(plan.teacher)
    teacher.load_state_dict(read_state_dict(plan.teacher.weights))
    torch.manual_seed(0)
    student = plan.student.family.create(plan.student, plan.spec.student.drop_path_rate)
    teacher.to(device=images.device, dtype=images.dtype)
    student.to(device=images.device, dtype=images.dtype)
    task = FeatureDistillationTask(student, DistillationTeacher(teacher), device=images.device,
                                   dtype=images.dtype, verbose=False)
    task.teacher.requires_grad_(False)
    task.train()
    opt = plan.spec.optimisation
    optimizer = torch.optim.AdamW(task.trainable_module.parameters(), lr=plan.lr,
                                  betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)

    def step():
        loss = task(images, labels)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.get_clip_parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=12, help="alternating rounds of steps")
    parser.add_argument("--student-overrides", default="{}",
                        help="JSON merged into the student's DeepSpeed config (to try settings)")
    parser.add_argument("--student-config", default="auto",
                        help="a ds_configs/ file instead of auto placement")
    parser.add_argument("--teacher-config", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--compile", action="store_true",
                        help="also time a second engine whose student runs engine.compile()")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch
    common.init_distributed()
    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    job = common.fd_job(work, {**TEACHER, "img_size": args.size}, {**STUDENT, "img_size": args.size},
                        batch=args.batch, size=args.size, dtype="fp32",
                        student_config=args.student_config, teacher_config=args.teacher_config)
    plan = job.stages[0]
    plan.spec.deepspeed.student_overrides.update(json.loads(args.student_overrides))
    batches = common.fixed_batches(args.batch, args.size)
    images = next(batches)["image"].to(common.device())
    engine = common.engine_trainer(job, plan, batches)
    sides = {"engine": engine.train_step, "bare": bare_step_fn(plan, images),
             "bare, foreach AdamW": bare_step_fn(plan, images, fused=False),
             "timm task": timm_task_step_fn(plan, images)}
    if args.compile:
        compiled = common.engine_trainer(job, plan, common.fixed_batches(args.batch, args.size))
        compiled.student.compile()
        sides["engine, compiled student"] = compiled.train_step
    sides = {name: common.synchronised(step) for name, step in sides.items()}
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    warm = {}
    for name, step in sides.items():  # warm-up: allocator, optimizer state, caches, compiling
        started = time.perf_counter()
        step()
        step()
        warm[name] = time.perf_counter() - started
    seconds = {name: [] for name in sides}
    for _ in range(args.pairs):
        for name, step in sides.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    ratios = {name: common.median([o / e for e, o in zip(seconds["engine"], seconds[name])])
              for name in sides if name != "engine"}
    rate = {k: args.batch / common.median(v) for k, v in seconds.items()}
    placed = plan.placement
    overrides = f"; student config overrides `{args.student_overrides}`" \
        if args.student_overrides != "{}" else ""
    rows = "\n".join(f"| {name} | {rate[name]:.2f} | {warm[name]:.1f} | {fmt(seconds[name])} |"
                     for name in sides)
    body = (f"FD step, ViT-B/16 teacher (pruned at `norm`) -> ViT-S/16 student, {args.size} px, "
            f"batch {args.batch}, fp32, 1 rank; engine placement: teacher {placed.teacher.name}, "
            f"student {placed.student.name}{overrides}; torch threads {torch.get_num_threads()}; "
            f"{args.pairs} alternating rounds after 2 warm-up steps each. The machine was "
            f"shared with other engineers' runs.\n\n"
            f"| | median samples/s | 2 warm-up steps (s) | step times (s) |\n|---|---|---|---|\n"
            f"{rows}\n\n"
            + "\n".join(f"- **engine / {name} samples/s: {ratio:.3f}**"
                        for name, ratio in ratios.items())
            + "\n\nGoals: engine / bare >= 0.95, engine / timm task >= 1.0.")
    print(body)
    if not args.no_record:
        common.record("Engine overhead", body)
    common.remove_shm_buffers()
    print("ratios " + ", ".join(f"engine/{name} samples/s: {ratio:.3f}"
                               for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
