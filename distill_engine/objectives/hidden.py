"""Hidden-state matching, the self-distillation term of Lee et al. (ICLR 2023):

    L_hidden = (1/B) sum_i || h_s(x_i) - h_t(x_i) ||^2

h is one token of the final (LayerNorm'd) hidden states: the first (CLS) token by default,
or the mean of all tokens. The teacher is the further pre-trained model, the target
(detached). Both sides see the whole, **unmasked** input: the student in a second forward
pass in the same step (beside the masked pass that ``mae`` trains on), the teacher in its
only pass. For a ViTMAE model "unmasked" means mask ratio 0 at call time and identity-order
noise (``families.masking``); a ViT or BERT model never masks, and is called as it is.

The taps may be any module that outputs [B, N, D] tokens (ViTMAE / ViT ``vit.layernorm``,
BERT's ``encoder``, whose output record stands for its last hidden state).

A masking objective that replaces the student's tokens in the batch (masked language
modelling) keeps the tokens it replaced (``inputs.ORIGINAL_STUDENT``), and ``hidden`` reads
those, so the objectives may come in either order; ``mae`` leaves the pixels as they are (the
model masks them).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from distill_engine.families.masking import MASK_RATIO, masks_inside
from distill_engine.modeling.inputs import model_inputs, original_student_inputs, to_model

from .base import RECORDED_TAPS, Objective, ObjectiveConfig, ObjectiveError, TapNeed, TapShapes, register
from .soft_label import check_teacher_tokens, teacher_subset

# Where prepare() keeps the student's unmasked input for the second pass.
UNMASKED_STUDENT = "hidden/unmasked_student"


def hidden_state_distance(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance summed over the hidden dimension, averaged over the batch;
    both [B, D]; no gradient into the teacher's side. Computed in float32."""
    difference = student_hidden.float() - teacher_hidden.detach().float()
    return (difference ** 2).sum(dim=-1).mean()


def select_token(tokens: torch.Tensor, token: str) -> torch.Tensor:
    """[B, N, D] -> [B, D]: the first token (CLS), or the mean of all tokens."""
    return tokens[:, 0] if token == "first" else tokens.mean(dim=1)


def unmasked(inputs: Any, masks_inside: bool) -> Any:
    """The input a model sees without masking. A model that masks inside (ViTMAE) gets its
    pixels with mask ratio 0, so that it keeps every patch; any other model gets its input
    as it is (an ``mae`` noise entry dropped)."""
    pixels = inputs["pixel_values"] if isinstance(inputs, dict) and "pixel_values" in inputs \
        else inputs
    if masks_inside:
        return {"pixel_values": pixels, MASK_RATIO: 0.0}
    return pixels if isinstance(inputs, dict) and MASK_RATIO in inputs else inputs


class HiddenConfig(ObjectiveConfig):
    kind: Literal["hidden"] = "hidden"
    student_tap: str = Field("vit.layernorm", description="final normalised hidden states "
                             "[B, N, D] of the student (ViTMAE/ViT: vit.layernorm; BERT: encoder)")
    teacher_tap: str = Field("vit.layernorm", description="the same for the teacher")
    token: Literal["first", "mean"] = Field("first", description="first (CLS) token, or the "
                                            "mean of all tokens")
    teacher_tokens: float = Field(
        1.0, gt=0.0, le=1.0, description="fraction of its patch tokens a ViT teacher sees, a "
        "random subset drawn per step (MaskedKD: 0.5); 1 = all")

    def student_taps(self) -> list[str]:
        return [self.student_tap]

    def teacher_taps(self) -> list[str]:
        return [self.teacher_tap]

    def teacher_needs(self) -> list[TapNeed]:
        return [TapNeed(self.teacher_tap, "token", token=self.token)]

    def live_teacher_input(self, inputs: Any, teacher_model) -> Any:
        return unmasked(inputs, masks_inside(teacher_model))  # as prepare() gives a live teacher


