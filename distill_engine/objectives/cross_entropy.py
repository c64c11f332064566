"""Cross-entropy against the labels: trains a teacher, or fine-tunes a student."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field

from .base import Objective, ObjectiveConfig, ObjectiveError, TapShapes, register


class CrossEntropyConfig(ObjectiveConfig):
    kind: Literal["cross_entropy"] = "cross_entropy"
    student_tap: str = Field("output", description="the logits; 'output' is the model's output")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    needs_teacher: ClassVar[bool] = False
    trains_classifier: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True

    def student_taps(self) -> list[str]:
        return [self.student_tap]


@register("cross_entropy")
class CrossEntropy(Objective):
    Config = CrossEntropyConfig

    def __init__(self, config: CrossEntropyConfig, shapes: TapShapes):
        super().__init__(config, shapes)
        shape = shapes.student[config.student_tap]
        if len(shape) != 2 or shape[-1] < 2:
            raise ObjectiveError(
                f"cross_entropy needs logits [B, classes] at student tap "
                f"{config.student_tap!r}, which gives {list(shape)}; give the student "
                f"num_classes >= 2")

    def forward(self, student_taps, teacher_taps, batch, student=None):
        if "label" not in batch:
            raise KeyError("cross_entropy needs labelled data: the batch has no 'label'")
        logits = student_taps[self.config.student_tap].float()
        return F.cross_entropy(logits, batch["label"], label_smoothing=self.config.label_smoothing)
