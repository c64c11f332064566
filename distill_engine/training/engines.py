"""The two engines of a stage, built from its plan: a frozen teacher (replicated, or ZeRO-3
sharded) and a trainable student (ZeRO-0 to 3, as placed), around the root modules of
``models.py``. Weights are loaded here; placement was chosen by planning."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import torch
from torch import nn

from distill_engine import weights
from distill_engine.accelerator import fused_adamw_available, resolve_dtype
from distill_engine.modeling import tracing
from distill_engine.objectives import build_objective
from distill_engine.planning.job import Placement, StagePlan
from distill_engine.spec.schema import deep_merge

from .models import LocalTeacher, StudentModel, TeacherModel
from .partitions import load_weights

log = logging.getLogger("distill_engine")


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def ds_config(path, overrides: dict[str, Any], defaults: dict[str, Any] | None = None,
              **fields: Any) -> dict[str, Any]:
    """The JSON file over ``defaults`` (``zero_optimization`` fields sized from the plan),
    our computed fields over it, the user's overrides over all."""
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config = deep_merge({"zero_optimization": defaults or {}}, config)
    return deep_merge(deep_merge(config, fields), overrides)


# ---------------------------------------------------------------------------- teacher

def build_teacher(plan: StagePlan, job_seed: int, placement: Placement):
    """Builds the teacher, prunes it to the deepest tap and loads its weights. Sharded: built
    under ``zero.Init`` (each rank allocates only its shard), weights loaded into the
    partitions, wrapped in an inference-only engine (no optimizer). Replicated: a plain
    module in its dtype on this rank's device."""
    import deepspeed
    stage, recipe = plan.spec, plan.teacher
    dtype = resolve_dtype(stage.teacher.dtype)
    # Read the weights before building, so that a bad file fails before any allocation.
    state = weights.read_state_dict(recipe.weights)
    torch.manual_seed(job_seed)
    if not placement.sharded:
        model = recipe.family.create(recipe)
        _prune_and_load(model, plan, state)
        del state
        from deepspeed.accelerator import get_accelerator
        model.to(device=get_accelerator().current_device_name(), dtype=dtype)
        model.eval().requires_grad_(False)
        teacher = TeacherModel(model, recipe.family)
        teacher.attach_taps(plan.teacher_taps)
        return LocalTeacher(teacher), dtype
    config = ds_config(placement.config, stage.deepspeed.teacher_overrides, placement.defaults,
                       train_micro_batch_size_per_gpu=stage.data.micro_batch_size,
                       gradient_accumulation_steps=1,
                       bf16={"enabled": dtype == torch.bfloat16})
    # zero.Init takes its dtype from the config's bf16 flag. Passing ``dtype=`` as well is a
    # trap in DeepSpeed 0.19.8: an operator-precedence slip makes it pick bf16 on any
    # accelerator without fp16 (the CPU), whatever dtype was asked for.
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = recipe.family.create(recipe)
    _prune_and_load(model, plan, state)
    del state
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=TeacherModel(model, recipe.family), config=config)
    held, total = shard_counts(model)
    log.info("teacher: %s parameters, %s (%.1f%%) held by this rank", f"{total:,}", f"{held:,}",
             100 * held / max(total, 1))
    engine.module.attach_taps(plan.teacher_taps)
    engine.eval()
    return engine, dtype


def _prune_and_load(model: nn.Module, plan: StagePlan, state: dict[str, torch.Tensor]) -> None:
    """The teacher cut after its deepest tap, then its weights (keys as its family names
    them) loaded into what is left, whether replicated or partitioned."""
    recipe = plan.teacher
    state = recipe.family.adapt_state_keys(model, state)
    removed = tracing.prune_after(model, plan.models.teacher_trace, plan.teacher_taps)
    if removed:
        log.info("teacher pruned after its deepest tap: removed %s", _short(removed))
    load_weights(model, state, recipe.weights, ignore=removed)


def shard_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters in the model) under ZeRO-3 partitioning."""
    held = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):
            held += param.ds_tensor.numel()
            total += param.ds_numel
        else:
            held += param.numel()
            total += param.numel()
    return held, total


# ---------------------------------------------------------------------------- student

def _is_vector(param: nn.Parameter) -> bool:
    return len(getattr(param, "ds_shape", param.shape)) <= 1


def param_groups(module: StudentModel, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters (biases, norms) nor on what the model
    itself exempts (timm's ``no_weight_decay()``: cls token, position embeddings)."""
    exempt = {f"model.{n}" for n in module.family.no_weight_decay(module.model)}
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _is_vector(param) or name in exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def scheduler_config(plan: StagePlan, total_steps: int, warmup: int) -> dict[str, Any]:
    """DeepSpeed's own warm-up schedules (linear warm-up, then cosine / linear / constant)."""
    opt = plan.spec.optimisation
    # DeepSpeed's schedulers refuse 0 warm-up steps; "no warm-up" is a warm-up that starts
    # at the peak learning rate. (WarmupDecayLR decays towards its minimum, so it keeps a
    # minimum of 0 and DeepSpeed's shortest warm-up, 2 steps.)
    start_ratio = 0.0 if warmup or opt.schedule == "linear" else 1.0
    warmup = max(warmup, 1)
    if opt.schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total_steps, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_ratio": start_ratio, "cos_min_ratio": opt.min_lr_ratio}}
    common = {"warmup_num_steps": warmup, "warmup_type": "linear",
              "warmup_min_lr": start_ratio * plan.lr, "warmup_max_lr": plan.lr}
    if opt.schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": total_steps, **common}}
    return {"type": "WarmupLR", "params": common}


