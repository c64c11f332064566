"""The engine against its peers, at equal kernels: samples/s of one Feature Distillation
step on the same teacher, student, batch and dtype (ViT-B/16 -> ViT-S/16, 112 px, batch 16,
fp32 by default), 1 rank:

- **engine**: ``StageTrainer.train_step`` with the real engines, placement ``auto`` (on one
  rank a replicated teacher and a ZeRO-0 student), torch's fused AdamW;
- **bare**: the identical step in plain PyTorch (bench_engine_overhead.bare_step_fn): same
  pruned teacher, same student weights, same FD objective and projection, same fused AdamW
  and clipping;
- **timm**: timm 1.0.31's ``FeatureDistillationTask`` (MSE between pooled pre-logits through
  a projection, plus its cross-entropy term) driven as timm's train script drives it;
- **timm, FD's loss**: the same task with its distillation term replaced by FD's (every
  token through the projection, whitened target, SmoothL1 beta 2), so that timm's side does
  the engine's work: its cross-entropy term costs what the engine's zero-weighted output
  term costs (a backward through the head);
- **torchdistill**: torchdistill 1.1.5's ``DistillationBox`` (its ``forward_process`` and
  ``post_forward_process``: backward, clipping, optimizer step). Its nearest equivalent of FD
  is FitNets' hint stage (a regressor on a hooked student layer, a loss against a hooked
  teacher layer); torchdistill ships only convolutional regressors (``ConvReg``,
  ``Connector4DAB``), so the per-token linear regressor is a wrapper registered through its
  own ``register_auxiliary_model_wrapper``, on the same pattern as ``Connector4DAB``, and the
  loss is FD's (whitened target, SmoothL1 beta 2) registered as its mid-level loss.

Each peer runs twice: with the AdamW its own optimizer factory gives (timm's
``create_optimizer_v2('adamw')``, torchdistill's ``get_optimizer('AdamW')``: both torch's
default foreach kernels), and with the fused AdamW the engine uses (equal kernels). Steps
alternate side by side, round by round (each round in a rotated order), because the speed
of a shared machine drifts within seconds; a ratio is the median over rounds of
(other side's step time / engine's step time) = engine samples/s / other samples/s, printed
with a 95 % bootstrap interval of that median: a side is ahead or behind only where the
interval excludes 1. On an accelerator each step ends with a device synchronisation (a
timing, not the engine's loop).

    python bench/bench_peers.py [--rounds 10 --batch 16 --size 112 --dtype fp32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_engine_overhead import STUDENT, TEACHER, bare_step_fn  # noqa: E402

ENGINE = "engine"


def _models(plan, device, dtype):
    """The pruned teacher (weights loaded, frozen) and the student built as the engine
    builds it (job seed), in ``dtype`` on ``device``."""
    import torch
    from distill_engine.modeling.tracing import prune_after
    from distill_engine.weights import read_state_dict
    teacher = plan.teacher.family.create(plan.teacher)
    teacher.load_state_dict(read_state_dict(plan.teacher.weights))
    prune_after(teacher, plan.models.teacher_trace, plan.teacher_taps)
    teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
    torch.manual_seed(0)
    student = plan.student.family.create(plan.student, plan.spec.student.drop_path_rate)
    return teacher, student.to(device=device, dtype=dtype)


def _timm_fd_task():
    """timm's FeatureDistillationTask with FD's distillation term: the student's whole token
    map through the task's projection against the teacher's token map (FD's loss), beside
    the task's own cross-entropy term."""
    import torch
    from timm.task.distillation import FeatureDistillationTask
    from distill_engine.objectives.feature import feature_distillation_loss

    class TokenFeatureDistillationTask(FeatureDistillationTask):
        def forward(self, input, target):
            trainable = self.trainable_module
            tokens = trainable.student.forward_features(input)
            task_loss = self.criterion(trainable.student.forward_head(tokens), target)
            with torch.no_grad():
                teacher_input = self.teacher.normalize_input(input, self.student_mean,
                                                             self.student_std)
                teacher_tokens = self.teacher.model.forward_features(teacher_input)
            kd_loss = feature_distillation_loss(trainable.projection(tokens), teacher_tokens,
                                                beta=2.0)
            loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
            return {"loss": loss, "task_loss": task_loss, "kd_loss": kd_loss}
    return TokenFeatureDistillationTask


def timm_step_fn(plan, images, device, dtype, fused: bool, fd_loss: bool = False):
    """timm's FeatureDistillationTask, with timm's AdamW (``fused=False``: torch's default
    kernels, what ``--opt adamw`` gives) or torch's fused AdamW; with ``fd_loss``, its
    distillation term is FD's (the same work as the engine's step)."""
    import torch
    from timm.optim import create_optimizer_v2
    from timm.task.distillation import DistillationTeacher, FeatureDistillationTask
    teacher, student = _models(plan, device, dtype)
    task_class = _timm_fd_task() if fd_loss else FeatureDistillationTask
    task = task_class(student, DistillationTeacher(teacher), device=device, dtype=dtype,
                      verbose=False)
    task.teacher.requires_grad_(False)
    task.train()
    opt = plan.spec.optimisation
    optimizer = create_optimizer_v2(task.trainable_module, opt="adamw", lr=plan.lr,
                                    weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps,
                                    **({"fused": True} if fused else {}))
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=device)

    def step():
        loss = task(images, labels)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.get_clip_parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


