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

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

# The key of an input dict that sets the model's mask ratio for one call (0: unmasked).
MASK_RATIO = "mask_ratio"


def masks_inside(model: nn.Module | None) -> bool:
    """Whether the model masks its input itself: a ViTMAE model, whose embeddings have
    ``random_masking`` (not its config's ``mask_ratio``: a ViT classifier built from an MAE
    config carries that value too, and never masks)."""
    embeddings = getattr(getattr(model, "vit", model), "embeddings", None)
    return callable(getattr(embeddings, "random_masking", None))


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


def decoder_removed(model: nn.Module) -> bool:
    """A ViTMAEForPreTraining teacher pruned after its encoder (tracing.prune_after replaced
    the decoder by an identity): only the encoder can run."""
    return isinstance(getattr(model, "decoder", None), nn.Identity)


def forward(model: nn.Module, inputs: Any) -> Any:
    """Runs ``model`` on ``inputs`` (pixels, or a dict of ``pixel_values``, optional
    ``noise`` and optional ``MASK_RATIO``, None meaning the config's own ratio)."""
    inputs = dict(inputs) if isinstance(inputs, dict) else {"pixel_values": inputs}
    ratio = inputs.pop(MASK_RATIO, None)
    if not masks_inside(model):
        inputs.pop("noise", None)
        return model(**inputs)
    ratio = model.config.mask_ratio if ratio is None else float(ratio)
    # ViTMAEForPreTraining keeps its encoder as .vit; a ViTMAEModel is the encoder.
    encoder = model.vit if isinstance(getattr(model, "vit", None), nn.Module) else model
    if ratio == 0.0:
        inputs["noise"] = identity_noise(inputs["pixel_values"], model.config.patch_size)
        with mask_ratio_set(model, 0.0):
            return encoder(**inputs)
    with mask_ratio_set(model, ratio):
        return (encoder if decoder_removed(model) else model)(**inputs)


def _sin_cos_table(width: int, patches: int) -> torch.Tensor:
    """ViTMAE's fixed 2-D sin-cos position table [1, 1 + L, width] (CLS row of zeros), with
    its two halves in the order MAE's checkpoints use (as ``initialize_weights`` does)."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding
    grid = int(patches ** 0.5)
    table = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=width,
                                                   cls_token=True)
    half = table.shape[-1] // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1).unsqueeze(0)


def set_fixed_positions(model: nn.Module) -> None:
    """Writes the fixed sin-cos position tables of a freshly built ViTMAE (encoder and
    decoder), also when ZeRO-3 has already partitioned them.

    transformers 5.23 leaves the encoder's table at zeros when it builds a model from a
    config (its weight init skips ``ViTMAEEmbeddings.initialize_weights`` once the patch
    projection is marked initialised, and zeroes the decoder's), and these tables get no
    gradient, so an MAE trained from scratch would never learn where a patch is."""
    if not masks_inside(model):
        return
    encoder = model.vit if isinstance(getattr(model, "vit", None), nn.Module) else model
    params = [encoder.embeddings.position_embeddings]
    decoder = getattr(model, "decoder", None)
    if isinstance(getattr(decoder, "decoder_pos_embed", None), nn.Parameter):
        params.append(decoder.decoder_pos_embed)
    if any(p.is_meta for p in params):
        return  # a meta-device build for --check: there are no values to write
    patches = encoder.embeddings.patch_embeddings.num_patches
    partitioned = any(hasattr(p, "ds_id") for p in params)
    if partitioned:
        import deepspeed
        context = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        context = nullcontext()
    with context, torch.no_grad():
        for param in params:
            param.copy_(_sin_cos_table(param.shape[-1], patches).to(param.dtype))
