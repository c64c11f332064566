"""Sanity limits on the sizes a spec (or a model folder's config.json) gives a model,
checked before anything is built.

``--check`` builds both models on the meta device, which costs no tensor memory, but not
everything a model constructor does is on that device: timm computes stochastic-depth
rates with ``torch.linspace(..., depth, device="cpu")``, and every block is a Python object.
A typo such as ``depth: 1000000000`` (or ``depth: [100000000, 2]``) would take gigabytes
and minutes before any error. So size-like keyword arguments are compared with limits far
above any real model (the largest ViTs have 48 blocks, width 6,144, 48 heads) and refused
before building; what passes is then bounded by a parameter count after the meta build.
"""

from __future__ import annotations

from typing import Any

# Keyword arguments of timm models and transformers configs that size a model, with the
# largest value accepted. "blocks" counts the total over a per-stage list (Swin's depths).
MAX_BLOCKS = 1024
LIMITS: dict[str, tuple[str, float]] = {
    # name: (what the value may be, largest value)
    "depth": ("int", MAX_BLOCKS),
    "num_layers": ("int", MAX_BLOCKS),
    "num_hidden_layers": ("int", MAX_BLOCKS),
    "depths": ("int or list of ints (total)", MAX_BLOCKS),
    "embed_dim": ("int", 65_536),
    "hidden_size": ("int", 65_536),
    "embed_dims": ("int or list of ints", 65_536),
    "dims": ("int or list of ints", 65_536),
    "num_heads": ("int or list of ints", 1024),
    "num_attention_heads": ("int", 1024),
    "mlp_ratio": ("number", 64),
    "intermediate_size": ("int", 1 << 20),
    "img_size": ("int or list of ints", 8192),
    "image_size": ("int or list of ints", 8192),
    "patch_size": ("int or list of ints", 1024),
    "window_size": ("int or list of ints", 1024),
    "in_chans": ("int", 1024),
    "num_channels": ("int", 1024),
    "num_classes": ("int", 1_000_000),
    "num_labels": ("int", 1_000_000),
    "vocab_size": ("int", 10_000_000),
    "max_position_embeddings": ("int", 1 << 20),
    # An MAE's decoder (ViTMAE configs) and GPT-2-style names of the same sizes.
    "decoder_num_hidden_layers": ("int", MAX_BLOCKS),
    "decoder_hidden_size": ("int", 65_536),
    "decoder_intermediate_size": ("int", 1 << 20),
    "decoder_num_attention_heads": ("int", 1024),
    "n_layer": ("int", MAX_BLOCKS),
    "n_embd": ("int", 65_536),
    "n_head": ("int", 1024),
    "n_inner": ("int", 1 << 20),
    "n_positions": ("int", 1 << 20),
}
# Built models larger than this are refused (the largest trained vision models have ~2e10).
MAX_PARAMS = 10 ** 12


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def kwarg_problem(key: str, value: Any) -> str | None:
    """Why ``key: value`` is not a sane size, or None (also None for keys not listed)."""
    if key not in LIMITS or value is None:  # None: the architecture's default
        return None
    form, largest = LIMITS[key]
    if form == "int":
        values = [value] if _is_int(value) else None
    elif form == "number":
        values = [value] if _is_number(value) else None
    else:  # "int or list of ints", possibly with a total
        items = value if isinstance(value, (list, tuple)) else [value]
        values = list(items) if items and all(_is_int(v) for v in items) else None
    if values is None:
        return f"{key} must be {'an' if form[0] == 'i' else 'a'} {form}, not {_short(value)}"
    smallest = 0 if key == "num_classes" else 1  # 0 classes: no head (timm)
    if any(v < smallest for v in values) or (form == "number" and any(v <= 0 for v in values)):
        return f"{key} must be {'positive' if smallest else 'at least 0'}, not {_short(value)}"
    size = sum(values) if "total" in form else max(values)
    if size > largest:
        return (f"{key} {_short(value)} is beyond any real model (at most {largest:,}"
                f"{' in total' if 'total' in form else ''}); check for a typo")
    return None


def kwargs_problems(kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every size-like keyword argument out of its limits. A dotted key
    is a nested config's value (``text_config.num_hidden_layers`` of a config file), judged
    by its last name and reported under the whole key."""
    found = []
    for key, value in kwargs.items():
        name = key.rsplit(".", 1)[-1]
        if problem := kwarg_problem(name, value):
            found.append((key, key + problem.removeprefix(name)))
    return found


def params_problem(count: int) -> str | None:
    if count > MAX_PARAMS:
        return (f"the model would have {count:.3g} parameters, more than {MAX_PARAMS:.0e}; "
                "check its size kwargs (depth, embed_dim, ...) for a typo")
    return None


def _short(value: Any) -> str:
    import reprlib
    return reprlib.repr(value)