_TORCHDISTILL_REGISTERED = False


def _register_torchdistill_fd() -> None:
    """FD's regressor and loss in torchdistill's registries (once per process)."""
    global _TORCHDISTILL_REGISTERED
    if _TORCHDISTILL_REGISTERED:
        return
    from torch import nn
    from torchdistill.losses.registry import register_mid_level_loss
    from torchdistill.models.registry import register_auxiliary_model_wrapper
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
    from distill_engine.objectives.feature import feature_distillation_loss

    @register_auxiliary_model_wrapper(key="TokenRegressor4FD")
    class TokenRegressor4FD(AuxiliaryModelWrapper):
        """The student and a per-token linear regressor on one hooked layer's output (the
        FitNets hint regressor for [B, N, C] tokens); torchdistill's hooks record both."""

        def __init__(self, student_model, input_module_path, in_features, out_features,
                     device, **kwargs):
            super().__init__()
            self.student_model = student_model
            self.input_module_path = input_module_path
            self.regressor = nn.Linear(in_features, out_features).to(device)

        def forward(self, x):
            return self.student_model(x)

        def secondary_forward(self, io_dict):
            self.regressor(io_dict[self.input_module_path]["output"])

    @register_mid_level_loss(key="FDLoss")
    class FDLoss(nn.Module):
        def __init__(self, student_path, teacher_path, beta=2.0, **kwargs):
            super().__init__()
            self.student_path, self.teacher_path, self.beta = student_path, teacher_path, beta

        def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
            return feature_distillation_loss(student_io_dict[self.student_path]["output"],
                                             teacher_io_dict[self.teacher_path]["output"],
                                             beta=self.beta)

    _TORCHDISTILL_REGISTERED = True


