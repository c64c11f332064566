"""``--plan``: memory per GPU for a job at N GPUs, estimated from meta-device models.

Nothing here touches weights or data: the models are the meta-device builds that
``load_plan`` already made (so a spec whose weights files do not exist yet can be planned),
and activations come from the output shapes of one meta-device forward, times the
micro-batch.

Per rank, for each stage:

- teacher shard: the (pruned) teacher's parameters / N under ZeRO-3, plus what may be
  gathered at once (``stage3_max_live_parameters``, which the runtime sizes from the largest
  layer, and the layer that crosses it); a replicated teacher: all its parameters;
- teacher activations: a no-grad forward frees as it goes, so about two layer outputs live
  at once, plus the taps that are kept for the loss;
- objectives: each built objective says what it holds per sample (FD's fp32 copies of the
  teacher tokens, the relation objective's [h, N, N] maps, fewer with ``chunk_rows``);
- student model states (ZeRO-0: everything on every rank): DeepSpeed's own estimators
  (``estimate_zero3_model_states_mem_needs`` / ``estimate_zero2_model_states_mem_needs``,
  which count 16-bit mixed precision with Adam); an fp32 student, which those do not cover,
  is counted as 4 B parameters + 4 B gradients + 8 B Adam states per parameter, sharded as
  the stage shards them;
- student activations: without checkpointing, every layer output of the forward is kept
  for the backward; with it, only each block's input is kept, and one block at a time is
  recomputed;
- communication buffers: the reduce bucket and the all-gather / prefetch buckets named in
  the resolved DeepSpeed config.

What it does not count: CUDA context and allocator fragmentation (the budget is therefore
90% of the GPU's memory), framework workspaces (cuBLAS, attention kernels), the data
loader. ``tests/unit/test_memory_plan.py`` compares the estimate with the peak memory measured
on CPU ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill_engine.families import InputShape, ModelFamily, ModelRecipe
from distill_engine.modeling import tracing
from distill_engine.objectives import build_objective
from distill_engine.spec.schema import deep_merge

from .job import Line, ModelFacts, Settings, StageFacts, StageMemory, StagePlan

USABLE_FRACTION = 0.9          # headroom for CUDA context and allocator fragmentation
# Leaves whose output aliases their input (or, for dropout, is at most a 1-byte mask).
ALIASING_LEAVES = (nn.Identity, nn.Dropout)


# ---------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class DeepSpeedKnobs:
    """What the resolved DeepSpeed configs say about buffers (element counts)."""

    reduce_bucket: int
    allgather_bucket: int
    student_prefetch: int
    teacher_prefetch: int
    teacher_max_live: int = 10 ** 9    # stage3_max_live_parameters of the teacher


def resolved_zero(path: Path | None, overrides: dict[str, Any],
                  defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``zero_optimization`` section as the engine will get it: computed defaults, the
    file over them, the spec's overrides over both (``None``: no DeepSpeed config)."""
    import json
    if path is None:
        return {}
    config = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    config = deep_merge(deep_merge({"zero_optimization": defaults or {}}, config), overrides)
    return config.get("zero_optimization", {})


def teacher_working_set(largest_layer: int) -> dict[str, int]:
    """ZeRO-3 knobs for a frozen teacher, from its largest layer: at most two layers
    gathered at once (the one running and the next, prefetched), nothing kept for reuse.
    DeepSpeed's defaults (1e9 live parameters, 5e7 prefetch) are sized for training and
    let a rank keep most of a teacher gathered from the second forward on, which undoes
    the sharding."""
    layer = max(int(largest_layer), 1)
    return {"stage3_max_live_parameters": 2 * layer, "stage3_max_reuse_distance": layer,
            "stage3_prefetch_bucket_size": layer}


def dtype_bytes(choice: str, accelerator_bf16: bool) -> int:
    """``auto`` is bf16 on GPUs (the planner plans for GPUs), fp32 where bf16 is missing."""
    return 2 if choice == "bf16" or (choice == "auto" and accelerator_bf16) else 4


