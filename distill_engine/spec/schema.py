"""The job spec: YAML, validated by pydantic before anything expensive starts.

A job is a list of stages. The sections ``data``, ``optimisation``, ``deepspeed``,
``checkpointing`` and ``logging`` given at the top level are defaults that every stage
inherits; a stage overrides any part of them (deep merge), so a fine-tuning stage states
only what differs. A stage may take an earlier stage's exported student as its teacher
(``teacher: {arch: "stage:NAME"}``) or as its initialisation (``student: {init: "stage:NAME"}``).

A recording stage (``record: {epochs: E, ...}``, no student) runs its teacher over E epochs of
its data and writes the teacher's taps with the views that produced them; a later stage reads
them in place of a live teacher (``teacher: {targets: "stage:NAME"}``, or a directory).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_shards import TextConfig, ViewsConfig
from data_shards.decode import MAX_IMAGE_PIXELS
from distill_engine.families import FAMILIES
from distill_engine.objectives import OBJECTIVES


class Strict(BaseModel):
    # No unknown keys, and no inf/nan where a number is expected (lr: .inf passes gt=0).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------- models

ARCH_HELP = "'timm:NAME' (a timm model), 'hf:DIR' (a local Hugging Face directory) or 'stage:NAME'"
STAGE_REF = "stage:"


def _check_arch(arch: str) -> str:
    """The form FAMILY:NAME; whether NAME exists is checked with the plan."""
    prefix, sep, name = arch.partition(":")
    if not sep or not name or (prefix + ":" != STAGE_REF and prefix not in FAMILIES):
        raise ValueError(f"{arch!r} is not an architecture; use {ARCH_HELP}")
    return arch


class TeacherSpec(Strict):
    arch: str | None = Field(None, description=ARCH_HELP + "; required unless 'targets' is given")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm/transformers kwargs")
    weights: Path | None = Field(None, description="local .safetensors or torch state dict")
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    targets: str | None = Field(
        None, description="read the teacher's recorded taps instead of running it: "
                          "'stage:NAME' (a recording stage) or a directory of teacher targets")
    allow_wrap: bool = Field(False, description="with targets: a stage needing more epochs than "
                                                "were recorded reads recorded epoch e mod E")

    @field_validator("arch")
    @classmethod
    def _arch(cls, arch: str | None) -> str | None:
        return None if arch is None else _check_arch(arch)

    @model_validator(mode="after")
    def _valid(self):
        if self.targets is not None:
            if self.arch is not None or self.kwargs or "dtype" in self.model_fields_set:
                raise ValueError("a teacher read from recorded targets is not built: give "
                                 "'targets' (and optionally 'weights', checked against the "
                                 "recording, and 'allow_wrap'), not 'arch', 'kwargs' or 'dtype'")
            return self
        if self.allow_wrap:
            raise ValueError("allow_wrap applies to recorded targets only: add 'targets'")
        if self.arch is None:
            raise ValueError("a teacher needs 'arch' (or 'targets': recorded teacher targets)")
        if self.arch.startswith(STAGE_REF) and (self.weights or self.kwargs):
            raise ValueError("a teacher taken from an earlier stage gets its kwargs and "
                             "weights from that stage's export; remove 'weights' and 'kwargs'")
        return self


class StudentSpec(Strict):
    arch: str = Field(description=ARCH_HELP + "; 'stage:NAME' reuses that stage's student architecture")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str = Field("scratch", description="'scratch', a weights file, or 'stage:NAME'")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_schedule: Literal["linear", "constant"] = Field(
        "linear", description="linear: 0 -> rate over depth (timm, FD); constant: rate on every "
                              "block but the last (TinyMIM)")
    grad_checkpointing: bool = Field(False, description="activation checkpointing (timm models)")
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    freeze_unused: bool = Field(True, description="freeze parameters that no objective reaches")

    _arch = field_validator("arch")(_check_arch)

    @property
    def init_stage(self) -> str | None:
        return self.init.split(":", 1)[1] if self.init.startswith(STAGE_REF) else None


# ---------------------------------------------------------------------------- data

class DataSpec(Strict):
    train: str | list[str] = Field(description="shard directory, index file, brace pattern or urls")
    eval: str | list[str] | None = Field(None, description="held-out shards for accuracy")
    micro_batch_size: int = Field(ge=1, description="samples per rank per forward")
    global_batch_size: int | None = Field(
        None, ge=1, description="micro_batch_size x ranks x accumulation; checked against the world size")
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    samples_per_epoch: int | None = Field(None, ge=1)
    max_bad_samples: int = Field(100, ge=0)
    allow_pipe: bool = Field(False, description="permit 'pipe:' shard urls (runs a shell command)")
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, le=2 * 89_478_485,  # above that, PIL refuses to open an image
        description="larger images are bad samples, refused before they are decoded")
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    text: TextConfig | None = Field(
        None, description="text shards: the tokenizer directory (or one per role) and max_length")


# ---------------------------------------------------------------------------- optimisation

class OptimisationSpec(Strict):
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(gt=0.0, description="peak learning rate (after lr_base_batch scaling)")
    lr_base_batch: int | None = Field(
        None, ge=1, description="if set, lr is scaled by global_batch / lr_base_batch (the papers' rule)")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_epochs: float | None = Field(None, ge=0.0, description="alternative to warmup_steps")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    steps: int | None = Field(None, ge=1, description="optimizer steps in this stage")
    epochs: float | None = Field(None, gt=0.0, description="alternative to steps")
    grad_clip: float | None = Field(None, gt=0.0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss stops the run, or skips that step (no update)")
    max_consecutive_skips: int = Field(
        5, ge=1, description="with on_nonfinite: skip, stop after this many skipped steps in a row")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' or 'epochs'")
        if self.warmup_steps and self.warmup_epochs is not None:
            raise ValueError("give at most one of 'warmup_steps' or 'warmup_epochs'")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.on_nonfinite == "skip" and self.gradient_accumulation_steps > 1:
            # Earlier micro-batches of the step would already have put their gradients in
            # the engine; a step can be skipped cleanly only when it has one micro-batch.
            raise ValueError("on_nonfinite: skip needs gradient_accumulation_steps: 1")
        return self


# ---------------------------------------------------------------------------- runtime

AUTO_HELP = ("'auto' (the default): the cheapest placement whose memory plan fits the device "
             "(see distill_engine/planning/placement.py); or a DeepSpeed JSON file, which wins")


class DeepSpeedSpec(Strict):
    teacher_config: Literal["auto"] | Path = Field("auto", description=AUTO_HELP)
    student_config: Literal["auto"] | Path = Field("auto", description=AUTO_HELP)
    device_memory: str | None = Field(
        None, description="memory of one device (e.g. 80GB) that auto placement plans "
                          "against; default: the device's own (CPU ranks: RAM / local ranks)")
    device_peak_flops: float | None = Field(
        None, gt=0, description="peak FLOP/s of one device in the student's dtype (e.g. "
                                "9.89e14 for an H100's dense bf16) that MFU is reported against; "
                                "default: what a matmul achieves on the device at stage start")
    teacher_overrides: dict[str, Any] = Field(default_factory=dict)
    student_overrides: dict[str, Any] = Field(default_factory=dict)
    timeout_s: int = Field(600, ge=10, le=7 * 24 * 3600,
                           description="collective timeout: a dead rank ends the job")

    @field_validator("device_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            from .units import parse_bytes
            parse_bytes(value)  # raises ValueError with an example
        return value


class CheckpointSpec(Strict):
    every_steps: int = Field(100, ge=1)
    keep: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    resume: bool = Field(True, description="resume from the newest complete checkpoint")


class LoggingSpec(Strict):
    every_steps: int = Field(10, ge=1)
    plot: bool = Field(True, description="write a loss-curve PNG per stage and a job summary PNG")
    tensorboard: bool = Field(True, description="write TensorBoard event files under STAGE/"
                                                "tensorboard when the tensorboard package is installed")


class EvalSpec(Strict):
    """On whenever ``data.eval`` names held-out shards (``eval: null`` turns it off). The
    default evaluates once, at the end: a periodic evaluation costs a pass over the held-out
    split (and, for kNN, over the whole training split), which on large data can cost more
    than the training between two evaluations, so it is asked for with ``every_steps``."""

    at_end: bool = True
    every_steps: int | None = Field(None, ge=1, description="also evaluate every N steps")
    batch_size: int = Field(64, ge=1)
    knn_k: int = Field(20, ge=1, description="neighbours of the kNN accuracy (stages that "
                                               "train no classifier)")
    knn_temperature: float = Field(0.07, gt=0.0, description="kNN vote weight exp(cos / T)")
    loss: bool = Field(False, description="also the held-out value of each objective that needs "
                                          "no teacher (mae, mlm, cross_entropy), each sample "
                                          "masked alike at every evaluation: a pre-training "
                                          "stage's validation loss, which shows over-fitting")


def _objective_union():
    configs = tuple(cls.Config for cls in OBJECTIVES.values())
    return Annotated[Union[configs], Field(discriminator="kind")]  # type: ignore[valid-type]


ObjectiveSpec = _objective_union()


class StageSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: TeacherSpec | None = None
    student: StudentSpec
    objectives: list[ObjectiveSpec] = Field(min_length=1)  # type: ignore[valid-type]
    data: DataSpec
    optimisation: OptimisationSpec
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    eval: EvalSpec | None = Field(default_factory=EvalSpec,
                                  description="evaluation on data.eval; null: none")

    @model_validator(mode="after")
    def _teacher_when_needed(self):
        needing = [o.label for o in self.objectives if o.needs_teacher]
        if needing and self.teacher is None:
            raise ValueError(f"objectives {needing} need a teacher; add a 'teacher' section")
        if self.eval is not None and self.eval.loss and len(needing) == len(self.objectives):
            raise ValueError(f"eval.loss: every objective of the stage ({needing}) reads the "
                             f"teacher, and the held-out loss covers only those that need none "
                             f"(mae, mlm, cross_entropy); set eval.loss: false")
        return self


class RecordSpec(Strict):
    """What a recording stage writes: its teacher's taps for E epochs of its stream."""

    epochs: int = Field(ge=1, description="epochs of the stage's stream to record; a student "
                                          "stage reads recorded epoch e mod E")
    dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16", description="stored precision of the taps (top-k logits are kept in fp32)")
    int8_features: bool = Field(False, description="store the feature objective's tokens as int8 "
                                                    "with a per-token scale (half of fp16)")
    top_k: int | None = Field(None, ge=1, description="soft_label: keep the k largest logits "
                                                      "(the rest share the remaining mass); "
                                                      "null keeps every logit")
    dir: Path | None = Field(None, description="where the records go; default "
                                               "RUN_DIR/STAGE/targets")
    records_per_shard: int = Field(10_000, ge=1)


