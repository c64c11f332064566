"""The exported student: gathered from its ZeRO partitions, written in its family's format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .families import ModelRecipe
from .partitions import gathered_state_dict


def save_export(model: nn.Module, recipe: ModelRecipe, out_dir: Path,
                extra: dict[str, Any] | None = None) -> Path | None:
    """Called on every rank (the gathering is collective); rank 0 writes and returns the
    weights file, the others return None."""
    state = gathered_state_dict(model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return recipe.family.write_export(state, recipe, model, out_dir, extra or {})