# ---------------------------------------------------------------------------- model facts

def _elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if shape else 0  # per sample: the trace ran batch 1


def _repeated_blocks(model: nn.Module) -> list[str]:
    """The innermost repeated units (``blocks.3``, ``stages.2.blocks.7``): children of a
    ModuleList/Sequential, indexed by number, holding no such units themselves. These are
    what timm's ``set_grad_checkpointing`` checkpoints."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            candidates += [f"{name}.{child}" if name else child
                           for child, _ in module.named_children() if child.isdigit()]
    candidates = [c for c in candidates if any(True for _ in model.get_submodule(c).parameters())]
    return [c for c in candidates if not any(o.startswith(c + ".") for o in candidates)]


def model_facts(model: nn.Module, trace: tracing.Trace, family: ModelFamily) -> ModelFacts:
    leaves = {name: module for name, module in model.named_modules()
              if not any(True for _ in module.children()) and name in trace.shapes
              and not isinstance(module, ALIASING_LEAVES)}
    leaf_sizes = {name: _elements(trace.shapes[name]) for name in leaves}
    blocks = [b for b in _repeated_blocks(model) if b in trace.shapes]
    # Tensors made between layers, which no leaf returns: a block's two residual sums, and
    # an attention's output before its projection (and its head-merged copy).
    for b in blocks:
        leaf_sizes[f"{b}.(residual sums)"] = 2 * _elements(trace.shapes[b])
    for name, module in model.named_modules():
        if hasattr(module, "qkv") and name in trace.shapes:
            leaf_sizes[f"{name}.(attention output)"] = 2 * _elements(trace.shapes[name])
    # Attention that materialises its maps (Swin V2's cosine attention; not fused attention,
    # whose attn_drop never runs) keeps scores, biased scores and softmax for the backward.
    for name, shape in trace.shapes.items():
        if name.endswith("attn_drop"):
            leaf_sizes[f"{name}.(attention maps)"] = 3 * _elements(shape)
    inside = {b: sum(s for n, s in leaf_sizes.items() if n.startswith(b + ".")) for b in blocks}
    in_any_block = {n for n in leaf_sizes if any(n.startswith(b + ".") for b in blocks)}
    largest_layer = max((sum(p.numel() for p in m.parameters(recurse=False))
                         for m in model.modules()), default=0)
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()),
        largest_layer=largest_layer,
        leaf_outputs=sum(leaf_sizes.values()),
        largest_leaf_output=max(leaf_sizes.values(), default=0),
        blocks=len(blocks),
        block_outputs=sum(_elements(trace.shapes[b]) for b in blocks),
        largest_block_leaves=max(inside.values(), default=0),
        outside_blocks=sum(s for n, s in leaf_sizes.items() if n not in in_any_block),
        supports_checkpointing=family.supports_grad_checkpointing(model) and bool(blocks),
    )


def traced_facts(model: nn.Module, recipe: ModelRecipe, shape: InputShape) -> ModelFacts:
    """Facts of a meta-device model (a fresh trace: the plan keeps only the teacher's)."""
    model.train()  # drop path and dropout as in training (and as trace shapes are the same)
    family = recipe.family
    return model_facts(model, tracing.trace(model, family, family.example_input(model, shape)),
                       family)


def objective_memory(plan: StagePlan) -> tuple[float, str]:
    """Bytes per sample that the stage's objectives hold, by their own account."""
    total, notes = 0.0, []
    for config in plan.spec.objectives:
        with torch.device("meta"):
            objective = build_objective(config, plan.models.tap_shapes)
        per_sample, how = objective.memory_per_sample()
        total += per_sample
        notes.append(f"{config.label}: {how}")
    return total, "; ".join(notes)


# ---------------------------------------------------------------------------- estimate

def student_model_states(params: int, largest_layer: int, s: Settings) -> tuple[float, str]:
    """Parameters + gradients + Adam states per rank, by DeepSpeed's estimators for 16-bit
    mixed precision, by our own byte count for fp32 (which they do not cover)."""
    n = s.world_size
    nodes, per_node = (n // 8, 8) if n > 8 and n % 8 == 0 else (1, n)
    if s.zero_stage == 0:
        # Plain data parallelism: everything on every rank. bf16 goes through DeepSpeed's
        # BF16_Optimizer (bf16 parameters and gradients, fp32 master copy and gradients).
        per_param = 16 + (4 if s.param_bytes == 2 else 0) - (8 if s.offload_optimizer else 0)
        return per_param * params, f"ZeRO-0: {per_param} B/param on every rank"
    if s.param_bytes == 2:
        if s.zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            _, device, _ = estimate_zero3_model_states_mem_needs(
                params, largest_layer, num_gpus_per_node=per_node, num_nodes=nodes,
                cpu_offload=s.offload_optimizer, cpu_offload_params=False, zero_init=False)
            return device, "DeepSpeed estimate_zero3_model_states_mem_needs"
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        _, device = estimate_zero2_model_states_mem_needs(
            params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=s.offload_optimizer)
        return device, "DeepSpeed estimate_zero2_model_states_mem_needs"
    # fp32: 4 B parameters, 4 B gradients, 8 B Adam moments; offload moves the moments off.
    # ZeRO-1/2 also keep their own fp32 copy of the rank's partition (and its gradient),
    # cloned even when the model is fp32 already; ZeRO-1 holds the whole gradient as well.
    optimizer = 0 if s.offload_optimizer else 8
    if s.zero_stage == 3:
        return 4 * largest_layer + (8 + optimizer) * params / n, "fp32: (4+4+8) B/param / N"
    if s.zero_stage == 1:
        return (8 * params + (8 + optimizer) * params / n,
                "fp32: (4+4) B/param + (4+4+8) B/param / N")
    return 4 * params + (8 + optimizer) * params / n, "fp32: 4 B/param + (4+4+8) B/param / N"


def estimate(plan: StagePlan, s: Settings, student: ModelFacts, teacher: ModelFacts | None,
             knobs: DeepSpeedKnobs, budget: float | None,
             objectives: tuple[float, str] = (0.0, "")) -> StageMemory:
    lines: list[Line] = []
    b = s.micro_batch
    if teacher is not None and s.teacher_sharded:
        shard = teacher.params * s.teacher_bytes / s.world_size
        # Gathered at once: up to max_live parameters (prefetched ones included), and the
        # layer that crosses that limit.
        in_flight = min(knobs.teacher_max_live + teacher.largest_layer, teacher.params)
        lines.append(Line("teacher shard", shard + in_flight * s.teacher_bytes,
                          f"{teacher.params / 1e6:,.0f} M params x {s.teacher_bytes} B / "
                          f"{s.world_size} + {in_flight / 1e6:,.1f} M gathered at once "
                          f"(max live parameters + a layer)"))
    elif teacher is not None:
        lines.append(Line("teacher (replicated)", teacher.params * s.teacher_bytes,
                          f"{teacher.params / 1e6:,.0f} M params x {s.teacher_bytes} B on "
                          f"every rank, no ZeRO"))
    if teacher is not None:
        taps = sum(_elements(shape) for shape in plan.models.tap_shapes.teacher.values())
        live = (2 * teacher.largest_leaf_output + taps) * b * s.teacher_bytes
        lines.append(Line("teacher activations", live, "no-grad forward: ~2 layer outputs live, "
                          "plus the taps kept for the loss"))
    if objectives[0]:
        lines.append(Line("objective", objectives[0] * b, objectives[1]))
    states, how = student_model_states(student.params, student.largest_layer, s)
    offload = ", optimizer offloaded to CPU" if s.offload_optimizer else ""
    lines.append(Line("student params+grads+Adam", states,
                      f"{student.params / 1e6:,.1f} M params, ZeRO-{s.zero_stage}{offload}; {how}"))
    if s.checkpointing:
        kept = student.block_outputs + student.outside_blocks + student.largest_block_leaves
        note = (f"checkpointed: {student.blocks} block inputs + one block recomputed + "
                "layers outside blocks")
    else:
        kept = student.leaf_outputs
        note = "every layer output kept for the backward"
    activations = kept * b * s.param_bytes
    lines.append(Line("student activations", activations, f"{note}; micro-batch {b}"))
    # torch AdamW on DeepSpeed's flat fp32 partition makes whole-partition temporaries
    # (denominator, its quotient) and clipping another; they come after the backward has
    # freed the activations, so only their excess over the activations raises the peak.
    temporaries = 0 if s.offload_optimizer else 3 * 4 * student.params / (
        s.world_size if s.zero_stage >= 1 else 1)
    lines.append(Line("optimizer step temporaries", max(0.0, temporaries - activations),
                      "3 fp32 copies of the rank's partition, beyond the freed activations"))
    grad_bytes = s.param_bytes
    comm = min(knobs.reduce_bucket, student.params) * grad_bytes
    if s.zero_stage == 3:
        comm += min(knobs.student_prefetch, student.params) * s.param_bytes
        comm_note = "reduce bucket + student prefetch bucket"
    else:
        comm += min(knobs.allgather_bucket, student.params) * s.param_bytes
        comm_note = "reduce bucket + all-gather bucket"
    lines.append(Line("communication buffers", comm, comm_note))
    return StageMemory(plan.name, s, lines, budget)


# ---------------------------------------------------------------------------- advice

def advise(plan: StagePlan, memory: StageMemory, student: ModelFacts,
           teacher: ModelFacts | None, knobs: DeepSpeedKnobs,
           objectives: tuple[float, str]) -> list[str]:
    """Single changes that make a stage fit, cheapest first."""
    s, budget = memory.settings, memory.budget

    def fits(**change: Any) -> bool:
        return estimate(plan, replace(s, **change), student, teacher, knobs, budget,
                        objectives).fits

    advice = []
    if not s.checkpointing and student.supports_checkpointing and fits(checkpointing=True):
        advice.append("turn on activation checkpointing (student.grad_checkpointing: true)")
    for micro in (s.micro_batch // 2 ** k for k in range(1, 12)):
        if micro >= 1 and fits(micro_batch=micro):
            accumulation = math.ceil(s.micro_batch / micro)
            advice.append(f"micro-batch {micro} (data.micro_batch_size) with "
                          f"gradient_accumulation_steps x{accumulation} for the same global batch")
            break
    if s.zero_stage != 3 and fits(zero_stage=3):
        advice.append("shard the student's parameters too: ZeRO-3 (ds_configs/student_zero3.json)")
    if not s.offload_optimizer and fits(offload_optimizer=True):
        advice.append("offload the optimizer to CPU memory (ds_configs/student_zero3_offload.json)")
    for world in (s.world_size * 2 ** k for k in range(1, 13)):
        if fits(world_size=world):
            advice.append(f"{world} GPUs (--num_gpus / hostfile)")
            break
    if not advice:
        together = replace(s, checkpointing=student.supports_checkpointing, micro_batch=1,
                           zero_stage=3, offload_optimizer=True)
        if estimate(plan, together, student, teacher, knobs, budget, objectives).fits:
            advice.append("no single change is enough; checkpointing + micro-batch 1 + ZeRO-3 "
                          "+ optimizer offload together fit")
        else:
            advice.append("even checkpointing + micro-batch 1 + ZeRO-3 + offload do not fit: "
                          "more GPUs with those settings, or a GPU with more memory")
    return advice


def stage_facts(plan) -> StageFacts:
    """``plan``: a StagePlan, or a RecordPlan (the teacher alone)."""
    stage = plan.spec
    if plan.refs.student is None:  # a recording stage
        teacher_model = plan.models.tap_shapes.teacher_model
        return StageFacts(None, traced_facts(teacher_model, plan.teacher, plan.input_shape), (0.0, ""))
    with torch.device("meta"):
        student_model = plan.student.family.create(plan.student, stage.student.drop_path_rate)
    student = traced_facts(student_model, plan.student, plan.input_shape)
    teacher = None
    if plan.teacher is not None:
        teacher_model = plan.models.tap_shapes.teacher_model  # already pruned to the deepest tap
        teacher = traced_facts(teacher_model, plan.teacher, plan.input_shape)
    student = replace(student, params=student.params + plan.models.head_params)
    recorded = None
    if plan.refs.targets is not None:  # what a live teacher would have cost: --plan says
        recorded = traced_facts(plan.models.tap_shapes.teacher_model, plan.refs.targets.teacher,
                                plan.input_shape)
    return StageFacts(student, teacher, objective_memory(plan), recorded)


def estimate_recording(plan, teacher: ModelFacts, sharded: bool, world_size: int,
                       teacher_bytes: int, max_live: int, budget: float | None) -> StageMemory:
    """A recording stage per rank: the teacher (replicated or sharded, as ``estimate``
    counts it), its no-grad activations, and one batch of records on the host."""
    from data_shards.targets import record_bytes
    b = plan.spec.data.micro_batch_size
    lines = []
    if sharded:
        in_flight = min(max_live + teacher.largest_layer, teacher.params)
        lines.append(Line("teacher shard", teacher.params * teacher_bytes / world_size
                          + in_flight * teacher_bytes,
                          f"{teacher.params / 1e6:,.0f} M params x {teacher_bytes} B / {world_size} "
                          f"+ {in_flight / 1e6:,.1f} M gathered at once"))
    else:
        lines.append(Line("teacher (replicated)", teacher.params * teacher_bytes,
                          f"{teacher.params / 1e6:,.0f} M params x {teacher_bytes} B on every rank"))
    taps = sum(_elements(shape) for shape in plan.models.tap_shapes.teacher.values())
    lines.append(Line("teacher activations", (2 * teacher.largest_leaf_output + taps) * b * teacher_bytes,
                      "no-grad forward: ~2 layer outputs live, plus the taps recorded"))
    lines.append(Line("records of a batch (host)", 2 * b * record_bytes(plan.stores),
                      "the stored forms of one batch, and their encoded bytes"))
    settings = Settings(world_size=world_size, micro_batch=b, checkpointing=False, zero_stage=0,
                        offload_optimizer=False, param_bytes=teacher_bytes, teacher_bytes=teacher_bytes,
                        teacher_sharded=sharded)
    return StageMemory(plan.name, settings, lines, budget)


def settings_for(plan: StagePlan, world_size: int, teacher, student,
                 accelerator_bf16: bool = True) -> tuple[Settings, DeepSpeedKnobs]:
    """Settings and buffer sizes for the given placements (``placement.Placement``)."""
    stage = plan.spec
    zero_s = resolved_zero(student.config, stage.deepspeed.student_overrides, student.defaults)
    zero_t = (resolved_zero(teacher.config, stage.deepspeed.teacher_overrides, teacher.defaults)
              if teacher is not None else {})
    knobs = DeepSpeedKnobs(
        reduce_bucket=int(zero_s.get("reduce_bucket_size", 5e8)),
        allgather_bucket=int(zero_s.get("allgather_bucket_size", 5e8)),
        student_prefetch=int(zero_s.get("stage3_prefetch_bucket_size", 5e7)),
        teacher_prefetch=int(zero_t.get("stage3_prefetch_bucket_size", 5e7)),
        teacher_max_live=int(zero_t.get("stage3_max_live_parameters", 1e9)))
    offload = zero_s.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    settings = Settings(
        world_size=world_size, micro_batch=stage.data.micro_batch_size,
        checkpointing=stage.student.grad_checkpointing, zero_stage=int(zero_s.get("stage", 0)),
        offload_optimizer=offload,
        param_bytes=dtype_bytes(stage.student.dtype, accelerator_bf16),
        teacher_bytes=dtype_bytes(stage.teacher.dtype if stage.teacher else "auto", accelerator_bf16),
        teacher_sharded=teacher is not None and teacher.sharded)
    return settings, knobs
