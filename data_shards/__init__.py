"""data_shards: pack, verify and stream webdataset shards to every rank.

See docs/data_shards.md. Nothing here imports distill_engine.
"""

from .errors import DataError
from .index import ShardIndex
from .pack import pack
from .stream import EvalStream, ShardStream
from .text import TextConfig, load_tokenizer, tokenize
from .views import GeometryConfig, ViewConfig, ViewsConfig

__all__ = ["DataError", "EvalStream", "GeometryConfig", "ShardIndex", "ShardStream", "TextConfig", "ViewConfig", "ViewsConfig", "load_tokenizer", "pack", "tokenize"]