def _encoder_activations(model, tap_tokens: int) -> tuple[int, str] | None:
    """Elements per sample that an unmasked encoder pass keeps for the backward, roughly:
    per layer, its [N, D] tensors (2 norms, q, k, v, attention output and projection, 2
    residual sums, the MLP's output) and its [N, I] ones (the MLP's hidden layer and its
    activation). N: every patch and CLS for a masked autoencoder, else the tap's tokens."""
    config = getattr(model, "config", None)
    layers, width = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not (isinstance(layers, int) and isinstance(width, int)):
        return None
    inner = getattr(config, "intermediate_size", 4 * width)
    if masks_inside(model):
        tokens = (config.image_size // config.patch_size) ** 2 + 1
    else:
        tokens = tap_tokens
    return (layers * tokens * (10 * width + 2 * inner),
            f"~{layers} layers x N={tokens} x (10 D + 2 I) with D={width}, I={inner}")


@register("hidden")
class HiddenStateMatching(Objective):
    Config = HiddenConfig

    def __init__(self, config: HiddenConfig, shapes: TapShapes):
        super().__init__(config, shapes)
        student = shapes.student[config.student_tap]
        teacher = shapes.teacher[config.teacher_tap]
        if len(student) != 3 or len(teacher) != 3:
            raise ObjectiveError(
                f"hidden needs token sequences [B, N, D] on both sides; student tap "
                f"{config.student_tap!r} gives {list(student)}, teacher tap "
                f"{config.teacher_tap!r} gives {list(teacher)}. Tap the final LayerNorm "
                f"(ViTMAE/ViT: vit.layernorm) or a BERT encoder")
        if student[-1] != teacher[-1]:
            raise ObjectiveError(
                f"hidden compares hidden states without a projection, so both need the same "
                f"width; the student's {config.student_tap!r} has {student[-1]}, the teacher's "
                f"{config.teacher_tap!r} {teacher[-1]} (self-distillation uses one architecture)")
        self.width = student[-1]
        # Which side must be told not to mask (read from the meta-built models).
        self.masks_inside = {"student": masks_inside(shapes.student_model),
                             "teacher": masks_inside(shapes.teacher_model)}
        self.second_pass = _encoder_activations(shapes.student_model, student[1])
        check_teacher_tokens(config, shapes)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        batch = {**batch, UNMASKED_STUDENT: unmasked(original_student_inputs(batch),
                                                     self.masks_inside["student"])}
        if RECORDED_TAPS in batch:  # recorded targets: no teacher runs
            return batch
        batch["teacher"] = unmasked(model_inputs(batch, "teacher"), self.masks_inside["teacher"])
        return teacher_subset(batch, self.config.teacher_tokens, generator)

    def forward(self, student_taps, teacher_taps, batch, student=None):
        if student is None:
            raise ObjectiveError("hidden needs a second, unmasked student pass: call it with "
                                 "the student (StudentModel passes its run method)")
        first_pass = student_taps[self.config.student_tap]
        # The second pass takes the model's dtype, as the runtime casts the first pass's input.
        inputs = to_model(batch[UNMASKED_STUDENT], first_pass.device, first_pass.dtype)
        student_tokens = student(inputs)[self.config.student_tap]
        teacher_tokens = teacher_taps[self.config.teacher_tap]
        if teacher_tokens.dim() == 2:  # recorded targets hold the chosen token [B, D] only
            teacher_hidden = teacher_tokens
        # (A teacher fed a subset of its tokens, MaskedKD, sees fewer on purpose.)
        elif student_tokens.shape[1] != teacher_tokens.shape[1] and self.config.teacher_tokens == 1:
            raise ObjectiveError(
                f"the unmasked student pass gave {student_tokens.shape[1]} tokens and the "
                f"teacher {teacher_tokens.shape[1]}: both must see the whole input")
        else:
            teacher_hidden = select_token(teacher_tokens, self.config.token)
        return hidden_state_distance(select_token(student_tokens, self.config.token), teacher_hidden)

    def memory_per_sample(self) -> tuple[float, str]:
        """The fp32 distance terms, and what the second, unmasked student pass keeps for the
        backward (the plan's student activations count the first, masked pass only)."""
        if self.second_pass is None:
            tokens = self.shapes["student"][self.config.student_tap][1]
            return 4 * (2 * self.width + tokens * self.width), \
                f"fp32 [D={self.width}] distance terms + the second pass's tap [N, D] (its " \
                f"other activations are not counted: the model has no layer count in its config)"
        elements, how = self.second_pass
        return 4 * (2 * self.width + elements), \
            f"second, unmasked student pass: {how}, at 4 bytes (half in bf16)"
