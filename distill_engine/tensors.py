"""What a module's output stands for, whatever its type (a tensor, a record, a tuple)."""

from __future__ import annotations

from typing import Any, Mapping

import torch


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module's output stands for: itself, or the first tensor of an output
    record (transformers' ``ModelOutput`` is a mapping) or of a tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None
