"""verify (decode every sample of every shard) and inspect (print a few, draw a contact sheet)."""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from .decode import BadSample, Decoded, decode_sample
from .errors import DataError
from .index import INDEX_NAME, ShardIndex
from .safety import ShardError, read_shard


def find_indexes(directory: str | os.PathLike) -> list[ShardIndex]:
    """DIR/index.json, or DIR/train/index.json and DIR/holdout/index.json after a split pack."""
    directory = Path(directory)
    if (directory / INDEX_NAME).is_file() or not directory.is_dir():
        return [ShardIndex.load(directory)]
    splits = [directory / name for name in ("train", "holdout") if (directory / name / INDEX_NAME).is_file()]
    if not splits:
        raise DataError(f"{directory} holds no {INDEX_NAME} (nor train/{INDEX_NAME}, holdout/{INDEX_NAME}); point at the --out directory of pack.")
    return [ShardIndex.load(split) for split in splits]


@dataclass
class ShardReport:
    url: str
    expected: int  # samples the index promises
    good: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason); key "" for shard-level problems

    @property
    def ok(self) -> bool:
        return not self.bad and self.good == self.expected


def verify_index(index: ShardIndex, allow_pipe: bool = False) -> list[ShardReport]:
    reports, seen_keys = [], {}
    for url, expected in index.shards:
        report = ShardReport(url, expected)
        try:
            for sample in read_shard(url, allow_pipe):
                key = sample["__key__"]
                try:
                    decoded = decode_sample(sample, index.modality)
                    if index.labelled and decoded.label is None:
                        raise BadSample("missing field 'cls' (the index says the samples are labelled)")
                    if index.classes and decoded.label is not None and not 0 <= decoded.label < len(index.classes):
                        raise BadSample(f"label {decoded.label} is outside the index's {len(index.classes)} classes")
                    if key in seen_keys:
                        raise BadSample(f"duplicate key, also in {seen_keys[key]}")
                    seen_keys[key] = url
                    report.good += 1
                except BadSample as exn:
                    report.bad.append((key, str(exn)))
        except ShardError as exn:
            report.bad.append((exn.key or "", exn.reason))
        reports.append(report)
    return reports


def first_samples(index: ShardIndex, count: int, allow_pipe: bool = False) -> list[tuple[Decoded, int]]:
    """The first `count` decodable samples in index order, with their encoded size in bytes."""
    found = []
    for url in index.urls:
        try:
            for sample in read_shard(url, allow_pipe):
                try:
                    size = sum(len(value) for name, value in sample.items() if not name.startswith("__"))
                    found.append((decode_sample(sample, index.modality), size))
                except BadSample:
                    continue
                if len(found) >= count:
                    return found
        except ShardError:
            continue
    return found


def contact_sheet(samples: list[Decoded], classes: list[str] | None, path: str | os.PathLike, tile: int = 96) -> Path:
    """A grid of the images, each captioned with its label (class name when known)."""
    images = [s for s in samples if s.image is not None]
    if not images:
        raise DataError("These shards hold no images, so there is no contact sheet to draw (--png is for image shards).")
    columns = min(8, len(images))
    rows = math.ceil(len(images) / columns)
    caption = 14
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, sample in enumerate(images):
        image = Image.fromarray(sample.image.permute(1, 2, 0).numpy())
        image.thumbnail((tile, tile), Image.Resampling.NEAREST if max(image.size) < tile // 2 else Image.Resampling.BICUBIC)
        if max(image.size) < tile:  # upscale tiny images (digits are 8x8) so they can be seen
            factor = tile / max(image.size)
            image = image.resize((max(1, int(image.width * factor)), max(1, int(image.height * factor))), Image.Resampling.NEAREST)
        x, y = (n % columns) * tile, (n // columns) * (tile + caption)
        sheet.paste(image, (x, y))
        label = "" if sample.label is None else (classes[sample.label] if classes and sample.label < len(classes) else str(sample.label))
        draw.text((x + 2, y + tile), label[:14], fill="black")
    path = Path(path)
    sheet.save(path)
    return path
