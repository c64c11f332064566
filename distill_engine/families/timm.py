"""timm models: ``timm:NAME`` with keyword arguments (``img_size``, ``depth``, ...)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill_engine.suggest import did_you_mean

from . import token_subset
from .base import InputShape, ModelFamily, ModelRecipe, register_family


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
        if isinstance(inputs, dict) and token_subset.KEEP in inputs:  # MaskedKD's teacher
            with token_subset.tokens_kept(model, inputs[token_subset.KEEP]):
                return model(inputs[token_subset.PIXELS])
        return model(inputs)

    def features(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """What ``forward_head(x, pre_logits=True)`` returns (a ViT's final-norm CLS token or
        pooled tokens): the classifier's input, caught by a hook while the model runs through
        its own ``__call__``, where ZeRO-3 gathers its parameters (calling
        ``forward_features`` directly would find the cls token still partitioned)."""
        captured = []
        hook = model.get_classifier().register_forward_pre_hook(
            lambda module, args: captured.append(args[0]))
        try:
            self.forward(model, inputs)
        finally:
            hook.remove()
        return captured[-1]

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

    # -- export
    def write_export(self, state: dict[str, torch.Tensor], recipe: ModelRecipe, model: nn.Module,
                     out_dir: Path, extra: dict[str, Any]) -> Path:
        """``model.safetensors`` and ``config.json`` as timm's ``save_for_hf`` writes them,
        so that ``timm.create_model("local-dir:DIR", pretrained=True)`` rebuilds the student
        (architecture, kwargs, classifier) and ``resolve_data_config`` reports how it was
        fed (``extra["data_config"]``); class names from ``extra["label_names"]``. Beside
        them our card ``model.json`` (arch, kwargs, stage)."""
        from timm.models._hub import save_config_for_hf
        weights = super().write_export(state, recipe, model, out_dir, extra)
        model_config = {}
        if extra.get("label_names"):
            if len(extra["label_names"]) == model.num_classes:
                model_config["label_names"] = list(extra["label_names"])
        config = out_dir / "config.json"
        tmp = config.with_suffix(".tmp")
        # timm reads the model's attributes (pretrained_cfg, num_classes, img_size), never
        # its parameters, so the ZeRO-3 partitioned model serves as well as a gathered one.
        save_config_for_hf(model, str(tmp), model_config=model_config,
                           model_args=json.loads(json.dumps(recipe.kwargs)),
                           data_config=extra.get("data_config"))
        # The source architecture's checkpoint tag and licence describe timm's pretrained
        # weights, not these: the tag names the stage instead, the licence is the user's.
        written = json.loads(tmp.read_text())
        written["pretrained_cfg"].pop("license", None)
        written["pretrained_cfg"]["tag"] = extra.get("stage", "distilled")
        tmp.write_text(json.dumps(written, indent=2))
        os.replace(tmp, config)
        return weights


def _constant_drop_path(model: nn.Module, rate: float, arch: str) -> None:
    from timm.layers import DropPath
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"{arch} has no 'blocks' list; use drop_path_schedule: linear")
    for block in list(blocks)[:-1]:
        for name, child in list(block.named_children()):
            if name.startswith("drop_path"):
                setattr(block, name, DropPath(rate))