def build_student(plan: StagePlan, total_steps: int, warmup_steps: int, job_seed: int,
                  placement: Placement):
    import deepspeed
    stage, recipe = plan.spec, plan.student
    opt = stage.optimisation
    dtype = resolve_dtype(stage.student.dtype)
    config = ds_config(
        placement.config, stage.deepspeed.student_overrides, placement.defaults,
        train_micro_batch_size_per_gpu=stage.data.micro_batch_size,
        gradient_accumulation_steps=opt.gradient_accumulation_steps,
        train_batch_size=plan.global_batch,
        bf16={"enabled": dtype == torch.bfloat16},
        gradient_clipping=opt.grad_clip or 0.0,
        optimizer={"type": "AdamW", "params": {
            "lr": plan.lr, "betas": list(opt.betas), "eps": opt.eps,
            "weight_decay": opt.weight_decay, "torch_adam": True,
            "fused": fused_adamw_available()}},
        scheduler=scheduler_config(plan, total_steps, warmup_steps),
        # DeepSpeed's throughput timer waits for the device twice a step (to time it); the
        # trainer times steps itself, without waiting (training.step_timing).
        timers={"throughput": {"enabled": False}},
    )
    torch.manual_seed(job_seed)
    family = recipe.family
    # Built whole on every rank (same seed, same weights), whatever the placement: under
    # zero.Init, layers would be partitioned before the family's own initialisation runs
    # (timm's finds empty tensors and leaves torch's defaults), so a student's start would
    # depend on where its states live. ZeRO-3 partitions it in deepspeed.initialize; the
    # cost is the student's whole fp32 weights on each rank once, a fraction of its states.
    model = family.create(recipe, stage.student.drop_path_rate, stage.student.drop_path_schedule)
    objectives = [build_objective(o, plan.models.tap_shapes) for o in stage.objectives]
    if plan.student_init is not None:
        state = family.adapt_state_keys(model, weights.read_state_dict(plan.student_init))
        fresh = weights.fresh_head_keys(weights.expected_shapes(model),
                                        {k: tuple(v.shape) for k, v in state.items()},
                                        family.classifier_prefixes(model))
        if fresh:
            log.info("student: %s start fresh (not in %s, or another number of classes)",
                     _short(sorted(fresh)), plan.student_init)
        load_weights(model, state, plan.student_init, fresh=fresh,
                     ignore=family.init_extra_modules(model))
    frozen = set(plan.models.frozen_params)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if plan.models.frozen_student:
        log.info("student: no objective reaches %s; frozen", _short(plan.models.frozen_student))
    if stage.student.grad_checkpointing:
        family.set_grad_checkpointing(model, True)
    module = StudentModel(model, family, objectives)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, opt.weight_decay), config=config)
    if zero_stage(config) == 0 and engine.dp_world_size == 1:
        # One rank without ZeRO has nothing to all-reduce; DeepSpeed would still flatten
        # every gradient into buckets, "reduce" them and copy them back, each step.
        engine.enable_backward_allreduce = False
    if zero_stage(config) == 0:
        engine.clip_fp32_gradients = functools.partial(clip_gradients, engine)
    begin_schedule(engine.lr_scheduler)
    module.attach_taps(plan.student_taps)
    return engine, dtype


def clip_gradients(engine) -> torch.Tensor:
    """Gradient clipping of a student without ZeRO (where DeepSpeed calls
    ``clip_fp32_gradients``): torch's ``clip_grad_norm_``, one foreach pass over the
    gradients. DeepSpeed's own loops over the tensors in Python (a norm and a scaling kernel
    per tensor) and all-reduces the norm over the data-parallel group, which only MoE
    models need: without ZeRO every rank holds the same averaged gradients, so the norm, the
    clipping coefficient and the update are the same."""
    return torch.nn.utils.clip_grad_norm_(
        [p for p in engine.module.parameters() if p.grad is not None],
        engine.gradient_clipping())


def begin_schedule(scheduler) -> None:
    """Puts a fresh DeepSpeed scheduler at its step 0 before the first optimizer step.

    Built, it sits at iteration -1, which its ``get_lr`` answers with 0, and the engine
    steps it only after each optimizer step: so the first step ran at lr 0 whatever the
    schedule (a stage without warm-up lost its first step), and a warm-up reached its peak
    one step late. From iteration 0 the first step takes the schedule's first value (0 at
    the start of a linear warm-up, as transformers' schedules; the peak without one). A
    resumed run loads the scheduler's saved iteration over this."""
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", 0) == -1:
        scheduler.step()


def _short(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