class RecordStageSpec(Strict):
    """A stage without a student: the teacher over ``record.epochs`` epochs of the stage's
    data, its taps written as teacher targets. ``objectives`` are those the students will
    train with: they decide which taps are recorded and how."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: TeacherSpec
    record: RecordSpec
    objectives: list[ObjectiveSpec] = Field(min_length=1)  # type: ignore[valid-type]
    data: DataSpec
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    checkpointing: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)

    @model_validator(mode="after")
    def _a_live_teacher(self):
        if self.teacher.targets is not None:
            raise ValueError("a recording stage records a live teacher: give its 'arch' and "
                             "'weights', not 'targets'")
        if not any(o.needs_teacher for o in self.objectives):
            raise ValueError("none of the objectives reads the teacher, so there is nothing to "
                             "record; list the objectives the students will train with")
        return self


def is_recording(raw: Any) -> bool:
    """Whether a stage as written is a recording stage (it has a ``record`` section)."""
    return isinstance(raw, dict) and "record" in raw


# Sections a recording stage does not have (no student to optimise or evaluate): the
# top-level defaults of these are not merged into it.
NOT_RECORDING = ("optimisation", "eval")


class JobHeader(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: Path = Field(description="everything the job writes goes under here")
    seed: int = 0
    stages: list[Any] = Field(min_length=1, description="validated one by one as StageSpec")


class JobSpec(JobHeader):
    stages: list[StageSpec | RecordStageSpec] = Field(min_length=1)


# Sections given once at the top level and inherited (deep-merged) by every stage.
STAGE_DEFAULTS = ("data", "optimisation", "deepspeed", "checkpointing", "logging", "eval")


def deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def with_stage_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Moves the top-level default sections into every stage (stage values win)."""
    raw = dict(raw)
    defaults = {key: raw.pop(key) for key in STAGE_DEFAULTS if key in raw}
    stages = raw.get("stages")
    if isinstance(stages, list):
        raw["stages"] = [
            {**{k: deep_merge(v, stage[k]) if k in stage else copy.deepcopy(v)
                for k, v in defaults.items()
                if not (is_recording(stage) and k in NOT_RECORDING)},
             **{k: v for k, v in stage.items() if k not in defaults}}
            if isinstance(stage, dict) else stage
            for stage in stages]
    return raw
