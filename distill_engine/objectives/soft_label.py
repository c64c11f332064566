"""Soft-label distillation (Hinton et al.; the distillation step of "Well-Read Students
Learn Better"): the student matches the teacher's class distribution. Works for any pair of
classifiers with the same classes, images or text (no shared vocabulary is needed)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from distill_engine.families import token_subset
from distill_engine.modeling.inputs import model_inputs

from .base import Objective, ObjectiveConfig, ObjectiveError, TapNeed, TapShapes, register


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0, labels: torch.Tensor | None = None,
                    hard_weight: float = 0.0) -> torch.Tensor:
    """``(1 - hard_weight) * T^2 * CE(softmax(t / T), softmax(s / T))
    + hard_weight * CE(labels, s)``, averaged over the batch.

    ``CE(p, q) = -sum_c p_c log q_c`` (the cross-entropy of the paper's distillation step,
    which equals the KL divergence up to the teacher's entropy, a constant for the student).
    ``T^2`` keeps the gradient's scale independent of the temperature. Logits are [B, C]
    (or [..., C]: every leading position counts as a sample); the teacher's get no gradient.
    """
    classes = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, classes)
    t = teacher_logits.detach().float().reshape(-1, classes)
    soft = -(torch.softmax(t / temperature, -1) * torch.log_softmax(s / temperature, -1)).sum(-1)
    loss = (1.0 - hard_weight) * temperature ** 2 * soft.mean()
    if hard_weight > 0:
        if labels is None:
            raise ValueError("soft_label_loss with hard_weight > 0 needs labels")
        loss = loss + hard_weight * torch.nn.functional.cross_entropy(s, labels.reshape(-1))
    return loss


class SoftLabelConfig(ObjectiveConfig):
    kind: Literal["soft_label"] = "soft_label"
    temperature: float = Field(1.0, gt=0.0, description="softens both distributions (paper: 1)")
    hard_weight: float = Field(0.0, ge=0.0, le=1.0,
                               description="weight of the labels' cross-entropy (paper: 0)")
    student_tap: str = Field("output", description="the student's logits [B, classes]")
    teacher_tap: str = Field("output", description="the teacher's logits [B, classes]")
    teacher_tokens: float = Field(
        1.0, gt=0.0, le=1.0, description="fraction of its patch tokens a ViT teacher sees, a "
        "random subset drawn per step (MaskedKD: 0.5); 1 = all")
    # The student's classifier learns the teacher's class distribution: its accuracy is the
    # stage's measure (Well-Read Students scores the distilled student directly).
    trains_classifier: ClassVar[bool] = True

    def student_taps(self) -> list[str]:
        return [self.student_tap]

    def teacher_taps(self) -> list[str]:
        return [self.teacher_tap]

    def teacher_needs(self) -> list[TapNeed]:
        return [TapNeed(self.teacher_tap, "top_k")]  # the top k logits, the rest filled


@register("soft_label")
class SoftLabel(Objective):
    Config = SoftLabelConfig

    def __init__(self, config: SoftLabelConfig, shapes: TapShapes):
        super().__init__(config, shapes)
        student = shapes.student[config.student_tap]
        teacher = shapes.teacher[config.teacher_tap]
        if len(student) != 2 or len(teacher) != 2 or student[-1] != teacher[-1]:
            raise ObjectiveError(
                f"soft_label needs class logits [B, classes] of the same classes from both "
                f"models: the student tap {config.student_tap!r} gives {list(student)}, the "
                f"teacher tap {config.teacher_tap!r} gives {list(teacher)}; give both the same "
                f"num_classes (timm) or num_labels (hf, task: sequence_classification)")
        check_teacher_tokens(config, shapes)

    def prepare(self, batch, generator):
        return teacher_subset(batch, self.config.teacher_tokens, generator)

    def forward(self, student_taps, teacher_taps, batch, student=None):
        config = self.config
        labels = batch.get("label")
        if config.hard_weight > 0 and labels is None:
            raise KeyError("soft_label with hard_weight > 0 needs labelled data: the batch has "
                           "no 'label'")
        return soft_label_loss(student_taps[config.student_tap], teacher_taps[config.teacher_tap],
                               config.temperature, labels, config.hard_weight)


def check_teacher_tokens(config: ObjectiveConfig, shapes: TapShapes) -> None:
    """``teacher_tokens`` below 1 needs a teacher whose patch tokens can be subsampled."""
    if config.teacher_tokens < 1.0 and shapes.teacher_model is not None \
            and not token_subset.supports(shapes.teacher_model):
        raise ObjectiveError(
            f"teacher_tokens {config.teacher_tokens} (MaskedKD) feeds the teacher a subset of "
            f"its patch tokens, which needs a ViT teacher (a timm VisionTransformer: the "
            f"tokens are dropped where it runs patch_drop); this teacher, "
            f"{type(shapes.teacher_model).__name__}, has no such place: use teacher_tokens 1")


def teacher_subset(batch: dict, fraction: float, generator) -> dict:
    """The batch whose teacher input asks for ``fraction`` of its patch tokens (MaskedKD),
    drawn from this step's generator; unchanged at 1."""
    if fraction >= 1.0:
        return batch
    return {**batch, "teacher": token_subset.with_subset(model_inputs(batch, "teacher"),
                                                         fraction, generator)}
