"""Feature Distillation (Wei et al., "Contrastive Learning Rivals MIM in Fine-tuning via FD").

Target: the teacher's full token map after its own final norm, whitened by a non-affine
LayerNorm (eps 1e-5). Student: its final-norm token map, projected per token Cs -> Ct by a
linear layer with bias (the paper's 1x1 conv), trained here and dropped at export.
Loss: SmoothL1 with beta 2.0, averaged over all B*N*Ct elements.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Objective, ObjectiveConfig, ObjectiveError, TapNeed, TapShapes, register


def feature_distillation_loss(projected_student: torch.Tensor, teacher_tokens: torch.Tensor,
                              beta: float = 2.0, whiten_eps: float = 1e-5) -> torch.Tensor:
    """SmoothL1(beta) between projected student tokens and whitened teacher tokens, mean.
    The teacher's tokens are a target: no gradient flows into them."""
    target = F.layer_norm(teacher_tokens.detach().float(), teacher_tokens.shape[-1:], eps=whiten_eps)
    return F.smooth_l1_loss(projected_student.float(), target, beta=beta)


class FeatureConfig(ObjectiveConfig):
    kind: Literal["feature"] = "feature"
    student_tap: str = Field("norm", description="student module whose output is distilled")
    teacher_tap: str = Field("norm", description="teacher module giving the target tokens")
    beta: float = Field(2.0, gt=0.0, description="SmoothL1 transition point")
    whiten_eps: float = Field(1e-5, gt=0.0)

    def student_taps(self) -> list[str]:
        return [self.student_tap]

    def teacher_taps(self) -> list[str]:
        return [self.teacher_tap]

    def teacher_needs(self) -> list[TapNeed]:
        # All tokens; int8 with a per-token scale serves too: the target is whitened per token,
        # which leaves only the rounding of 127 steps.
        return [TapNeed(self.teacher_tap, "tokens", int8_ok=True)]


@register("feature")
class FeatureDistillation(Objective):
    Config = FeatureConfig

    def __init__(self, config: FeatureConfig, shapes: TapShapes):
        super().__init__(config, shapes)
        s_shape = shapes.student[config.student_tap]
        t_shape = shapes.teacher[config.teacher_tap]
        # [B, N, C] tokens (ViT) or a channels-last [B, H, W, C] grid (Swin's last stage):
        # the projection, the whitening and the mean all act on the last axis / all elements.
        if len(s_shape) not in (3, 4) or len(t_shape) not in (3, 4):
            raise ObjectiveError(
                f"feature distillation needs token maps [B, N, C] or [B, H, W, C]; student tap "
                f"{config.student_tap!r} gives {list(s_shape)}, teacher tap "
                f"{config.teacher_tap!r} gives {list(t_shape)}")
        if s_shape[1:-1] != t_shape[1:-1]:
            raise ObjectiveError(
                f"student tap {config.student_tap!r} has tokens {list(s_shape[1:-1])} but teacher "
                f"tap {config.teacher_tap!r} has {list(t_shape[1:-1])}; give both models the same "
                f"patch grid (image size / patch size) and the same number of prefix tokens")
        # The paper's 1x1 conv over the token map is a per-token linear layer with bias.
        self.projection = nn.Linear(s_shape[-1], t_shape[-1], bias=True)

    def memory_per_sample(self) -> tuple[float, str]:
        tokens = math.prod(self.shapes["teacher"][self.config.teacher_tap][1:])
        return 4 * 4 * tokens, "4 fp32 copies of the teacher's tokens (whitened target, projection, difference, loss)"

    def forward(self, student_taps, teacher_taps, batch, student=None):
        cfg = self.config
        projected = self.projection(student_taps[cfg.student_tap])
        return feature_distillation_loss(projected, teacher_taps[cfg.teacher_tap],
                                         beta=cfg.beta, whiten_eps=cfg.whiten_eps)
