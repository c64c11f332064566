"""Calling a Hugging Face masked autoencoder (``ViTMAEForPreTraining``, ``ViTMAEModel``) with
the mask ratio the objective chose, including no masking at all.

ViTMAE masks inside its embeddings: ``random_masking`` keeps ``int(L * (1 - mask_ratio))``
patches, reading ``config.mask_ratio`` at call time, and keeps the patches with the lowest
``noise`` (``argsort(noise)``). There is no argument that turns masking off, so an input
that carries ``MASK_RATIO`` is run with that ratio set on the config for the duration of the
call. With ratio 0 the encoder alone runs (the decoder's loss would divide by a mask of
zeros) on identity-order noise, so that the tokens come out in patch order: CLS, then
every patch, ``L + 1`` tokens.

Models without a mask ratio (a ViT fine-tuned from an MAE encoder, BERT) ignore the key:
they never mask, so they are already "unmasked".
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

# The key of an input dict that sets the model's mask ratio for one call (0: unmasked).
MASK_RATIO = "mask_ratio"


def masks_inside(model: nn.Module) -> bool:
    """Whether the model masks its input itself (a ViTMAE model)."""
    return hasattr(getattr(model, "config", None), "mask_ratio")


@contextmanager
def mask_ratio_set(model: nn.Module, ratio: float) -> Iterator[None]:
    """``config.mask_ratio`` is ``ratio`` inside the block (the embeddings share the config
    object with the model) and what it was afterwards."""
    config = model.config
    before = config.mask_ratio
    config.mask_ratio = ratio
    try:
        yield
    finally:
        config.mask_ratio = before


def identity_noise(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Noise whose argsort is the identity: every patch kept, in patch order."""
    batch, _, height, width = pixel_values.shape
    patches = (height // patch_size) * (width // patch_size)
    return torch.arange(patches, device=pixel_values.device).expand(batch, patches)


def forward(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """Runs ``model`` on ``inputs`` (``pixel_values``, optional ``noise``) with the mask
    ratio ``inputs[MASK_RATIO]``."""
    inputs = dict(inputs)
    ratio = float(inputs.pop(MASK_RATIO))
    if not masks_inside(model):
        inputs.pop("noise", None)
        return model(**inputs)
    if ratio == 0.0:
        inputs["noise"] = identity_noise(inputs["pixel_values"], model.config.patch_size)
        # ViTMAEForPreTraining keeps its encoder as .vit; a ViTMAEModel is the encoder.
        encoder = model.vit if isinstance(getattr(model, "vit", None), nn.Module) else model
        with mask_ratio_set(model, 0.0):
            return encoder(**inputs)
    with mask_ratio_set(model, ratio):
        return model(**inputs)
