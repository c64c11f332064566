"""Decoding raw samples (bytes per extension) into what training needs. Never unpickles."""

import io
import json
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from .safety import Oversized

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


# Decoded images larger than this are refused (a data setting: data.max_image_pixels). 50
# megapixels covers the largest camera photographs (45-50 MP) and decodes to 150 MB of RGB;
# PIL's own limit (89 MP) only warns, and a 12000 x 12000 image would cost 430 MB decoded
# and about 1.4 GB while it is converted and cropped.
MAX_IMAGE_PIXELS = 50_000_000


def decode_sample(sample: dict, modality: str | None = None, num_classes: int | None = None,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> Decoded:
    """Raise BadSample when the sample lacks its image/text field or a field does not decode.

    modality: "image" or "text" when known (from the index); None decides by the fields present.
    num_classes: when given, a label outside 0..num_classes-1 is a bad sample (the model
    could not score it). max_image_pixels: larger images are refused before they are decoded.
    """
    key, url = sample["__key__"], sample["__url__"]
    oversized = [value for value in sample.values() if isinstance(value, Oversized)]
    if oversized:
        raise BadSample(str(oversized[0]))
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample(f"field 'cls' is not an integer label: {sample['cls'][:20]!r}") from None
        if num_classes is not None and not 0 <= label < num_classes:
            raise BadSample(f"label {label} is outside the model's {num_classes} classes "
                            f"(0..{num_classes - 1})")
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
    return Decoded(key, url, label,
                   image=decode_image(sample[image_field], image_field, max_image_pixels))


def decode_image(data: bytes, field: str = "image",
                 max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded bytes -> uint8 RGB tensor [3, H, W] (grayscale and palette images become RGB).
    The size is read from the header before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadSample(f"field '{field}' is a {width} x {height} image, "
                                f"{width * height:,} pixels, more than max_image_pixels "
                                f"{max_pixels:,}")
            return F.pil_to_tensor(image.convert("RGB"))
    except BadSample:
        raise
    except Exception as exn:
        raise BadSample(f"field '{field}' does not decode as an image ({type(exn).__name__}: {exn})") from None


def _fields(sample: dict) -> str:
    return ", ".join(sorted(name for name in sample if not name.startswith("__"))) or "nothing"
