"""Where each model of a stage lives, chosen per model from the memory plan.

``deepspeed.teacher_config`` and ``deepspeed.student_config`` are ``auto`` by default: each
model gets the cheapest placement whose planned memory fits one device (the memory the spec
states in ``deepspeed.device_memory``, ``--gpu-memory`` for ``--plan``, else the device's own):

- the teacher is **replicated** (a plain module in its dtype on every rank: no DeepSpeed
  engine, no gathers) when the stage fits that way with the student at its leanest; else
  it is **ZeRO-3 sharded** (``ds_configs/teacher_zero3_inference.json``), with how much of
  it may be gathered at once sized from its largest layer (``memory.teacher_working_set``);
- the student, beside that teacher, gets the first of these that fits: on one rank
  **ZeRO-0** (there is nothing to shard, and every ZeRO stage costs hooks and copies);
  on several ranks ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 with the optimizer offloaded to CPU.

A config file named in the spec wins over the choice (a teacher config of a stage below 3
means replicated: ZeRO-1/2 have nothing to do for a model without an optimizer). The
choice depends only on the spec, the world size and the device's total memory, so a
resumed run makes the same one and finds its checkpoint's layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from distill_engine.spec.units import gib, parse_bytes

from .job import (JobPlan, Placement, StageFacts, StageMemory, StagePlacement, StagePlan,
                  config_stage)
from .memory import USABLE_FRACTION, advise, estimate, settings_for, teacher_working_set

CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
TEACHER_SHARDED = CONFIGS / "teacher_zero3_inference.json"
# The student's placements, cheapest first (the order auto placement tries them in).
STUDENT_CONFIGS = {
    "ZeRO-0": CONFIGS / "student_zero0.json",
    "ZeRO-1": CONFIGS / "student_zero1.json",
    "ZeRO-2": CONFIGS / "student_zero2.json",
    "ZeRO-3": CONFIGS / "student_zero3.json",
    "ZeRO-3 + optimizer offload": CONFIGS / "student_zero3_offload.json",
}


def device_memory(stated: str | None, local_ranks: int) -> tuple[int, str]:
    """Bytes of one device, and where the figure came from. The total, never what is free
    now: the choice must come out the same when the run is resumed."""
    if stated:
        return parse_bytes(stated), f"deepspeed.device_memory {stated}"
    import torch
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return total, f"this GPU's {gib(total)}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // local_ranks, f"this machine's {gib(ram)} RAM / {local_ranks} local rank(s)"


def usable_memory(plan, world_size: int, gpu_memory: int | None) -> tuple[float, str]:
    """The bytes a rank may plan with (USABLE_FRACTION of its device's), and where the
    device's size came from: --gpu-memory, deepspeed.device_memory, the GPU or the RAM
    shared by the ranks on this machine."""
    # Ranks sharing this machine (DeepSpeed's launcher says LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE).
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if gpu_memory:
        total, how = gpu_memory, f"--gpu-memory {gib(gpu_memory)}"
    else:
        total, how = device_memory(plan.spec.deepspeed.device_memory, max(local, 1))
    return total * USABLE_FRACTION, how


def _bf16(accelerator_bf16: bool | None) -> bool:
    """The caller's answer to "does the accelerator have bf16?", else the accelerator's."""
    if accelerator_bf16 is None:
        from distill_engine.accelerator import accelerator_has_bf16
        return accelerator_has_bf16()
    return accelerator_bf16


def place(plan: StagePlan, world_size: int, gpu_memory: int | None = None,
          accelerator_bf16: bool | None = None, facts: StageFacts | None = None) -> StagePlacement:
    """The placements of the stage's teacher and student, and the memory plan they give."""
    accelerator_bf16 = _bf16(accelerator_bf16)
    facts = facts or plan.facts
    budget, how = usable_memory(plan, world_size, gpu_memory)
    ds = plan.spec.deepspeed
    working = teacher_working_set(facts.teacher.largest_layer) if facts.teacher else {}

    def memory_with(teacher: Placement | None, student: Placement) -> StageMemory:
        settings, knobs = settings_for(plan, world_size, teacher, student, accelerator_bf16)
        return estimate(plan, settings, facts.student, facts.teacher, knobs, budget,
                        facts.objectives)

    def fits(teacher: Placement | None, student: Placement) -> tuple[bool, str]:
        memory = memory_with(teacher, student)
        return memory.fits, f"{gib(memory.total)} of {gib(budget)} usable"

    # Candidates, cheapest first; an explicit config is the only candidate.
    if ds.student_config != "auto":
        students = [Placement("student", f"ZeRO-{config_stage(ds.student_config)}",
                              ds.student_config, "deepspeed.student_config names it")]
    else:
        names = list(STUDENT_CONFIGS)
        names = names[:1] if world_size == 1 else names[1:]  # ZeRO-0 shards nothing anyway
        if world_size == 1:
            names += list(STUDENT_CONFIGS)[3:]  # ZeRO-3 (+ offload) can still offload
        students = [Placement("student", n, STUDENT_CONFIGS[n], "") for n in names]
    teachers: list[Placement | None] = [None]
    if plan.teacher is not None:
        if ds.teacher_config != "auto":
            stage = config_stage(ds.teacher_config)
            teachers = [Placement("teacher", "ZeRO-3 sharded" if stage == 3 else "replicated",
                                  ds.teacher_config if stage == 3 else None,
                                  "deepspeed.teacher_config names it",
                                  working if stage == 3 else {})]
        else:
            teachers = [Placement("teacher", "replicated", None, ""),
                        Placement("teacher", "ZeRO-3 sharded", TEACHER_SHARDED, "", working)]

    # The teacher first: replicated if the stage fits so with the leanest student.
    teacher = teachers[0]
    if teacher is not None and not teacher.why:
        ok, figure = fits(teacher, students[-1])
        if ok:
            teacher = _with_why(teacher, f"its {plan.teacher.arch} fits whole on every rank "
                                         f"({figure}, {how})")
        else:
            teacher = _with_why(teachers[1], f"replicated it would not fit ({figure}, {how}); "
                                             f"sharded across {world_size} rank(s), at most "
                                             f"{working['stage3_max_live_parameters'] / 1e6:.1f} M "
                                             f"parameters gathered at once")
    student = students[-1]
    for candidate in students:
        ok, figure = fits(teacher, candidate)
        if ok:
            student = candidate
            break
    if not student.why:
        ok, figure = fits(teacher, student)
        cheaper = students.index(student)
        reason = (f"{'the cheapest placement; ' if cheaper == 0 else 'cheaper placements do not fit; '}"
                  f"{figure}, {how}" if ok else f"nothing fits ({figure}, {how}); the leanest "
                  f"placement is taken and --plan says what would fit")
        if world_size == 1 and student.name == "ZeRO-0":
            reason = "one rank: nothing to shard, so no ZeRO hooks; " + reason
        student = _with_why(student, reason)
    return StagePlacement(teacher, student, memory_with(teacher, student), budget, how)


def place_recording(plan, world_size: int, gpu_memory: int | None = None,
                    accelerator_bf16: bool | None = None) -> StagePlacement:
    """A recording stage's teacher: replicated when it fits whole beside a batch of records,
    else ZeRO-3 sharded (or what deepspeed.teacher_config names)."""
    from .memory import dtype_bytes, estimate_recording
    accelerator_bf16 = _bf16(accelerator_bf16)
    budget, how = usable_memory(plan, world_size, gpu_memory)
    teacher = plan.facts.teacher
    working = teacher_working_set(teacher.largest_layer)
    bytes_ = dtype_bytes(plan.spec.teacher.dtype, accelerator_bf16)

    def memory(sharded: bool):
        return estimate_recording(plan, teacher, sharded, world_size, bytes_,
                                  working["stage3_max_live_parameters"], budget)

    ds = plan.spec.deepspeed
    if ds.teacher_config != "auto":
        sharded = config_stage(ds.teacher_config) == 3
        chosen = Placement("teacher", "ZeRO-3 sharded" if sharded else "replicated",
                           ds.teacher_config if sharded else None,
                           "deepspeed.teacher_config names it", working if sharded else {})
    elif memory(False).fits:
        chosen = Placement("teacher", "replicated", None,
                           f"its {plan.teacher.arch} fits whole on every rank "
                           f"({gib(memory(False).total)} of {gib(budget)} usable, {how})")
    else:
        chosen = Placement("teacher", "ZeRO-3 sharded", TEACHER_SHARDED,
                           f"replicated it would not fit ({gib(memory(False).total)} of "
                           f"{gib(budget)} usable, {how}); sharded across {world_size} rank(s)",
                           working)
    return StagePlacement(chosen, None, memory(chosen.sharded), budget, how)


def _with_why(placement: Placement, why: str) -> Placement:
    return replace(placement, why=why)


# ---------------------------------------------------------------------------- --plan

def memory_report(plan: StagePlan, world_size: int, gpu_memory: int | None = None,
                  accelerator_bf16: bool = True) -> StageMemory:
    """What ``--plan`` prints for a stage: the memory per device of the placements ``place``
    chooses against ``gpu_memory`` (or those the spec names), with notes and, when it does
    not fit, advice. From the facts traced once by ``load_plan``; bf16 by default, since
    the planner plans for GPUs."""
    facts = plan.facts
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
    act = next(line for line in other.lines if line.what == "student activations")
    memory.notes.append(f"student activations {'without' if settings.checkpointing else 'with'} "
                        f"checkpointing would be {gib(act.bytes)} (total {gib(other.total)})")
    if settings.zero_stage == 1:
        memory.notes.append("ZeRO stage 1 is counted as stage 2")
    if plan.refs.targets is not None:
        memory.notes.append(recorded_targets_note(plan, facts, settings.teacher_bytes))
    if not memory.fits:
        memory.advice = advise(plan, memory, student, teacher, knobs, objectives)
    return memory


def recorded_targets_note(plan: StagePlan, facts: StageFacts, teacher_bytes: int) -> str:
    """What reading recorded targets saves per rank (the teacher a live run would hold,
    replicated, with its no-grad activations) and what the records take on disk."""
    from data_shards.targets import TARGETS_INDEX, TargetsIndex
    recorded = facts.recorded_teacher
    b = plan.spec.data.micro_batch_size
    taps = sum(math.prod(shape[1:]) for shape in plan.models.tap_shapes.teacher.values())
    saved = recorded.params * teacher_bytes + (2 * recorded.largest_leaf_output + taps) * b * teacher_bytes
    directory = plan.refs.targets.directory
    if (Path(directory) / TARGETS_INDEX).is_file():
        disk = f"the targets take {gib(TargetsIndex.load(directory).raw.bytes)} on disk"
    else:
        disk = f"the targets are to be recorded by stage {plan.refs.targets.stage!r}"
    return (f"no teacher engine: recorded targets of {plan.refs.targets.teacher.arch} from "
            f"{directory} save {gib(saved)} per rank (the teacher replicated, "
            f"{recorded.params / 1e6:,.1f} M params, and its activations); {disk}")


def memory_reports(job: JobPlan, world_size: int, gpu_memory: int | None = None) -> list[StageMemory]:
    return [memory_report(stage, world_size, gpu_memory) if stage.refs.student is not None
            else recording_memory_report(stage, world_size, gpu_memory) for stage in job.stages]


def recording_memory_report(plan, world_size: int, gpu_memory: int | None = None) -> StageMemory:
    """--plan for a recording stage: its teacher's memory per device, and the disk the
    records take (``targets.disk_problem`` refuses a recording the disk cannot hold)."""
    from .targets import recording_bytes
    placed = place_recording(plan, world_size, gpu_memory, accelerator_bf16=True)
    memory = placed.memory
    memory.budget = gpu_memory * USABLE_FRACTION if gpu_memory else None
    memory.notes.append(placed.teacher.describe())
    size = recording_bytes(plan)
    records = f"{plan.records:,} records" if plan.records else "records"
    memory.notes.append(
        f"disk: {gib(size) if size is not None else 'unknown (no shard index)'} for {records} "
        f"({plan.spec.record.epochs} epochs) in {plan.targets_dir}: "
        + "; ".join(store.describe() for store in plan.stores))
    return memory
