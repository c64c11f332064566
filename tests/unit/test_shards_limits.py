"""Samples that would cost more than they are worth, or that the model cannot take: labels
beyond its classes, a gzip-compressed member of hundreds of MB, an image of 144 megapixels.
Each is a bad sample, counted and named by shard and key, and the memory of the process
that meets them stays bounded (measured on a subprocess with ``os.wait4``)."""

from __future__ import annotations

import io
import json
import logging
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from data_shards import EvalStream, GeometryConfig, ShardStream, ViewConfig, ViewsConfig, pack
from data_shards.decode import MAX_IMAGE_PIXELS

from helpers import run_measured

VIEWS = ViewsConfig(geometry=GeometryConfig(size=8), views={"image": ViewConfig()})
MiB = 1024 ** 2


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    pack("sklearn:digits", out, max_samples_per_shard=1000, workers=1, progress=False)
    return out


def test_labels_beyond_the_models_classes_are_bad_samples(digits, caplog):
    """Digits (labels 0-9) for a model with 5 classes: labels 5-9 never reach the loss."""
    stream = ShardStream(digits, batch_size=32, rank=0, world_size=1, num_workers=0, views=VIEWS,
                         shuffle_buffer=32, num_classes=5, max_bad_samples=10_000)
    with caplog.at_level(logging.WARNING, logger="data_shards"):
        batches = [batch for _, batch in zip(range(5), stream)]
    assert all(int(batch["label"].max()) < 5 for batch in batches)
    assert stream.bad_samples > 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"shard {digits}/" in m and ".tar sample 'digits_" in m and
               "is outside the model's 5 classes (0..4)" in m for m in messages), messages[:3]

    # Evaluation: such a sample is padding (not a wrong answer), counted as bad.
    evaluation = EvalStream(digits, batch_size=512, rank=0, world_size=1, views=VIEWS, num_classes=5)
    batches = list(evaluation)
    labels = [int(label) for b in batches for label, ok in zip(b["label"], b["valid"]) if ok]
    total = json.loads((digits / "index.json").read_text())["total"]
    assert labels and max(labels) < 5
    assert len(labels) + evaluation.bad_samples == total and evaluation.bad_samples > 0


# ---------------------------------------------------------------------------- sizes

def _png_header_only_cost(width: int, height: int) -> bytes:
    """A valid grayscale PNG of width x height zeros, compressed as it is written (the test
    never holds the pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, parts, row = zlib.compressobj(1), [], b"\0" * (width + 1)
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


class _Zeros(io.RawIOBase):
    """Reads as `size` zero bytes without holding them."""

    def __init__(self, size: int):
        self.left = size

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"\0" * n
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def _small_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path: Path, huge: bool) -> Path:
    """A gzip-compressed shard of 8 good samples, and with `huge` two more: a 512 MiB member
    (about 0.5 MB compressed) and a 12000 x 12000 image (144 megapixels)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        def add(name: str, data: bytes | None = None, size: int = 0):
            info = tarfile.TarInfo(name)
            info.size = len(data) if data is not None else size
            tar.addfile(info, io.BytesIO(data) if data is not None else _Zeros(size))
        if huge:  # first, so that the stream meets them in its first batch
            add("bomb.png", size=512 * MiB)
            add("bomb.cls", b"1")
            add("poster.png", _png_header_only_cost(12_000, 12_000))
            add("poster.cls", b"1")
        for i in range(8):
            add(f"good{i}.png", _small_png(20 * i))
            add(f"good{i}.cls", b"1")
    return path


STREAM_ONE_EPOCH = """
import logging, sys
from data_shards import GeometryConfig, ShardStream, ViewConfig, ViewsConfig
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
views = ViewsConfig(geometry=GeometryConfig(size=8), views={"image": ViewConfig()})
stream = ShardStream([sys.argv[1]], batch_size=4, rank=0, world_size=1, num_workers=0,
                     samples_per_epoch=8, views=views, shuffle_buffer=1)
keys = [key for _, batch in zip(range(2), stream) for key in batch["key"]]
print(len(keys), stream.bad_samples)
"""


def test_a_huge_member_and_a_huge_image_are_bad_samples_in_bounded_memory(tmp_path):
    clean = _shard(tmp_path / "clean-000000.tar.gz", huge=False)
    hostile = _shard(tmp_path / "hostile-000000.tar.gz", huge=True)
    assert hostile.stat().st_size < 8 * MiB  # what the user sees on disk
    code, out, err, baseline = run_measured([sys.executable, "-c", STREAM_ONE_EPOCH, str(clean)])
    assert code == 0 and out.split() == ["8", "0"], err
    code, out, err, rss = run_measured([sys.executable, "-c", STREAM_ONE_EPOCH, str(hostile)])
    assert code == 0 and out.split() == ["8", "2"], err
    assert (f"shard {hostile} sample 'bomb': member 'bomb.png' is 536,870,912 bytes, more than "
            "the 268,435,456 a sample field may have") in err
    assert (f"shard {hostile} sample 'poster': field 'png' is a 12000 x 12000 image, "
            f"144,000,000 pixels, more than max_image_pixels {MAX_IMAGE_PIXELS:,}") in err
    # Inflating the member would hold 512 MiB, decoding the image 432 MB (1.4 GB converting).
    assert rss < baseline + 100 * MiB, (rss / MiB, baseline / MiB)


def test_the_pixel_limit_is_a_setting(tmp_path, caplog):
    clean = _shard(tmp_path / "clean-000000.tar.gz", huge=False)
    stream = ShardStream([str(clean)], batch_size=4, rank=0, world_size=1, num_workers=0,
                         samples_per_epoch=4, views=VIEWS, shuffle_buffer=1, max_image_pixels=63,
                         max_bad_samples=8)
    with caplog.at_level(logging.WARNING, logger="data_shards"), pytest.raises(
            Exception, match="more than max_bad_samples=8"):
        next(iter(stream))  # every 8 x 8 image is over 63 pixels
    assert "is a 8 x 8 image, 64 pixels, more than max_image_pixels 63" in caplog.text
