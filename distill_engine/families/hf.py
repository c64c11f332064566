"""Hugging Face transformers models: ``hf:DIR``, a local directory with ``config.json``
(weights, if any, are loaded by the runtime, never fetched from a hub). ``kwargs`` override
config values; ``task`` picks the head (``base``, ``masked_lm``, ``sequence_classification``,
``mae_pretraining``: ViTMAE encoder + decoder, ``image_classification``: a ViT classifier,
which also builds from an MAE config so that it can start from an MAE encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masking
from .base import InputShape, ModelFamily, ModelRecipe, register_family

TASKS = {
    "base": "AutoModel",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "mae_pretraining": "AutoModelForPreTraining",            # ViTMAEForPreTraining
    "image_classification": "AutoModelForImageClassification",
}


@register_family("hf")
class HuggingFaceFamily(ModelFamily):

    def architecture_problem(self, name: str) -> str | None:
        if (Path(name) / "config.json").is_file():
            return None
        return f"{name} is not a Hugging Face model directory (no config.json)"

    def create(self, recipe: ModelRecipe, drop_path_rate: float | None = None,
               drop_path_schedule: str = "linear") -> nn.Module:
        import transformers
        kwargs = dict(recipe.kwargs)
        task = kwargs.pop("task", "base")
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {sorted(TASKS)}")
        config = transformers.AutoConfig.from_pretrained(recipe.name, local_files_only=True)
        if task == "image_classification" and config.model_type == "vit_mae":
            # Fine-tuning an MAE encoder: the same encoder (same module names) under a ViT
            # classifier head; transformers has no MAE classification head.
            config = transformers.ViTConfig(**config.to_dict())
        for key, value in kwargs.items():
            setattr(config, key, value)
        # drop_path_rate is timm's notion; BERT-style models regularise by the dropout
        # probabilities in their config.
        model = getattr(transformers, TASKS[task]).from_config(config)
        masking.set_fixed_positions(model)  # an MAE's sin-cos tables (transformers leaves zeros)
        return model

    def example_input(self, model: nn.Module, shape: InputShape, batch: int = 1,
                      device: str | torch.device = "meta",
                      generator: torch.Generator | None = None) -> Any:
        config = model.config
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            size = (batch, getattr(config, "num_channels", 3), shape.image_size, shape.image_size)
            pixels = torch.zeros(size) if generator is None else torch.randn(size, generator=generator)
            return {"pixel_values": pixels.to(device)}
        if generator is None:
            # No attention mask for tracing: transformers inspects a mask's values, which
            # meta tensors do not have (no mask means every token is attended).
            return {"input_ids": torch.zeros(batch, shape.seq_len, dtype=torch.long, device=device)}
        ids = torch.randint(0, config.vocab_size, (batch, shape.seq_len), generator=generator)
        return {"input_ids": ids.to(device),
                "attention_mask": torch.ones(batch, shape.seq_len, dtype=torch.long, device=device)}

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        if masking.masks_inside(model) or (isinstance(inputs, dict) and masking.MASK_RATIO in inputs):
            return masking.forward(model, inputs)  # ViTMAE: the mask ratio an objective chose
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(**{model.main_input_name: inputs})

    def output_tensor(self, output: Any) -> torch.Tensor | None:
        if isinstance(output, torch.Tensor):
            return output
        for name in ("logits", "last_hidden_state"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value
        return super().output_tensor(output)

    def supports_grad_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model, "supports_gradient_checkpointing", False))

    def set_grad_checkpointing(self, model: nn.Module, enabled: bool = True) -> None:
        if not self.supports_grad_checkpointing(model):
            super().set_grad_checkpointing(model, enabled)
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    def init_extra_modules(self, model: nn.Module) -> tuple[str, ...]:
        # A ViT (classifier or encoder) starting from a ViTMAEForPreTraining export: the
        # encoder has the same module names, the MAE decoder is not part of it.
        if isinstance(getattr(model, "vit", None), nn.Module) and not masking.masks_inside(model):
            return ("decoder",)
        return ()

    def classifier_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        return ("classifier.",) if isinstance(getattr(model, "classifier", None), nn.Module) else ()
