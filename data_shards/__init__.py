"""data_shards: pack, verify and stream webdataset shards to every rank.

See docs/data_shards.md. Nothing here imports distill_engine. The names below are imported
on first use, so that ``python -m data_shards --help`` does not wait for torch.
"""

import importlib

_WHERE = {"DataError": "errors", "ShardIndex": "index", "pack": "pack", "EvalStream": "stream",
          "ShardStream": "stream", "GeometryConfig": "views", "ViewConfig": "views",
          "ViewsConfig": "views", "TextConfig": "text", "load_tokenizer": "text",
          "tokenize": "text"}

__all__ = sorted(_WHERE)

# ``pack`` is both a submodule and its function: the first ``from data_shards import pack``
# imports the submodule and then binds the function over it, as the eager import did.


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'data_shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
