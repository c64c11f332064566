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


def select_rows(value: Any, keep: torch.Tensor) -> Any:
    """A batch (a tensor, a list, or a dict of them, batch dimension first) restricted to the
    rows where ``keep`` [B] is True; entries of another length are left as they are."""
    rows = len(keep)
    if torch.is_tensor(value) and value.dim() and value.shape[0] == rows:
        return value[keep.to(value.device)]
    if isinstance(value, list) and len(value) == rows:
        return [item for item, kept in zip(value, keep.tolist()) if kept]
    if isinstance(value, Mapping):
        return {key: select_rows(item, keep) for key, item in value.items()}
    return value