def torchdistill_step_fn(plan, images, device, dtype, fused: bool):
    """torchdistill's DistillationBox on the same models: its hooks, its forward process
    and its post-forward process (backward, clip, step), with its AdamW (``fused=False``:
    ``get_optimizer('AdamW')``, torch's default kernels) or torch's fused AdamW."""
    import torch
    from torchdistill.core.distillation import DistillationBox
    _register_torchdistill_fd()
    teacher, student = _models(plan, device, dtype)
    tap = plan.spec.objectives[0].student_tap
    shapes = plan.models.tap_shapes
    opt = plan.spec.optimisation
    optimizer_kwargs = {"lr": plan.lr, "betas": list(opt.betas), "eps": opt.eps,
                        "weight_decay": opt.weight_decay, **({"fused": True} if fused else {})}
    train_config = {
        "num_epochs": 1,
        "teacher": {"forward_proc": "forward_batch_only",
                    "forward_hook": {"input": [], "output": [plan.spec.objectives[0].teacher_tap]},
                    "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only",
                    "auxiliary_model_wrapper": {"key": "TokenRegressor4FD", "kwargs": {
                        "input_module_path": f"student_model.{tap}",
                        "in_features": shapes.student[tap][-1],
                        "out_features": shapes.teacher[plan.spec.objectives[0].teacher_tap][-1]}},
                    "forward_hook": {"input": [], "output": [f"student_model.{tap}", "regressor"]},
                    "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": optimizer_kwargs, "max_grad_norm": opt.grad_clip},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"fd": {
            "criterion": {"key": "FDLoss", "kwargs": {
                "student_path": "regressor",
                "teacher_path": plan.spec.objectives[0].teacher_tap}},
            "weight": 1.0}}}},
    }
    box = DistillationBox(teacher, student, {}, train_config, torch.device(device), None,
                          False, 1.0)
    box.pre_epoch_process(epoch=0)
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=device)

    def step():
        loss = box.forward_process(images, labels, supp_dict=None)
        box.post_forward_process(loss)
        return loss.detach()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds of steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--sides", default=None,
                        help="semicolon-separated subset of the sides to run (default: all)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch
    common.init_distributed()
    device = common.device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    job = common.fd_job(work, {**TEACHER, "img_size": args.size}, {**STUDENT, "img_size": args.size},
                        batch=args.batch, size=args.size, dtype=args.dtype)
    plan = job.stages[0]
    batches = common.fixed_batches(args.batch, args.size)
    images = next(batches)["image"].to(device=device, dtype=dtype)
    engine = common.engine_trainer(job, plan, batches)
    builders = {
        ENGINE: lambda: engine.train_step,
        "bare": lambda: bare_step_fn(plan, images),
        "timm, timm's AdamW": lambda: timm_step_fn(plan, images, device, dtype, fused=False),
        "timm, fused AdamW": lambda: timm_step_fn(plan, images, device, dtype, fused=True),
        "timm, FD's loss, fused AdamW": lambda: timm_step_fn(plan, images, device, dtype,
                                                             fused=True, fd_loss=True),
        "torchdistill, its AdamW": lambda: torchdistill_step_fn(plan, images, device, dtype, False),
        "torchdistill, fused AdamW": lambda: torchdistill_step_fn(plan, images, device, dtype, True),
    }
    chosen = [ENGINE] + [s for s in (args.sides.split(";") if args.sides else builders)
                         if s != ENGINE]
    unknown = [s for s in chosen if s not in builders]
    if unknown:
        sys.exit(f"bench_peers: unknown side(s) {unknown}; choose from {list(builders)}")
    sides = {name: common.synchronised(builders[name](), device) for name in chosen}
    warm = {}
    for name, step in sides.items():  # allocator, optimizer state, caches
        started = time.perf_counter()
        for _ in range(args.warmup):
            step()
        warm[name] = time.perf_counter() - started
    seconds = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - started)
    per_round = {name: [o / e for e, o in zip(seconds[ENGINE], seconds[name])]
                 for name in sides if name != ENGINE}
    ratios = {name: common.median(values) for name, values in per_round.items()}
    intervals = {name: common.median_interval(values) for name, values in per_round.items()}
    shown = {name: f"{ratios[name]:.3f} (95 % interval {intervals[name][0]:.3f}-"
                   f"{intervals[name][1]:.3f})" for name in ratios}
    rate = {name: args.batch / common.median(values) for name, values in seconds.items()}
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    rows = "\n".join(f"| {name} | {rate[name]:.2f} | {warm[name]:.1f} | {fmt(seconds[name])} |"
                     for name in sides)
    load = common.load_average()
    body = (f"FD step, ViT-B/16 teacher (pruned at `norm`) -> ViT-S/16 student, {args.size} px, "
            f"batch {args.batch}, {args.dtype}, 1 rank on {device}; engine placement: teacher "
            f"{plan.placement.teacher.name}, student {plan.placement.student.name}; torch "
            f"threads {torch.get_num_threads()}; {args.rounds} alternating rounds (rotated order) "
            f"after {args.warmup} warm-up steps each; load average {load} at the end.\n\n"
            f"| side | median samples/s | {args.warmup} warm-up steps (s) | step times (s) |\n"
            f"|---|---|---|---|\n{rows}\n\n"
            + "\n".join(f"- **engine / {name}: {shown[name]}**" for name in ratios)
            + "\n\nGoals: engine / bare >= 0.98; engine ahead of every peer at equal kernels "
              "(the fused AdamW rows).")
    print(body)
    if not args.no_record:
        common.record("Peers at equal kernels", body)
    common.remove_shm_buffers()
    print("ratios (engine samples/s / side samples/s):")
    for name in ratios:
        print(f"  engine/{name}: {shown[name]}")


if __name__ == "__main__":
    main()
