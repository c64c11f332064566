"""What every objective is: a typed config, the taps it reads, and a loss module.

An objective is a pair:
- a pydantic config (``kind`` picks the class; ``weight`` scales the term), which names the
  taps it reads from the student and the teacher;
- an ``nn.Module`` built from that config and the tap shapes of a meta-device build of both
  models. It lives inside the student engine, so any trainable head it owns (FD's
  projection) is trained, sharded and checkpointed with the student.

The runtime knows nothing about individual objectives: it asks each config for its taps,
runs the models, and sums ``weight * objective(student_taps, teacher_taps, batch)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # weight: .inf is no weight

    kind: str
    weight: float = Field(1.0, ge=0.0, description="multiplier of this term in the total loss")
    name: str | None = Field(None, description="label in logs; defaults to kind")

    # Whether the objective needs a teacher at all (cross_entropy does not).
    needs_teacher: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return self.name or self.kind

    def student_taps(self) -> list[str]:
        return []

    def teacher_taps(self) -> list[str]:
        return []


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


class ObjectiveError(ValueError):
    """A config that cannot work with these models (wrong dims, unmatched token layouts)."""


class Objective(nn.Module):
    """Base class: ``forward(student_taps, teacher_taps, batch) -> scalar loss``."""

    Config: ClassVar[type[ObjectiveConfig]]

    def __init__(self, config: ObjectiveConfig, shapes: TapShapes):
        super().__init__()
        self.config = config

    def forward(self, student_taps: dict[str, Any], teacher_taps: dict[str, Any],
                batch: dict[str, Any]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


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
