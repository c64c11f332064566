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
loader. ``tests/test_memory_plan.py`` compares the estimate with the peak memory measured
on CPU ranks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import tracing
from .families import InputShape, ModelFamily, ModelRecipe
from .objectives import build_objective
from .plan import JobPlan, StagePlan
from .spec import deep_merge

GiB = 1024 ** 3
USABLE_FRACTION = 0.9          # headroom for CUDA context and allocator fragmentation
# Leaves whose output aliases their input (or, for dropout, is at most a 1-byte mask).
ALIASING_LEAVES = (nn.Identity, nn.Dropout)


MEMORY_UNITS = {"kb": 1024, "kib": 1024, "mb": 1024 ** 2, "mib": 1024 ** 2,
                "gb": 1024 ** 3, "gib": 1024 ** 3, "g": 1024 ** 3,
                "tb": 1024 ** 4, "tib": 1024 ** 4, "t": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '80G', '512MB', '1.5TB' -> bytes. GB is taken as GiB, as GPU
    vendors mean it ('80GB' H100s have 80 GiB). A bare number is refused: '80' would be
    80 bytes, which nobody means."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in MEMORY_UNITS:
        unit = "" if not match else (" has no unit" if not match[2] else
                                     f" has an unknown unit {match[2]!r}")
        raise ValueError(f"{text!r}{unit or ' is not a memory size'}; give a number and a "
                         f"unit, e.g. 80GB, 80GiB or 512MB")
    size = int(float(match[1]) * MEMORY_UNITS[match[2]])
    if size < 1024 ** 2:
        raise ValueError(f"{text!r} is less than 1 MiB; give the memory of one GPU, e.g. 80GB")
    return size


def memory_size(text: str) -> int:
    """``parse_bytes`` for argparse: a bad size ends the command with exit code 2."""
    import argparse
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def gib(count: float) -> str:
    return f"{count / GiB:.2f} GiB" if count >= GiB / 10 else f"{count / 1024 ** 2:.1f} MiB"


# ---------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    """The knobs the advice can turn; everything else comes from the spec."""

    world_size: int
    micro_batch: int
    checkpointing: bool
    zero_stage: int
    offload_optimizer: bool
    param_bytes: int                   # student parameters and activations: 2 (bf16) or 4
    teacher_bytes: int
    teacher_sharded: bool = True       # ZeRO-3 teacher; False: replicated, a plain module


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

@dataclass
class ModelFacts:
    """Per-sample element counts from one meta-device forward, and parameter counts."""

    params: int
    largest_layer: int                 # parameters of the largest leaf module
    leaf_outputs: int                  # every non-aliasing leaf output, summed
    largest_leaf_output: int
    blocks: int                        # number of checkpointable blocks
    block_outputs: int                 # their outputs, summed
    largest_block_leaves: int          # the leaf outputs inside the largest block
    outside_blocks: int                # leaf outputs not inside any block
    supports_checkpointing: bool


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

@dataclass
class Line:
    what: str
    bytes: float
    note: str = ""


@dataclass
class StageMemory:
    stage: str
    settings: Settings
    lines: list[Line]
    budget: float | None               # usable bytes per GPU, or None when not asked
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget


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


@dataclass
class StageFacts:
    """What a plan of this stage needs from the meta-device models, traced once."""

    student: ModelFacts                # objective heads included: they train with it
    teacher: ModelFacts | None         # the pruned teacher
    objectives: tuple[float, str]      # bytes per sample, and how they were counted


def stage_facts(plan: StagePlan) -> StageFacts:
    stage = plan.spec
    with torch.device("meta"):
        student_model = plan.student.family.create(plan.student, stage.student.drop_path_rate)
    student = traced_facts(student_model, plan.student, plan.input_shape)
    teacher = None
    if plan.teacher is not None:
        teacher_model = plan.models.tap_shapes.teacher_model  # already pruned to the deepest tap
        teacher = traced_facts(teacher_model, plan.teacher, plan.input_shape)
    student = replace(student, params=student.params + plan.models.head_params)
    return StageFacts(student, teacher, objective_memory(plan))


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


def plan_stage(plan: StagePlan, world_size: int, gpu_memory: int | None = None,
               accelerator_bf16: bool = True) -> StageMemory:
    """The memory per device of what will run: the placements ``placement.place`` chooses
    (against ``gpu_memory`` when given), or those the spec names."""
    from .placement import place
    facts = stage_facts(plan)
    placed = place(plan, world_size, gpu_memory, accelerator_bf16, facts)
    settings, knobs = settings_for(plan, world_size, placed.teacher, placed.student,
                                   accelerator_bf16)
    student, teacher, objectives = facts.student, facts.teacher, facts.objectives
    budget = gpu_memory * USABLE_FRACTION if gpu_memory else None
    memory = estimate(plan, settings, student, teacher, knobs, budget, objectives)
    for placement in (placed.teacher, placed.student):
        if placement is not None:
            memory.notes.append(placement.describe())
    other = estimate(plan, replace(settings, checkpointing=not settings.checkpointing),
                     student, teacher, knobs, budget, objectives)
    act = next(l for l in other.lines if l.what == "student activations")
    memory.notes.append(f"student activations {'without' if settings.checkpointing else 'with'} "
                        f"checkpointing would be {gib(act.bytes)} (total {gib(other.total)})")
    if settings.zero_stage == 1:
        memory.notes.append("ZeRO stage 1 is counted as stage 2")
    if not memory.fits:
        memory.advice = advise(plan, memory, student, teacher, knobs, objectives)
    return memory


def plan_job(job: JobPlan, world_size: int, gpu_memory: int | None = None) -> list[StageMemory]:
    return [plan_stage(stage, world_size, gpu_memory) for stage in job.stages]


# More memory per rank than any accelerator (or host of CPU ranks) has: a spec whose plan
# needs this is a typo (micro_batch_size: 1000000000000), refused at --check.
MAX_RANK_MEMORY = 1024 ** 4


def memory_problem(plan: StagePlan) -> str | None:
    """Why the stage cannot fit on any machine, from its memory plan, or None (also when
    the plan itself fails: a sanity bound must not make --check fail where --plan would
    report its own error; e.g. re-tracing a pruned Hugging Face teacher fails today)."""
    try:
        memory = plan_stage(plan, plan.world_size)
    except Exception:  # noqa: BLE001 - see above
        return None
    if memory.total <= MAX_RANK_MEMORY:
        return None
    return (f"stage {plan.name!r} needs {gib(memory.total)} per rank by its memory plan at "
            f"micro_batch_size "
            f"{plan.spec.data.micro_batch_size:,}, more than any accelerator or host has "
            f"({gib(MAX_RANK_MEMORY)}); 'launch/run.py --plan --gpu-memory 80GB' says what fits")
