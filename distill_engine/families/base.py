"""What the runtime must know about a model family, and the registry of families.

An architecture is written ``FAMILY:NAME`` (``timm:vit_small_patch16_224``, ``hf:/models/bert``).
Each family is one module of this package holding one ``ModelFamily`` subclass, registered
with ``@register_family("prefix")``; the runtime asks the family, never the model's type,
how to build, call, checkpoint, decay and export a model. Nothing is imported by string:
timm and transformers look names up in their own registries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from distill_engine.suggest import did_you_mean
from distill_engine.tensors import first_tensor


@dataclass(frozen=True)
class InputShape:
    """What an example input for tracing needs: the image side, or the sequence length
    (the vocabulary comes from the model's own config)."""

    image_size: int = 224
    seq_len: int = 16


@dataclass(frozen=True)
class ModelRecipe:
    """Everything needed to rebuild a model: the architecture, its keyword arguments, and
    (optionally) a weights file."""

    arch: str                                  # "timm:vit_small_patch16_224" | "hf:/path/to/dir"
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None

    @property
    def prefix(self) -> str:
        return self.arch.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.arch.split(":", 1)[1]

    @property
    def family(self) -> "ModelFamily":
        return FAMILIES[self.prefix]


class ModelFamily:
    """The protocol every family implements. Methods take the model so that one family
    object serves every model of its kind."""

    prefix: ClassVar[str]

    # -- names
    def architecture_problem(self, name: str) -> str | None:
        """Why ``name`` is not an architecture of this family (with suggestions), or None."""
        raise NotImplementedError

    # -- building
    def file_sizes(self, recipe: ModelRecipe) -> tuple[Path, dict[str, Any]] | None:
        """A file of the architecture that gives model sizes beside the recipe's kwargs (an
        ``hf:DIR``'s config.json) and the values it gives, read without building anything,
        so that the size limits apply to them too; None when there is no such file."""
        return None

    def create(self, recipe: ModelRecipe, drop_path_rate: float | None = None,
               drop_path_schedule: str = "linear") -> nn.Module:
        """A randomly initialised model (weights are loaded separately). ``drop_path_rate``
        None keeps the architecture's own default (teachers)."""
        raise NotImplementedError

    def example_input(self, model: nn.Module, shape: InputShape, batch: int = 1,
                      device: str | torch.device = "meta",
                      generator: torch.Generator | None = None) -> Any:
        """An input for tracing (zeros on the meta device) or, with a generator, random
        inputs for a probe of a real model."""
        raise NotImplementedError

    def input_modality(self, model: nn.Module) -> str:
        """What the model reads: "image" (pixels) or "text" (token ids); checked against the
        shards' modality before launch."""
        return "image"

    # -- calling
    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """Calls the model on what ``inputs.model_inputs`` chose for it."""
        raise NotImplementedError

    def output_tensor(self, output: Any) -> torch.Tensor | None:
        """The tensor the model's output stands for (logits, or the last hidden state)."""
        return first_tensor(output)

    def features(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The pooled representation [B, D] that a frozen-feature evaluation (kNN) compares.
        By default the output tensor, averaged over tokens when it has them."""
        output = self.output_tensor(self.forward(model, inputs))
        return output.mean(1) if output.dim() == 3 else output.flatten(1)

    # -- training
    def supports_grad_checkpointing(self, model: nn.Module) -> bool:
        return False

    def set_grad_checkpointing(self, model: nn.Module, enabled: bool = True) -> None:
        raise ValueError(f"{type(model).__name__} has no activation checkpointing switch")

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        """Parameter names the model exempts from weight decay beyond 1-D parameters."""
        return set()

    def classifier_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """Parameter-name prefixes of the classifier, which may start fresh when a student
        is initialised from a model with another number of classes."""
        return ()

    def adapt_state_keys(self, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """A weights file's keys (to tensors or shapes) renamed to the model's, for files
        saved by a related model (a backbone without the task model's prefix). By default
        unchanged."""
        return state

    def init_extra_modules(self, model: nn.Module) -> tuple[str, ...]:
        """Module paths that a file the student starts from may hold beyond the model's own,
        left unloaded (an MAE decoder, when a classifier starts from encoder + decoder)."""
        return ()

    # -- export
    def write_export(self, state: dict[str, torch.Tensor], recipe: ModelRecipe, model: nn.Module,
                     out_dir: Path, extra: dict[str, Any]) -> Path:
        """Writes the exported student (rank 0 only); returns the weights file. By default
        ``model.safetensors`` and ``model.json`` (architecture and kwargs)."""
        import json

        from distill_engine.weights import save_safetensors
        weights = save_safetensors(state, out_dir / "model.safetensors")
        card = {"arch": recipe.arch, "kwargs": recipe.kwargs, **extra}
        (out_dir / "model.json").write_text(json.dumps(card, indent=2, default=str))
        return weights


FAMILIES: dict[str, ModelFamily] = {}


def register_family(prefix: str):
    """Class decorator: makes ``prefix:NAME`` architectures usable in job specs."""

    def wrap(cls: type[ModelFamily]) -> type[ModelFamily]:
        if prefix in FAMILIES:
            raise ValueError(f"model family {prefix!r} registered twice")
        cls.prefix = prefix
        FAMILIES[prefix] = cls()
        return cls

    return wrap


def arch_problem(arch: str) -> str | None:
    """Why ``arch`` names no architecture of a registered family, or None. (``stage:NAME``
    references are resolved by the plan, not here.)"""
    prefix, sep, name = arch.partition(":")
    if not sep or not name:
        return (f"{arch!r} is not an architecture; write FAMILY:NAME with FAMILY one of "
                f"{sorted(FAMILIES)} (or stage:NAME for an earlier stage's student)")
    if prefix not in FAMILIES:
        return (f"{prefix!r} is not a model family; families: {sorted(FAMILIES)}"
                + did_you_mean(prefix, FAMILIES, "family"))
    return FAMILIES[prefix].architecture_problem(name)
