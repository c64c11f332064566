"""Weights files: read safely, compared with a model by name and shape, written atomically.

Nothing here unpickles: files are safetensors, or torch files read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn


class WeightsError(ValueError):
    """A weights file that is missing, unsafe, or does not match the architecture."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads safetensors, or a torch file with ``weights_only=True`` (never a pickle
    that could run code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:
            raise WeightsError(f"{path} is not a readable safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise WeightsError(
            f"{path} was refused: it is not a plain tensor checkpoint that can be read with "
            f"weights_only=True (it may contain code or arbitrary objects). Convert it to "
            f"safetensors, or save only a state dict of tensors. ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes, also of a ZeRO-3 partitioned model (``ds_shape``)."""
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    persistent = set(model.state_dict().keys())  # non-persistent buffers are not saved
    return {n: s for n, s in shapes.items() if n in persistent}


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]] | str:
    """Key -> shape of a weights file, read from its header where possible (safetensors),
    or a one-paragraph reason why it cannot be used."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as err:
            return f"{path} is not a readable safetensors file: {err}"
    try:
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    except WeightsError as err:
        return str(err)


def fresh_head_keys(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]],
                    head: tuple[str, ...]) -> set[str]:
    """Head keys that start fresh when initialising from another model: missing from the
    file, or of another number of classes."""
    return {k for k in want if k.startswith(head) and (k not in have or have[k] != want[k])}


def shape_problems(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]],
                   path: Path, ignore: Iterable[str] = (),
                   fresh: Iterable[str] = ()) -> str | None:
    """A one-paragraph description of how the file's keys and shapes fail to fit, or None.
    ``ignore``: module prefixes pruned from the model; ``fresh``: keys allowed to differ."""
    ignore_prefixes = tuple(i + "." for i in ignore)
    fresh = set(fresh)
    have = {k: v for k, v in have.items() if not k.startswith(ignore_prefixes) and k not in fresh}
    want = {k: v for k, v in want.items() if k not in fresh}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(f"{k} (file {list(have[k])}, model {list(want[k])})"
                        for k in set(want) & set(have) if tuple(have[k]) != tuple(want[k]))
    if not (missing or unexpected or mismatched):
        return None

    def listing(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
    parts = []
    if missing:
        parts.append(f"missing keys: {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {listing(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches: {listing(mismatched)}")
    return (f"weights {path} do not match the architecture: " + "; ".join(parts) +
            ". Check the architecture name and its kwargs (depth, width, patch size, "
            "num_classes) against the model that saved these weights.")


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Writes ``state`` to ``path`` through a temporary file, so a kill leaves the old file."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path
