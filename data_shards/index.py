"""The index JSON written beside the shards, and ShardIndex, its loaded form."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import DataError

INDEX_NAME = "index.json"
INDEX_FORMAT = 1


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    samples: int
    bytes: int


class IndexFile(BaseModel):
    """The on-disk schema; validated on load so a hand-edited index fails with a clear message."""

    model_config = ConfigDict(extra="forbid")
    format: Literal[1] = INDEX_FORMAT
    prefix: str
    modality: Literal["image", "text"]
    shards: list[ShardEntry]
    total: int
    classes: list[str] | None
    labelled: bool
    split: Literal["all", "train", "holdout"]
    args: dict


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


@dataclass
class ShardIndex:
    """Where the shards are and what they hold. `shards` is a list of (url, samples)."""

    location: str  # the index file's path or URL; shard names are relative to its folder
    prefix: str
    modality: Literal["image", "text"]
    shards: list[tuple[str, int]]
    total: int
    classes: list[str] | None
    labelled: bool
    split: str
    args: dict = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return [url for url, _ in self.shards]

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> "ShardIndex":
        """Load `DIR/index.json`, a path to an index JSON, or an http(s)/... URL of one."""
        location = str(path_or_dir)
        if not _is_remote(location) and os.path.isdir(location):
            location = os.path.join(location, INDEX_NAME)
        try:
            if _is_remote(location):
                import webdataset as wds

                with wds.gopen(location) as stream:
                    text = stream.read().decode("utf-8")
            else:
                text = Path(location).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"No shard index at {location}: expected the {INDEX_NAME} that `python -m data_shards pack` "
                "writes beside the shards (pass the shard directory, the index path, or shard URLs with "
                "samples_per_epoch)."
            ) from None
        except (OSError, UnicodeDecodeError) as exn:
            raise DataError(f"Cannot read the shard index {location}: {exn}.") from None
        try:
            raw = IndexFile.model_validate(json.loads(text))
        except json.JSONDecodeError as exn:
            raise DataError(f"The shard index {location} is not valid JSON ({exn}); re-run pack to rewrite it.") from None
        except ValidationError as exn:
            first = exn.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise DataError(
                f"The shard index {location} is malformed: field '{where}': {first['msg']}. "
                f"It must hold format {INDEX_FORMAT}, prefix, modality, shards [{{name, samples, bytes}}], "
                "total, classes, labelled, split and args, as written by pack."
            ) from None
        if raw.total != sum(entry.samples for entry in raw.shards):
            raise DataError(f"The shard index {location} is inconsistent: total {raw.total} is not the sum of its shards' samples.")
        base = location.rsplit("/", 1)[0] if "/" in location else "."
        return cls(
            location=location,
            prefix=raw.prefix,
            modality=raw.modality,
            shards=[(f"{base}/{entry.name}", entry.samples) for entry in raw.shards],
            total=raw.total,
            classes=raw.classes,
            labelled=raw.labelled,
            split=raw.split,
            args=raw.args,
        )


def write_index(directory: Path, raw: IndexFile) -> Path:
    path = directory / INDEX_NAME
    path.write_text(json.dumps(raw.model_dump(), indent=2) + "\n", encoding="utf-8")
    return path
