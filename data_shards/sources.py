"""What `pack` accepts, turned into a list of SourceItems (cheap: nothing is decoded here).

- a folder in ImageFolder layout (one subfolder per class), or a flat folder of unlabelled images
- a manifest: JSONL or CSV with `path` and an optional `label` per line
- text: a .txt file (one document per line) or JSONL with `text` and an optional `label`
- `sklearn:digits`: the 1,797 8x8 digits scikit-learn ships
"""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import DataError
from .keys import make_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class SourceItem:
    key: str
    source: str  # human-readable origin, stored in the sample's .json and used in error messages
    label: int | None = None
    path: str | None = None  # an image file
    pixels: np.ndarray | None = None  # an in-memory grayscale image (digits)
    text: str | None = None


@dataclass
class Source:
    items: list[SourceItem]
    modality: Literal["image", "text"]
    classes: list[str] | None
    name: str  # default shard prefix


def load_source(spec: str) -> Source:
    if spec == "sklearn:digits":
        return _digits()
    if spec.startswith("sklearn:"):
        raise DataError(f"Unknown embedded data set '{spec}': the only one is 'sklearn:digits'.")
    path = Path(spec)
    if path.is_dir():
        source = _image_folder(path)
    elif path.is_file() and path.suffix.lower() == ".txt":
        source = _text_lines(path)
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        source = _records(path)
    elif path.exists():
        raise DataError(
            f"Cannot pack {spec}: a source is an image folder, a .jsonl or .csv manifest, a .txt file "
            "(one document per line) or sklearn:digits."
        )
    else:
        raise DataError(f"Source {spec} does not exist.")
    if not source.items:
        raise DataError(f"Source {spec} holds no samples.")
    _check_unique_keys(source.items)
    return source


def _digits() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to 0..255 so the PNGs look like images.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    items = [
        SourceItem(key=f"digits_{i:05d}", source=f"sklearn:digits#{i}", label=int(label), pixels=pixels[i])
        for i, label in enumerate(digits.target)
    ]
    return Source(items, "image", [str(name) for name in digits.target_names], "digits")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _image_folder(root: Path) -> Source:
    top_images = sorted(p for p in root.iterdir() if _is_image(p))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if top_images and class_dirs:
        raise DataError(
            f"{root} holds both images ({top_images[0].name}, ...) and subfolders ({class_dirs[0].name}, ...): "
            "use either one subfolder per class (ImageFolder layout) or a flat folder of unlabelled images."
        )
    if top_images:
        items = [SourceItem(make_key(p.name), str(p), path=str(p)) for p in top_images]
        return Source(items, "image", None, make_key(root.resolve().name))
    items, classes = [], []
    for class_dir in class_dirs:
        images = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        if not images:
            continue  # like torchvision's ImageFolder, a folder without images is not a class
        label = len(classes)
        classes.append(class_dir.name)
        for image in images:
            relative = image.relative_to(root).as_posix()
            items.append(SourceItem(make_key(relative), str(image), label=label, path=str(image)))
    return Source(items, "image", classes, make_key(root.resolve().name))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its end) of a UTF-8 file. Decoded line by line, so that a
    byte that is not UTF-8 is named by its line (a text-mode file decodes 8 KiB at a time,
    and its error says neither where nor, before the first line, anything at all)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exn:
                raise DataError(
                    f"{path}: line {number} is not UTF-8: byte {exn.start + 1} of the line "
                    f"(0x{raw[exn.start]:02x}) {exn.reason}; save the file as UTF-8 (e.g. "
                    f"iconv -f latin1 -t utf-8) or remove the line.") from None


