"""Attention diagnostics of a ViT, as in the Feature Distillation paper (Wei et al., 2022,
section 4): per layer and head, the **average attention distance** (how far, in pixels, a
patch looks: the distance between query and key patches weighted by the attention
probability, averaged over query patches and images), and the **head similarity** (the
mean cosine similarity between the attention maps of every pair of heads of a layer; lower
is more diverse). The paper reports that distillation makes the student's heads more
diverse and their attention more local.

Both are computed over patch tokens only: the class token (and register tokens) are
dropped as queries and as keys, and each query's attention is renormalised over the patch
keys. timm's fused attention never forms the probabilities, so every attention module is
switched to its explicit path and the probabilities are read at its ``attn_drop`` (the
softmax output; dropout is off in eval mode).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's attention modules (they have ``fused_attn`` and ``attn_drop``), in order."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None),
                                                            nn.Module)]


@contextlib.contextmanager
def captured_attention(model: nn.Module):
    """Yields a dict name -> list of attention probabilities [B, heads, N, N], filled by
    each forward; restores fused attention afterwards."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no timm attention modules (a ViT's "
                         f"blocks.N.attn); attention diagnostics need a timm vision transformer")
    captured: dict[str, list[torch.Tensor]] = {name: [] for name, _ in modules}
    hooks, fused = [], {}
    for name, module in modules:
        fused[name] = module.fused_attn
        module.fused_attn = False
        hooks.append(module.attn_drop.register_forward_hook(
            lambda _module, args, _output, name=name: captured[name].append(args[0].detach())))
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()
        for name, module in modules:
            module.fused_attn = fused[name]


def patch_distances(grid: tuple[int, int]) -> torch.Tensor:
    """Euclidean distances between the centres of every pair of patches, in patches
    ([N, N] with N = rows x columns, row-major as a ViT orders its tokens)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    return torch.cdist(positions, positions)


def layer_statistics(attention: torch.Tensor, prefix_tokens: int,
                     distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For attention [B, heads, N, N]: per image and head the mean attention distance
    [B, heads] (in patches), and per image the mean pairwise cosine similarity between the
    heads' attention maps [B] (NaN with one head)."""
    patches = attention[:, :, prefix_tokens:, prefix_tokens:].float()
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    distance = (patches * distances).sum(-1).mean(-1)
    heads = patches.shape[1]
    maps = torch.nn.functional.normalize(patches.flatten(2), dim=-1)
    cosine = maps @ maps.transpose(1, 2)                      # [B, heads, heads]
    off_diagonal = cosine.sum((1, 2)) - cosine.diagonal(dim1=1, dim2=2).sum(-1)
    similarity = off_diagonal / (heads * (heads - 1)) if heads > 1 else torch.full(
        (patches.shape[0],), math.nan)
    return distance, similarity


@torch.no_grad()
def attention_statistics(model: nn.Module, images: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Runs ``model`` (a timm ViT, put in eval mode) on batches of images and returns the
    per-layer, per-head mean attention distance (pixels and patches) and head similarity."""
    model.eval()
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not attention_modules(model):
        raise ValueError(f"{type(model).__name__} has no patch embedding and timm attention "
                         f"modules (a ViT's blocks.N.attn); attention diagnostics need a timm "
                         f"vision transformer")
    grid = tuple(patch_embed.grid_size)
    patch_px = patch_embed.patch_size[0]
    prefix = getattr(model, "num_prefix_tokens", 1)
    distances = patch_distances(grid)
    sums: dict[str, list[torch.Tensor]] = {}
    samples = 0
    with captured_attention(model) as captured:
        for batch in images:
            model(batch)
            for name, maps in captured.items():
                distance, similarity = layer_statistics(maps.pop(), prefix, distances)
                total = sums.setdefault(name, [torch.zeros(distance.shape[1]), torch.zeros(())])
                total[0] += distance.sum(0)
                total[1] += similarity.sum()
            samples += len(batch)
    if not samples:
        raise ValueError("no images to compute attention statistics on")
    layers = []
    for index, (name, (distance, similarity)) in enumerate(sums.items()):
        per_head = (distance / samples).tolist()
        layers.append({"layer": index, "module": name,
                       "mean_distance_px": [d * patch_px for d in per_head],
                       "mean_distance_patches": per_head,
                       "head_similarity": (similarity / samples).item()})
    # The reference: the distance of a head that attends to every patch alike.
    uniform = distances.mean().item()
    return {"grid": list(grid), "patch_size_px": patch_px, "prefix_tokens": prefix,
            "samples": samples, "uniform_distance_px": uniform * patch_px, "layers": layers}
