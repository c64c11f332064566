"""The exported student: gathered from its ZeRO partitions, written in its family's format,
with what a user needs to run it as it was trained (input size, normalisation, class names).

Exports are shared artefacts (a teammate's evaluation, a later stage on another node), so
every file is made group- and world-readable: safetensors and temporary files are created
0600 by some writers, which a shared filesystem then hides from everyone else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill_engine.families import ModelRecipe

from .partitions import gathered_state_dict

FILE_MODE, DIR_MODE = 0o644, 0o755


def save_export(model: nn.Module, recipe: ModelRecipe, out_dir: Path,
                extra: dict[str, Any] | None = None) -> Path | None:
    """Called on every rank (the gathering is collective); rank 0 writes and returns the
    weights file, the others return None."""
    state = gathered_state_dict(model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = recipe.family.write_export(state, recipe, model, out_dir, extra or {})
    make_readable(out_dir)
    return weights


def make_readable(directory: Path) -> None:
    """0644 files and 0755 directories under ``directory`` (itself included)."""
    os.chmod(directory, DIR_MODE)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), DIR_MODE)
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)


def preprocessing(data) -> dict[str, Any]:
    """How the student saw images at evaluation (the stage's ``data`` section): timm's data
    config keys (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
    ``crop_mode``). Evaluation takes the central square of an image and resizes it to the
    view size, which is timm's ``crop_pct: 1.0`` with a centre crop."""
    from data_shards.views import NORMALIZE

    from .evaluation import student_view
    geometry, view = data.views.geometry, student_view(data.views)
    if view.normalize == "none":
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = NORMALIZE[view.normalize] if isinstance(view.normalize, str) else view.normalize
    return {"input_size": (3, geometry.size, geometry.size), "mean": tuple(mean), "std": tuple(std),
            "interpolation": geometry.interpolation, "crop_pct": 1.0, "crop_mode": "center"}


def class_names(data) -> list[str] | None:
    """The class names the shards' index records (``pack`` writes them), or None."""
    from data_shards import DataError, ShardIndex
    if not isinstance(data.train, (str, os.PathLike)):
        return None
    try:
        return ShardIndex.load(data.train).classes or None
    except (DataError, OSError, ValueError):
        return None  # a brace pattern or urls: no index to read names from
