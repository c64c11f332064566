"""Taps: named intermediate outputs, captured by forward hooks.

A tap is addressed by module path, exactly as ``model.named_modules()`` spells it
(``blocks.17.attn.qkv``, ``norm``); ``output`` is the model's own output. A tap holds the
tensor the module's output stands for (the first tensor of a tuple or an output record, as
the trace measures it). Hooks store outputs only inside ``capture()``, so
activation-checkpointing recomputation during the backward pass does not refill (and keep
alive) the captured tensors.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from distill_engine.tensors import first_tensor

OUTPUT = "output"


class TapError(ValueError):
    pass


def tap_problem(model: nn.Module, name: str) -> str | None:
    """Why ``name`` is not a tap of ``model`` (with the nearest valid names), or None."""
    if name == OUTPUT:
        return None
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    if name in names:
        return identity_problem(modules, name)
    nearest = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"nearest valid names: {', '.join(nearest)}" if nearest else (
        f"valid names look like: {', '.join(names[:6])}, ...")
    return f"tap {name!r} is not a module of the model; {hint}"


def identity_problem(modules: dict[str, nn.Module], name: str) -> str | None:
    """A tap on an ``nn.Identity`` captures that module's input: a model built without the
    layer (timm's BEiT and ViT with average pooling replace ``norm`` by an identity and
    normalise after pooling, in ``fc_norm``) would silently give features before any norm."""
    if not isinstance(modules[name], nn.Identity):
        return None
    parent, _, leaf = name.rpartition(".")
    norms = [n for n, m in modules.items() if n and n.rpartition(".")[0] == parent
             and leaf in n.rpartition(".")[2] and "Norm" in type(m).__name__]
    if norms:
        hint = (f"; in this model {' and '.join(repr(n) for n in norms)} holds the norm "
                f"(applied after pooling), or build the model so that {name!r} is a real layer "
                "(timm: global_pool: token)")
    else:
        hint = "; tap the module whose output you mean"
    return (f"tap {name!r} is an nn.Identity in this model: it would capture that module's "
            f"input, not a {leaf} output{hint}")


class Taps:
    """Captures the outputs of the named submodules of ``model`` while ``capture()`` is open."""

    def __init__(self, model: nn.Module, names: list[str]):
        problems = [p for p in (tap_problem(model, n) for n in names) if p]
        if problems:
            raise TapError("; ".join(problems))
        self.names = list(dict.fromkeys(names))
        self.outputs: dict[str, Any] = {}
        self._active = False
        self._handles = [model.get_submodule(n).register_forward_hook(self._hook(n))
                         for n in self.names if n != OUTPUT]

    def _hook(self, name: str):
        def store(module, inputs, output):
            if self._active:
                self.outputs[name] = first_tensor(output)
        return store

    @contextmanager
    def capture(self) -> Iterator[dict[str, Any]]:
        self.outputs = {}
        self._active = True
        try:
            yield self.outputs
        finally:
            self._active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
