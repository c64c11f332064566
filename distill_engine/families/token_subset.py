"""A teacher that sees a random subset of its patch tokens (MaskedKD, Son et al., "The
Role of Masking for Efficient Supervised Knowledge Distillation of Vision Transformers",
arXiv 2302.10494): for objectives that read only the teacher's class token or its pooled
tokens (``soft_label``, ``hidden``), half the patch tokens cost about half the teacher's
FLOPs; the paper finds the targets about as good for ImageNet-size images, while on 24 px
digits they were much worse (BENCHMARKS.md, "MaskedKD at micro scale").

The subset is taken right after the position embeddings, where a timm VisionTransformer
runs its ``patch_drop`` (PatchDropout, an identity unless it drops tokens in training):
every kept token carries its own position, the prefix tokens (class, registers) are always
kept. Which patches are kept is drawn from the per-step generator that the objectives'
``prepare`` receives (seeded by job seed, stage, step, micro-batch and rank), on the
teacher's device, so a resumed run draws the same subsets and nothing waits for the host.

A teacher input that carries a subset is a dict ``{PIXELS: images, KEEP: TokenSubset}``;
the timm family unpacks it (``TimmFamily.forward``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

PIXELS = "pixels"
KEEP = "keep_tokens"


@dataclass(frozen=True)
class TokenSubset:
    """Keep ``fraction`` of the patch tokens, drawn from ``generator``; without a generator,
    the first ones (a meta-device FLOP count, where no randomness is needed)."""

    fraction: float
    generator: torch.Generator | None = None


def supports(model: nn.Module | None) -> bool:
    """Whether the teacher's patch tokens can be subsampled: a timm VisionTransformer
    (its ``patch_drop`` runs between the position embeddings and the blocks)."""
    return isinstance(getattr(model, "patch_drop", None), nn.Module) and \
        isinstance(getattr(model, "num_prefix_tokens", None), int)


def kept_count(patches: int, fraction: float) -> int:
    return max(1, round(patches * fraction))


def keep(tokens: torch.Tensor, prefix: int, subset: TokenSubset) -> torch.Tensor:
    """[B, prefix + N, D] -> [B, prefix + k, D]: the prefix tokens, then k = fraction * N
    patch tokens in their original order."""
    batch, total, width = tokens.shape
    patches = total - prefix
    k = kept_count(patches, subset.fraction)
    if subset.generator is None:
        index = torch.arange(k, device=tokens.device).expand(batch, k)
    else:
        noise = torch.rand(batch, patches, generator=subset.generator,
                           device=subset.generator.device)
        index = noise.argsort(dim=1)[:, :k].sort(dim=1).values.to(tokens.device)
    chosen = tokens[:, prefix:].gather(1, index.unsqueeze(-1).expand(batch, k, width))
    return torch.cat([tokens[:, :prefix], chosen], dim=1)


@contextmanager
def tokens_kept(model: nn.Module, subset: TokenSubset) -> Iterator[None]:
    """Inside the block, every forward of ``model`` sees only ``subset`` of its patches."""
    prefix = model.num_prefix_tokens
    handle = model.patch_drop.register_forward_hook(
        lambda module, args, output: keep(output, prefix, subset))
    try:
        yield
    finally:
        handle.remove()


def with_subset(teacher_input: Any, fraction: float, generator: torch.Generator | None) -> Any:
    """The teacher's input with a subset to keep (the first one asked for wins: two
    objectives that both ask share the teacher's single pass)."""
    if isinstance(teacher_input, dict) and KEEP in teacher_input:
        return teacher_input
    return {PIXELS: teacher_input, KEEP: TokenSubset(fraction, generator)}
