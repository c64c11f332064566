"""Decoding raw samples (bytes per extension) into what training needs. Never unpickles."""

import io
import json
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


class BadSample(Exception):
    """A sample that cannot be used; the message says which field and why."""


@dataclass
class Decoded:
    key: str
    url: str
    label: int | None
    image: torch.Tensor | None = None  # uint8 [3, H, W]
    text: str | None = None


def decode_sample(sample: dict, modality: str | None = None) -> Decoded:
    """Raise BadSample when the sample lacks its image/text field or a field does not decode.

    modality: "image" or "text" when known (from the index); None decides by the fields present.
    """
    key, url = sample["__key__"], sample["__url__"]
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample(f"field 'cls' is not an integer label: {sample['cls'][:20]!r}") from None
    if "json" in sample:
        try:
            json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise BadSample(f"field 'json' is not valid JSON ({exn})") from None
    image_field = next((name for name in IMAGE_FIELDS if name in sample), None)
    if modality == "text" or (modality is None and image_field is None and "txt" in sample):
        if "txt" not in sample:
            raise BadSample(f"missing field 'txt' (has {_fields(sample)})")
        try:
            return Decoded(key, url, label, text=sample["txt"].decode("utf-8"))
        except UnicodeDecodeError as exn:
            raise BadSample(f"field 'txt' is not UTF-8 ({exn.reason})") from None
    if image_field is None:
        raise BadSample(f"missing an image field ({'/'.join(IMAGE_FIELDS)}; has {_fields(sample)})")
    return Decoded(key, url, label, image=decode_image(sample[image_field], image_field))


def decode_image(data: bytes, field: str = "image") -> torch.Tensor:
    """Encoded bytes -> uint8 RGB tensor [3, H, W] (grayscale and palette images become RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return F.pil_to_tensor(image.convert("RGB"))
    except Exception as exn:
        raise BadSample(f"field '{field}' does not decode as an image ({type(exn).__name__}: {exn})") from None


def _fields(sample: dict) -> str:
    return ", ".join(sorted(name for name in sample if not name.startswith("__"))) or "nothing"
