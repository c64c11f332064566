"""Masked autoencoding (He et al., "Masked Autoencoders Are Scalable Vision Learners"), the
further pre-training objective of self-distillation (Lee et al., ICLR 2023).

The model is Hugging Face's ``ViTMAEForPreTraining`` (``hf:DIR`` with ``task:
mae_pretraining``): encoder and decoder in one module, whose output ``logits`` are the
decoder's per-patch predictions [B, L, p*p*C]. MAE checkpoints convert to it, and its
masking and loss are those of MAE's official code. Per micro-batch this objective draws the
mask (one random permutation of the L patches per sample, from the step's seeded generator,
so that a resumed run draws the same; from each sample's recorded mask seed when the stage
reads recorded teacher targets) and hands it to the model as ViTMAE's ``noise``: the
model keeps the ``int(L * (1 - mask_ratio))`` patches of lowest noise. The noise is an
integer permutation, so no cast to the model's dtype can tie two values and change the mask.

    loss = mean over masked patches of mean over the patch's values of (pred - target)^2

with ``target`` the patch's pixels, normalised per patch by their mean and unbiased
variance (+1e-6) when ``norm_pix`` (MAE's ``norm_pix_loss``, on by default).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from distill_engine.families.masking import MASK_RATIO, masks_inside
from distill_engine.modeling.inputs import model_inputs

from .base import Objective, ObjectiveConfig, ObjectiveError, TapShapes, register, sample_generators

# ----------------------------------------------------------------------------- the math

def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] as ViTMAE (and MAE) lay it out: patches in row-major
    order, each flattened as (row, column, channel)."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = torch.einsum("nchpwq->nhwpqc", patches)
    return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


def mae_loss(predicted_patches: torch.Tensor, image_patches: torch.Tensor, mask: torch.Tensor,
             norm_pix: bool = True) -> torch.Tensor:
    """MAE's reconstruction loss. ``predicted_patches``, ``image_patches``: [B, L, D];
    ``mask``: [B, L], 1 where a patch was masked. Per patch the squared error is averaged
    over its D values, then averaged over the masked patches (in float32)."""
    target = image_patches.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's code
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((predicted_patches.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


def pixels_of(inputs: Any) -> torch.Tensor:
    """The image tensor of a model input (the tensor itself, or ``pixel_values``)."""
    return inputs["pixel_values"] if isinstance(inputs, dict) else inputs


# ----------------------------------------------------------------------------- the objective

class MAEConfig(ObjectiveConfig):
    kind: Literal["mae"] = "mae"
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="fraction of patches masked")
    norm_pix: bool = Field(True, description="targets normalised per patch (MAE's norm_pix_loss)")
    student_tap: str = Field("output", description="the decoder's predictions [B, L, p*p*C]; "
                             "'output' is ViTMAEForPreTraining's logits")
    needs_teacher: ClassVar[bool] = False

    def student_taps(self) -> list[str]:
        return [self.student_tap]


@register("mae")
class MaskedAutoencoding(Objective):
    Config = MAEConfig

    def __init__(self, config: MAEConfig, shapes: TapShapes):
        super().__init__(config, shapes)
        if not masks_inside(shapes.student_model):
            raise ObjectiveError(
                "the mae objective needs a student that masks and decodes patches itself: a "
                "Hugging Face ViTMAE model (arch 'hf:DIR' whose config.json has model_type "
                "'vit_mae', with kwargs {task: mae_pretraining})")
        model_config = shapes.student_model.config
        self.patch_size = model_config.patch_size
        self.channels = model_config.num_channels
        shape = shapes.student[config.student_tap]
        width = self.patch_size ** 2 * self.channels
        if len(shape) != 3 or shape[-1] != width:
            raise ObjectiveError(
                f"mae needs per-patch predictions [B, L, p*p*C] = [B, L, {width}] at student tap "
                f"{config.student_tap!r}, which gives {list(shape)}; use task mae_pretraining "
                f"(ViTMAEForPreTraining) and its output")
        self.patches = shape[1]
        if self.keep(self.patches) < 1:
            # No visible patch: the encoder sees nothing, and the first step's loss is not
            # finite (which would point at the learning rate).
            raise ObjectiveError(
                f"mask_ratio {config.mask_ratio} keeps int({self.patches} x (1 - "
                f"{config.mask_ratio})) = {self.keep(self.patches)} of the student's "
                f"{self.patches} patches (ViTMAE keeps int(L x (1 - mask_ratio))), so the "
                f"encoder would see none; use at most 1 - 1/{self.patches} = "
                f"{1 - 1 / self.patches:.6g} (MAE's is 0.75)", field="mask_ratio")

    def keep(self, patches: int) -> int:
        """Patches left visible: ViTMAE's ``int(L * (1 - mask_ratio))``."""
        return int(patches * (1 - self.config.mask_ratio))

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        pixels = pixels_of(model_inputs(batch, "student"))
        height, width = pixels.shape[-2:]
        patches = (height // self.patch_size) * (width // self.patch_size)
        # A random permutation per sample: the patches ranked below keep() stay visible.
        per_sample = sample_generators(batch, generator)
        if per_sample is None:
            noise = torch.rand(pixels.shape[0], patches, generator=generator, device=generator.device)
        else:  # replayed targets: each sample's recorded mask seed
            noise = torch.stack([torch.rand(patches, generator=g, device=g.device) for g in per_sample])
        noise = noise.argsort(dim=-1).to(pixels.device)
        return {**batch, "student": {"pixel_values": pixels, "noise": noise,
                                     MASK_RATIO: self.config.mask_ratio}}

    def mask(self, noise: torch.Tensor) -> torch.Tensor:
        """1 where ViTMAE removed the patch: its noise ranks at or above keep()."""
        return (noise >= self.keep(noise.shape[1])).float()

    def forward(self, student_taps, teacher_taps, batch, student=None):
        inputs = batch["student"]
        return mae_loss(student_taps[self.config.student_tap],
                        patchify(inputs["pixel_values"].float(), self.patch_size),
                        self.mask(inputs["noise"]), norm_pix=self.config.norm_pix)

    def memory_per_sample(self) -> tuple[float, str]:
        """fp32 [L, p*p*C]: the cast predictions, target, normalised target, difference and
        its square."""
        elements = self.patches * self.patch_size ** 2 * self.channels
        return 5 * 4 * elements, f"5 fp32 copies of the [L={self.patches}, p*p*C] patches"