def _unencodable(path: Path, number: int, field_name: str, value: str) -> None:
    """A JSON string can spell half of a surrogate pair (\\ud800), which is no character
    and cannot be written as UTF-8; refused here, not as a traceback from an encoding worker."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exn:
        raise DataError(
            f"{path}: line {number}: the '{field_name}' string holds an unpaired surrogate "
            f"(\\u{ord(value[exn.start]):04x}, character {exn.start + 1}), which is not a "
            f"character and has no UTF-8 form; JSON escapes between \\ud800 and \\udfff "
            f"must come in pairs (high, then low). Fix or remove the line.") from None


def _text_lines(path: Path) -> Source:
    items = []
    for number, line in _lines(path):
        text = line.rstrip("\r\n")
        if text.strip():  # blank lines are not documents
            items.append(SourceItem(make_key(f"{path.stem}_{number:08d}"), f"{path}:{number}", text=text))
    return Source(items, "text", None, make_key(path.stem))


def _records(path: Path) -> Source:
    """JSONL or CSV: a manifest of image paths, or (JSONL only) text records."""
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(line for _, line in _lines(path))
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise DataError(f"{path}: a CSV manifest needs a header line with a 'path' column (and optionally 'label'); found {reader.fieldnames}.")
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    else:
        for number, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exn:
                raise DataError(f"{path}: line {number} is not valid JSON ({exn.msg}).") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number} must be a JSON object with 'path' or 'text', not {type(record).__name__}.")
            for key in ("text", "path", "label"):
                if isinstance(record.get(key), str):
                    _unencodable(path, number, key, record[key])
            rows.append((number, record))
    if not rows:
        raise DataError(f"{path} holds no records.")
    is_text = "text" in rows[0][1]
    field_name = "text" if is_text else "path"
    labels = _labels(path, rows)
    classes = sorted(set(labels)) if labels and isinstance(labels[0], str) else None
    items = []
    for (number, record), label in zip(rows, labels or [None] * len(rows)):
        value = record.get(field_name)
        if not isinstance(value, str) or not value:
            raise DataError(
                f"{path}: line {number} has no '{field_name}' string; every line of this "
                f"{'text file' if is_text else 'manifest'} needs one (decided by line {rows[0][0]})."
            )
        label_index = classes.index(label) if classes else label
        if is_text:
            items.append(SourceItem(make_key(f"{path.stem}_{number:08d}"), f"{path}:{number}", label=label_index, text=value))
        else:
            image = Path(value) if Path(value).is_absolute() else path.parent / value
            if not image.is_file():
                raise DataError(f"{path}: line {number} names {value}, which is not a file (relative paths are read from {path.parent}).")
            items.append(SourceItem(make_key(value), f"{image}", label=label_index, path=str(image)))
    return Source(items, "text" if is_text else "image", classes, make_key(path.stem))


def _labels(path: Path, rows: list[tuple[int, dict]]) -> list[int] | list[str] | None:
    """All rows have a label or none do; all integers (class indices) or all class names."""
    present = [row.get("label") not in (None, "") for _, row in rows]
    if not any(present):
        return None
    if not all(present):
        number = rows[present.index(False)][0]
        raise DataError(f"{path}: line {number} has no label but other lines do; label every line or none.")
    values = [row["label"] for _, row in rows]
    for (number, _), value in zip(rows, values):
        if isinstance(value, str) and value.isdigit() and not value.isascii():
            # "²" and "٣" pass str.isdigit(); int() refuses the first and reads the second
            # as 3: neither is taken for a class index, nor silently for a class name.
            raise DataError(
                f"{path}: line {number} has label {value!r}, which reads as digits but not "
                f"the digits 0-9; write class indices with 0-9, or name classes with words.")
    as_ints = [_as_class_index(value) for value in values]
    if all(value is not None for value in as_ints):
        return as_ints
    for (number, _), value, index in zip(rows, values, as_ints):
        if index is None and not isinstance(value, str):
            raise DataError(
                f"{path}: line {number} has label {value!r}, which is neither a class index "
                f"(an integer from 0) nor a class name (a string).")
    if any(not isinstance(value, str) for value in values):
        number, value = next((n, v) for (n, _), v in zip(rows, values) if not isinstance(v, str))
        name_line, name = next((n, v) for (n, _), v in zip(rows, values) if isinstance(v, str))
        raise DataError(
            f"{path}: line {number} has the class index {value!r}, but line {name_line} has "
            f"the class name {name!r}; labels must be all class indices (integers from 0, "
            f"also as strings of the digits 0-9) or all class-name strings.")
    return values


def _as_class_index(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _check_unique_keys(items: list[SourceItem]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise DataError(
                f"{seen[item.key]} and {item.source} map to the same sample key '{item.key}' "
                "(keys keep only letters, digits, '_' and '-'); rename one of them."
            )
        seen[item.key] = item.source
