"""What one forward pass does, and what follows from it: which modules run after a tap
(and so cannot influence it), which parameters no objective reaches, and what a frozen
teacher can drop.

A trace runs the model once, on the meta device when checking a spec, and records the
order in which modules start and finish and the shape of every module's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from distill_engine.families import ModelFamily
from distill_engine.tensors import first_tensor

from .taps import OUTPUT


@dataclass
class Trace:
    """What one forward pass did: the order in which modules started and finished,
    and the output shape of every module (batch included)."""

    start: dict[str, int]
    end: dict[str, int]
    shapes: dict[str, tuple[int, ...]]


def trace(model: nn.Module, family: ModelFamily, inputs: Any) -> Trace:
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
            tensor = first_tensor(output)
            if tensor is not None:
                shapes[name] = tuple(tensor.shape)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            output = family.output_tensor(family.forward(model, inputs))
    finally:
        for handle in handles:
            handle.remove()
    shapes[OUTPUT] = tuple(output.shape) if output is not None else ()
    return Trace(start, end, shapes)


def deepest_tap(trace: Trace, taps: Iterable[str]) -> str | None:
    """The tap that finishes last, or None when there is none to cut after: no module
    taps, or the model's output among them (the output depends on everything that runs,
    an MAE decoder after a ``vit.layernorm`` tap included)."""
    taps = list(taps)
    if OUTPUT in taps:
        return None
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


class Pruned(nn.Identity):
    """What stands in for a module pruned from a frozen teacher: it returns its first input,
    whatever the caller passes (a BERT layer calls its output module with two tensors)."""

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()), None)


def prune_after(model: nn.Module, trace: Trace, taps: Iterable[str]) -> list[str]:
    """Removes everything that runs after the deepest tap; returns the removed paths.

    Blocks held in a ModuleList/Sequential are cut off (``blocks.17`` keeps blocks 0..17);
    any other module that runs later (final norm, head) becomes ``Pruned`` (an identity).
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
            setattr(parent, child, Pruned())
            removed.append(path)
    return removed
