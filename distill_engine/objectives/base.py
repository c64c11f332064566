"""What every objective is: a typed config, the taps it reads, and a loss module.

An objective is a pair:
- a pydantic config (``kind`` picks the class; ``weight`` scales the term), which names the
  taps it reads from the student and the teacher;
- an ``nn.Module`` built from that config and the tap shapes of a meta-device build of both
  models. It lives inside the student engine, so any trainable head it owns (FD's
  projection) is trained, sharded and checkpointed with the student.

The runtime knows nothing about individual objectives: it asks each config for its taps,
lets each objective ``prepare`` the batch (draw a mask from the step's seeded generator),
runs the models, and sums ``weight * objective(student_taps, teacher_taps, batch, student)``.
``student`` runs the student once more on other inputs (an unmasked pass beside a masked
one) and returns its taps. ``--plan`` asks each built objective for its own memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


# Batch entries of a stream that replays recorded teacher targets (data_shards.targets):
# the recorded taps, and each sample's recorded mask seed.
RECORDED_TAPS = "targets"
MASK_SEED = "mask_seed"


@dataclass(frozen=True)
class TapNeed:
    """What a student trained from recorded teacher targets needs of one teacher tap: its
    ``tokens`` whole, its logits' ``top_k``, or one ``token`` (first or mean); whether an int8
    record (a per-token scale) serves. A recording stores each tap in a form that serves
    every objective reading it (``data_shards.targets.store_problem``)."""

    tap: str
    store: str
    token: str | None = None
    int8_ok: bool = False


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # weight: .inf is no weight

    kind: str
    weight: float = Field(1.0, ge=0.0, description="multiplier of this term in the total loss")
    name: str | None = Field(None, description="label in logs; defaults to kind")

    # Whether the objective needs a teacher at all (cross_entropy does not).
    needs_teacher: ClassVar[bool] = True
    # Whether the objective trains the model's classifier against labels; a stage with
    # none of these is evaluated on its features (kNN), never on its untrained head.
    trains_classifier: ClassVar[bool] = False
    # Whether it reads the labels (then they must lie within the student's classes).
    needs_labels: ClassVar[bool] = False

    @property
    def label(self) -> str:
        return self.name or self.kind

    def student_taps(self) -> list[str]:
        return []

    def teacher_taps(self) -> list[str]:
        return []

    def teacher_needs(self) -> list[TapNeed]:
        """How each teacher tap must be recorded for this objective (default: whole)."""
        return [TapNeed(tap, "tokens") for tap in self.teacher_taps()]

    def live_teacher_input(self, inputs: Any, teacher_model: nn.Module | None) -> Any:
        """The teacher's input as this objective's ``prepare`` would leave it for a live
        teacher (a recording stage, which builds no objective, asks here); default as is."""
        return inputs


@dataclass
class TapShapes:
    """Shapes (batch included) of the taps, from a meta-device forward, and the meta-built
    models themselves, so that an objective can read attributes such as ``num_heads`` of
    the attention module that owns a qkv projection (``model.get_submodule(parent)``).
    """

    student: dict[str, tuple[int, ...]] = field(default_factory=dict)
    teacher: dict[str, tuple[int, ...]] = field(default_factory=dict)
    student_model: nn.Module | None = None
    teacher_model: nn.Module | None = None
    # The student's tokenizer directory (text stages): its mask and special tokens.
    student_tokenizer: Path | None = None


class ObjectiveError(ValueError):
    """A config that cannot work with these models (wrong dims, unmatched token layouts).
    ``field``: the config key at fault, when one is (reported at its YAML path)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# Runs the student on the given inputs and returns its taps (``output`` included).
StudentPass = Callable[[Any], dict[str, Any]]


class Objective(nn.Module):
    """Base class: ``forward(student_taps, teacher_taps, batch, student) -> scalar loss``."""

    Config: ClassVar[type[ObjectiveConfig]]

    def __init__(self, config: ObjectiveConfig, shapes: TapShapes):
        super().__init__()
        self.config = config
        self.shapes = {"student": dict(shapes.student), "teacher": dict(shapes.teacher)}

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Changes the batch before any model sees it (a mask drawn from ``generator``,
        which is seeded per step and rank, so that a resumed run draws the same). The
        default leaves it as it is."""
        return batch

    def forward(self, student_taps: dict[str, Any], teacher_taps: dict[str, Any],
                batch: dict[str, Any],
                student: StudentPass | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def memory_per_sample(self) -> tuple[float, str]:
        """Bytes per sample of the micro-batch this objective holds at its peak (for
        ``--plan``), and how they were counted. The default: four fp32 copies (cast,
        normalised, difference, loss) of every tap it reads."""
        elements = sum(_per_sample(shape) for side in self.shapes.values()
                       for shape in side.values())
        return 4 * 4 * elements, "4 fp32 copies of the taps it reads"


def sample_generators(batch: dict[str, Any], generator: torch.Generator) -> list[torch.Generator] | None:
    """One generator per sample, seeded by the mask seed its record holds, when the batch
    replays recorded targets (so a sample gets its recorded mask in every epoch that reads
    that record); None otherwise (the mask comes from the step's generator)."""
    if MASK_SEED not in batch:
        return None
    return [torch.Generator(generator.device).manual_seed(int(seed)) for seed in batch[MASK_SEED].tolist()]


def _per_sample(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if shape else 0


OBJECTIVES: dict[str, type[Objective]] = {}


def register(kind: str):
    """Class decorator: makes ``kind`` usable in job specs."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        if kind in OBJECTIVES:
            raise ValueError(f"objective {kind!r} registered twice")
        OBJECTIVES[kind] = cls
        return cls

    return wrap


def build_objective(config: ObjectiveConfig, shapes: TapShapes) -> Objective:
    return OBJECTIVES[config.kind](config, shapes)


def objective_kind_problem(kind: Any) -> str | None:
    """Why ``kind`` names no registered objective (with the nearest kind), or None."""
    import difflib
    if kind in OBJECTIVES:
        return None
    nearest = difflib.get_close_matches(str(kind), list(OBJECTIVES), n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, nearest))}?" if nearest else ""
    return f"{kind!r} is not an objective kind; kinds: {sorted(OBJECTIVES)}{hint}"
