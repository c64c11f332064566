"""Building, tracing, pruning, loading and exporting models.

Architectures come from timm (``timm:NAME`` plus keyword arguments) or from a local
Hugging Face directory (``hf:DIR``, config only: weights are loaded by ``load_weights``).
Nothing here is imported by string: timm and transformers look names up in their own
registries.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .taps import OUTPUT


class WeightsError(ValueError):
    """A weights file that is missing, unsafe, or does not match the architecture."""


# ---------------------------------------------------------------------------- building

@dataclass(frozen=True)
class ModelRecipe:
    """Everything needed to rebuild a model: where the architecture comes from, its
    keyword arguments, and (optionally) a weights file."""

    arch: str                                  # "timm:vit_small_patch16_224" | "hf:/path/to/dir"
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None

    @property
    def family(self) -> str:
        return self.arch.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.arch.split(":", 1)[1]


HF_TASKS = {
    "base": "AutoModel",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
}


def create_model(recipe: ModelRecipe, **overrides: Any) -> nn.Module:
    """A randomly initialised model (weights are loaded separately, see ``load_weights``)."""
    kwargs = {**recipe.kwargs, **overrides}
    if recipe.family == "timm":
        import timm
        return timm.create_model(recipe.name, pretrained=False, **kwargs)
    if recipe.family == "hf":
        import transformers
        task = kwargs.pop("task", "base")
        config = transformers.AutoConfig.from_pretrained(recipe.name, local_files_only=True)
        for key in ("drop_path_rate",):
            kwargs.pop(key, None)  # timm-only notion; BERT has dropout in its config
        for key, value in kwargs.items():
            setattr(config, key, value)
        auto_class = getattr(transformers, HF_TASKS[task])
        return auto_class.from_config(config)
    raise ValueError(f"unknown architecture family in {recipe.arch!r}; use timm:NAME or hf:DIR")


def create_student(recipe: ModelRecipe, drop_path_rate: float, schedule: str) -> nn.Module:
    """The student with its stochastic depth: timm's linear ramp, or TinyMIM's constant
    rate on every block but the last (whose output past the tapped qkv is unused)."""
    if schedule == "linear" or drop_path_rate == 0:
        return create_model(recipe, drop_path_rate=drop_path_rate)
    from timm.layers import DropPath
    model = create_model(recipe)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"{recipe.arch} has no 'blocks' list; use drop_path_schedule: linear")
    for block in list(blocks)[:-1]:
        for name, child in list(block.named_children()):
            if name.startswith("drop_path"):
                setattr(block, name, DropPath(drop_path_rate))
    return model


def timm_architecture_exists(name: str) -> bool:
    import timm
    return name in timm.list_models()


# ---------------------------------------------------------------------------- tracing

@dataclass
class Trace:
    """What one forward pass did: the order in which modules started and finished,
    and the output shape of every module (batch included)."""

    start: dict[str, int]
    end: dict[str, int]
    shapes: dict[str, tuple[int, ...]]


def _shape_of(output: Any) -> tuple[int, ...] | None:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return tuple(logits.shape)
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return tuple(hidden.shape)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return tuple(output[0].shape)
    return None


def example_input(model: nn.Module, recipe: ModelRecipe, image_size: int, seq_len: int = 16,
                  device: str | torch.device = "meta") -> Any:
    if recipe.family == "hf":
        return {"input_ids": torch.zeros(1, seq_len, dtype=torch.long, device=device)}
    return torch.zeros(1, 3, image_size, image_size, device=device)


def run_model(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def trace(model: nn.Module, inputs: Any) -> Trace:
    """Runs one forward (meta tensors are fine) and records order and shapes."""
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    counter = iter(range(1 << 30))
    handles = []
    for name, module in model.named_modules():
        def pre(mod, args, name=name):
            start.setdefault(name, next(counter))

        def post(mod, args, output, name=name):
            end[name] = next(counter)
            shape = _shape_of(output)
            if shape is not None:
                shapes[name] = shape
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            output = run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    shapes[OUTPUT] = _shape_of(output) or ()
    return Trace(start, end, shapes)


def deepest_tap(trace: Trace, taps: Iterable[str]) -> str | None:
    taps = [t for t in taps if t != OUTPUT]
    if not taps:
        return None
    return max(taps, key=lambda t: trace.end[t])


def modules_after(trace: Trace, tap: str) -> list[str]:
    """Modules that start after ``tap`` has finished: they cannot influence its output.
    Only the outermost such modules are returned."""
    done = trace.end[tap]
    after = sorted((n for n, s in trace.start.items() if s > done and n), key=trace.start.get)
    outermost: list[str] = []
    for name in after:
        if not any(name.startswith(parent + ".") for parent in outermost):
            outermost.append(name)
    return outermost


def unreachable_parameters(model: nn.Module, trace: Trace, taps: Iterable[str]) -> list[str]:
    """Names of parameters that cannot influence any tap: those owned only by modules that
    start after the deepest tap has finished. A parameter also owned elsewhere (tied
    embeddings) is kept trainable. Modules that never ran are left alone: some models use a
    submodule's weight functionally (BEiT's ``F.linear(x, self.qkv.weight, ...)``)."""
    tap = deepest_tap(trace, taps)
    if tap is None:
        return []
    after = tuple(m + "." for m in modules_after(trace, tap))
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return sorted(names[0] for names in owners.values()
                  if all(n.startswith(after) for n in names))


# ---------------------------------------------------------------------------- pruning

def prune_after(model: nn.Module, trace: Trace, taps: Iterable[str]) -> list[str]:
    """Removes everything that runs after the deepest tap; returns the removed paths.

    Blocks held in a ModuleList/Sequential are cut off (``blocks.17`` keeps blocks 0..17);
    any other module that runs later (final norm, head) becomes ``nn.Identity``.
    """
    tap = deepest_tap(trace, taps)
    if tap is None:
        return []
    removed: list[str] = []
    for path in modules_after(trace, tap):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
            index = int(child)
            if index < len(parent):  # drop this block and all later ones at once
                removed += [f"{parent_path}.{i}" for i in range(index, len(parent))]
                if isinstance(parent, nn.ModuleList):
                    del parent[index:]
                else:
                    for i in range(len(parent) - 1, index - 1, -1):
                        del parent[i]
        else:
            setattr(parent, child, nn.Identity())
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------- weights

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


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The classifier head's parameter prefixes (timm's pretrained_cfg names it)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(n + "." for n in names)


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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                 ignore: Iterable[str] = (), fresh: Iterable[str] = ()) -> None:
    """Copies ``state`` into ``model``, module by module, also when ZeRO-3 has partitioned it.

    Under ZeRO-3 each module's parameters are gathered, written on rank 0 and
    re-partitioned (``GatheredParameters(modifier_rank=0)``); buffers are not partitioned
    and are written on every rank.
    """
    fresh = set(fresh)
    problem = shape_problems(expected_shapes(model), {k: tuple(v.shape) for k, v in state.items()},
                             path, ignore, fresh)
    if problem:
        raise WeightsError(problem)
    state = {k: v for k, v in state.items() if k not in fresh}
    import deepspeed
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = list(module.named_parameters(recurse=False))
        if params:
            partitioned = any(hasattr(p, "ds_id") for _, p in params)
            context = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0)
                       if partitioned else nullcontext())
            with context:
                if rank == 0 or not partitioned:
                    with torch.no_grad():
                        for name, param in params:
                            if prefix + name in state:  # else a fresh head parameter
                                param.copy_(state[prefix + name].to(param.dtype))
        for name, buffer in module.named_buffers(recurse=False):
            if prefix + name in state:
                with torch.no_grad():
                    buffer.copy_(state[prefix + name].to(buffer.dtype))


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full fp32 CPU state dict on rank 0 (empty elsewhere), gathering ZeRO-3 partitions
    one module at a time so that no rank ever holds the whole model twice."""
    import deepspeed
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    persistent = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = list(module.named_parameters(recurse=False))
        partitioned = any(hasattr(p, "ds_id") for _, p in params)
        context = (deepspeed.zero.GatheredParameters([p for _, p in params])
                   if partitioned else nullcontext())
        with context:
            if rank == 0:
                for name, tensor in params + list(module.named_buffers(recurse=False)):
                    if prefix + name in persistent:
                        state[prefix + name] = tensor.detach().float().cpu().clone()
    return state


def save_export(model: nn.Module, recipe: ModelRecipe, out_dir: Path,
                extra: dict[str, Any] | None = None) -> Path | None:
    """Writes ``model.safetensors`` + ``model.json`` (architecture and kwargs) on rank 0."""
    from safetensors.torch import save_file
    state = gathered_state_dict(model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, weights)
    card = {"arch": recipe.arch, "kwargs": recipe.kwargs, **(extra or {})}
    (out_dir / "model.json").write_text(json.dumps(card, indent=2, default=str))
    return weights
