"""timm models: ``timm:NAME`` with keyword arguments (``img_size``, ``depth``, ...)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .base import InputShape, ModelFamily, ModelRecipe, did_you_mean, register_family


@functools.cache
def _timm_names() -> frozenset[str]:
    import timm
    return frozenset(timm.list_models())


@register_family("timm")
class TimmFamily(ModelFamily):

    def architecture_problem(self, name: str) -> str | None:
        if name in _timm_names():
            return None
        return f"timm has no architecture {name!r}" + did_you_mean(name, _timm_names(), "model")

    def create(self, recipe: ModelRecipe, drop_path_rate: float | None = None,
               drop_path_schedule: str = "linear") -> nn.Module:
        """timm's stochastic depth ramps linearly over depth (FD); TinyMIM's constant rate
        spares the last block, whose output past the tapped qkv is unused."""
        import timm
        kwargs = dict(recipe.kwargs)
        if drop_path_rate is not None and (drop_path_schedule == "linear" or drop_path_rate == 0):
            kwargs["drop_path_rate"] = drop_path_rate
        model = timm.create_model(recipe.name, pretrained=False, **kwargs)
        if drop_path_rate and drop_path_schedule == "constant":
            _constant_drop_path(model, drop_path_rate, recipe.arch)
        return model

    def example_input(self, model: nn.Module, shape: InputShape, batch: int = 1,
                      device: str | torch.device = "meta",
                      generator: torch.Generator | None = None) -> Any:
        size = (batch, 3, shape.image_size, shape.image_size)
        if generator is None:
            return torch.zeros(size, device=device)
        return torch.randn(size, generator=generator).to(device)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        return model(inputs)

    def supports_grad_checkpointing(self, model: nn.Module) -> bool:
        return hasattr(model, "set_grad_checkpointing")

    def set_grad_checkpointing(self, model: nn.Module, enabled: bool = True) -> None:
        if not self.supports_grad_checkpointing(model):
            super().set_grad_checkpointing(model, enabled)
        model.set_grad_checkpointing(enabled)

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        # timm's own list: cls token, position embeddings, relative position tables.
        return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()

    def classifier_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        names = (names,) if isinstance(names, str) else tuple(names)
        return tuple(n + "." for n in names)


def _constant_drop_path(model: nn.Module, rate: float, arch: str) -> None:
    from timm.layers import DropPath
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"{arch} has no 'blocks' list; use drop_path_schedule: linear")
    for block in list(blocks)[:-1]:
        for name, child in list(block.named_children()):
            if name.startswith("drop_path"):
                setattr(block, name, DropPath(rate))
