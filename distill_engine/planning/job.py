"""The plan records: what planning hands to training, and all that training reads of it.

Plain data and the arithmetic over it, no checks and no building: every layer above may
import this module (the checks in ``load.py`` fill it, training reads it), like a contract.
A ``StagePlan`` is complete when ``load_plan`` returns it: references resolved, models
traced, steps counted, placement chosen and the memory estimated, each once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_shards.targets import TapStore
from distill_engine.families import InputShape, ModelRecipe
from distill_engine.modeling import tracing
from distill_engine.objectives import TapShapes
from distill_engine.spec.schema import JobSpec, RecordStageSpec, StageSpec

EXPORT_DIR = "export"
Problems = list[tuple[str, str]]


# ---------------------------------------------------------------------------- references and steps

@dataclass
class TargetsRef:
    """Recorded teacher targets a stage reads in place of a live teacher."""

    directory: Path
    teacher: ModelRecipe                   # the recorded teacher (built on the meta device only)
    stage: str | None                      # the recording stage of this job, or None (a directory)
    allow_wrap: bool = False
    weights: Path | None = None            # weights the stage names, checked against the record


@dataclass
class StageRefs:
    """A stage's models as concrete recipes (``stage:NAME`` replaced by what it names).
    ``teacher`` is the live teacher the runtime builds: None without one, and for a stage
    that reads recorded targets (``targets``); a recording stage has no ``student`` and
    writes to ``records``."""

    name: str
    dir: Path
    teacher: ModelRecipe | None
    student: ModelRecipe | None
    student_init: Path | None              # weights to start from (None: random init)
    student_taps: list[str]
    teacher_taps: list[str]
    targets: TargetsRef | None = None
    records: Path | None = None

    @property
    def export_dir(self) -> Path:
        return self.dir / EXPORT_DIR

    @property
    def traced_teacher(self) -> ModelRecipe | None:
        """The teacher whose taps the objectives read: live, or the one that was recorded."""
        return self.teacher if self.targets is None else self.targets.teacher


@dataclass
class StepCount:
    """Optimizer steps of a stage, known at plan time when the budget is in steps or the
    shard index says how many samples an epoch has."""

    total: int | None
    warmup: int | None
    batches_per_epoch: int | None


# ---------------------------------------------------------------------------- the traced models

@dataclass
class ModelSummary:
    """What the meta-device build found, for the runtime (what to prune and freeze) and for
    ``--check`` / ``--plan``."""

    tap_shapes: TapShapes
    student_params: int
    head_params: int
    teacher_params: int = 0
    teacher_params_kept: int = 0
    teacher_trace: tracing.Trace | None = None     # module order, to prune the real teacher
    pruned_teacher: list[str] = field(default_factory=list)
    frozen_params: list[str] = field(default_factory=list)     # what is actually frozen
    frozen_student: list[str] = field(default_factory=list)    # modules, for display
    student_output: tuple[int, ...] = ()                       # [B, classes] for a classifier

    @property
    def num_classes(self) -> int | None:
        """The classes the student predicts, from its output shape (None: not logits)."""
        return self.student_output[-1] if len(self.student_output) == 2 else None


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


@dataclass
class StageFacts:
    """What a plan of this stage needs from the meta-device models, traced once."""

    student: ModelFacts | None         # objective heads included: they train with it (None: recording)
    teacher: ModelFacts | None         # the pruned teacher (None: no live teacher)
    objectives: tuple[float, str]      # bytes per sample, and how they were counted
    recorded_teacher: ModelFacts | None = None  # the teacher that recorded targets replace


# ---------------------------------------------------------------------------- memory and placement

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


def config_stage(path: Path | None) -> int:
    if path is None:
        return 0
    return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))


@dataclass(frozen=True)
class Placement:
    role: str                          # "teacher" | "student"
    name: str                          # "replicated", "ZeRO-2", ...
    config: Path | None                # the DeepSpeed JSON; None: no DeepSpeed engine
    why: str
    defaults: dict[str, Any] = field(default_factory=dict)  # zero_optimization fields the file may override

    @property
    def zero_stage(self) -> int:
        return config_stage(self.config)

    @property
    def sharded(self) -> bool:
        return self.zero_stage == 3

    def describe(self) -> str:
        config = f" ({self.config.name})" if self.config else ""
        return f"{self.role}: {self.name}{config}: {self.why}"


@dataclass
class StagePlacement:
    teacher: Placement | None
    student: Placement | None          # None: a recording stage
    memory: StageMemory                # the plan of what will run, against ``budget``
    budget: float                      # usable bytes per device
    budget_how: str


# ---------------------------------------------------------------------------- the plan

def global_batch(stage: StageSpec, world_size: int) -> int:
    return (stage.data.micro_batch_size * world_size
            * stage.optimisation.gradient_accumulation_steps)


def input_shape(stage: StageSpec) -> InputShape:
    """What the models are traced on: the image side of the views, or the longest token
    sequence (memory is planned for full-length batches)."""
    text = stage.data.text
    return InputShape(image_size=stage.data.views.geometry.size,
                      **({"seq_len": text.max_length} if text is not None else {}))


class ResolvedStage:
    """What every resolved stage reads from its spec and references (a mixin of StagePlan
    and RecordPlan, whose fields ``spec`` and ``refs`` these read)."""

    spec: StageSpec | RecordStageSpec
    refs: StageRefs

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dir(self) -> Path:
        return self.refs.dir

    @property
    def export_dir(self) -> Path:
        return self.refs.export_dir

    @property
    def teacher_taps(self) -> list[str]:
        return self.refs.teacher_taps


@dataclass
class StagePlan(ResolvedStage):
    """One stage, resolved: concrete model recipes and every fact the runtime needs."""

    index: int
    spec: StageSpec
    refs: StageRefs
    world_size: int
    input_shape: InputShape
    models: ModelSummary
    steps: StepCount
    facts: StageFacts | None = None            # the traced models' sizes (load_plan, once)
    placement: StagePlacement | None = None    # where each model lives, with its memory plan

    @property
    def teacher(self) -> ModelRecipe | None:
        return self.refs.teacher

    @property
    def student(self) -> ModelRecipe:
        return self.refs.student

    @property
    def student_init(self) -> Path | None:
        return self.refs.student_init

    @property
    def student_taps(self) -> list[str]:
        return self.refs.student_taps

    @property
    def global_batch(self) -> int:
        return global_batch(self.spec, self.world_size)

    @property
    def lr(self) -> float:
        o = self.spec.optimisation
        return o.lr * self.global_batch / o.lr_base_batch if o.lr_base_batch else o.lr


@dataclass
class RecordPlan(ResolvedStage):
    """A recording stage, resolved: its teacher (traced, placed), which taps are stored and
    how (``stores``), where the records go, and how many batches an epoch has."""

    index: int
    spec: RecordStageSpec
    refs: StageRefs
    world_size: int
    input_shape: InputShape
    models: ModelSummary               # the teacher's side: tap shapes, trace, pruning
    stores: list[TapStore]
    batches_per_epoch: int | None      # None: no readable shard index (the stream counts)
    facts: StageFacts | None = None
    placement: StagePlacement | None = None

    @property
    def targets_dir(self) -> Path:
        return self.refs.records

    @property
    def teacher(self) -> ModelRecipe:
        return self.refs.teacher

    @property
    def records(self) -> int | None:
        """Records the stage writes, over all ranks and epochs."""
        if self.batches_per_epoch is None:
            return None
        return (self.spec.record.epochs * self.batches_per_epoch * self.world_size
                * self.spec.data.micro_batch_size)


@dataclass
class JobPlan:
    spec: JobSpec
    source: str
    stages: list[StagePlan | RecordPlan]
    warnings: list[tuple[str, str]] = field(default_factory=list)
