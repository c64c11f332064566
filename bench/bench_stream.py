"""Streaming throughput: ShardStream over webdataset shards vs a map-style torchvision ImageFolder loader.

Both read the same JPEG files (the shards hold the original bytes), decode them with PIL and apply
the same views (RandomResizedCrop 224 + flip + ImageNet normalisation, data_shards.views.make_views),
with 2 DataLoader workers and batch size 64, in one run, alternating. Prints the ratio last.

    python bench/bench_stream.py [--images 2000] [--rounds 2]
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_shards import ShardStream, ViewsConfig, pack  # noqa: E402
from data_shards.views import make_views  # noqa: E402

VIEWS = ViewsConfig()  # RandomResizedCrop 224, bicubic, hflip 0.5, one "image" view with ImageNet normalisation
BATCH, WORKERS = 64, 2


def make_images(root: Path, count: int, classes: int = 4) -> None:
    """Smooth random colour fields at 320x256 as JPEG (quality 90): ImageNet-like decode cost per pixel."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((320, 256), Image.Resampling.BICUBIC)
        image.save(folder / f"img{i:05d}.jpg", quality=90)


class SameViews:
    """The ImageFolder transform: the same make_views as the stream, seeded per call."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.calls += 1
        return make_views(F.pil_to_tensor(image.convert("RGB")), VIEWS, seed=self.calls + os.getpid())["image"]


def time_imagefolder(root: Path, count: int) -> float:
    loader = DataLoader(ImageFolder(str(root), transform=SameViews()), batch_size=BATCH, shuffle=True, num_workers=WORKERS)
    start, seen = time.perf_counter(), 0
    for images, labels in loader:
        seen += len(labels)
    assert seen == count
    return seen / (time.perf_counter() - start)


def time_stream(shards: Path, count: int) -> float:
    stream = ShardStream(shards, batch_size=BATCH, rank=0, world_size=1, num_workers=WORKERS, views=VIEWS)
    start, seen = time.perf_counter(), 0
    for batch in stream:
        seen += len(batch["key"])
        if stream.epoch == 1:
            break
    assert seen >= count
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "images", Path(tmp) / "shards"
        make_images(root, args.images)
        pack(str(root), shards, max_samples_per_shard=250, workers=WORKERS, progress=False)
        print(f"{args.images} JPEGs 320x256, batch {BATCH}, {WORKERS} workers, views: RandomResizedCrop 224 + flip + normalize")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}")
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        ratios, stream_rates, folder_rates = [], [], []
        for round_number in range(args.rounds):  # alternate, so both see the same machine state
            folder_rates.append(time_imagefolder(root, args.images))
            stream_rates.append(time_stream(shards, args.images))
            ratios.append(stream_rates[-1] / folder_rates[-1])
            print(f"round {round_number + 1}: ImageFolder {folder_rates[-1]:7.1f} samples/s   ShardStream {stream_rates[-1]:7.1f} samples/s   ratio {ratios[-1]:.2f}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        print(f"median: ImageFolder {statistics.median(folder_rates):.1f} samples/s, ShardStream {statistics.median(stream_rates):.1f} samples/s")
        print(f"ratio ShardStream / ImageFolder (median of rounds): {statistics.median(ratios):.2f}")

if __name__ == "__main__":
    main()
