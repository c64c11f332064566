"""pack: a source -> `NAME-000000.tar`, ... plus index.json (optionally split into train/ and holdout/)."""

import io
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import webdataset as wds
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from .errors import DataError
from .index import INDEX_NAME, IndexFile, ShardEntry, write_index
from .keys import derive_seed, in_holdout
from .sources import Source, SourceItem, load_source

KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the stream decodes; others become PNG
DEFAULT_MAX_SHARD_BYTES = 1_000_000_000


def encode_item(item: SourceItem, resize_max_side: int | None) -> dict:
    """One source item -> one webdataset sample (bytes per extension). Runs in the worker processes."""
    sample: dict = {"__key__": item.key}
    meta: dict = {"source": item.source}
    if item.text is not None:
        sample["txt"] = item.text.encode("utf-8")
    else:
        image_field, data, size = _encode_image(item, resize_max_side)
        sample[image_field] = data
        meta["size"] = list(size)
    if item.label is not None:
        sample["cls"] = str(item.label).encode("ascii")
    sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return sample


def _encode_image(item: SourceItem, resize_max_side: int | None) -> tuple[str, bytes, tuple[int, int]]:
    if item.pixels is not None:
        image, original = Image.fromarray(item.pixels, mode="L"), None
    else:
        try:
            original = Path(item.path).read_bytes()
            image = Image.open(io.BytesIO(original))
            image.load()  # decode fully now: a broken file is reported at pack time, not mid-training
        except Exception as exn:
            raise DataError(f"Cannot decode image {item.source} ({type(exn).__name__}: {exn}); fix or remove the file.") from None
    if resize_max_side and max(image.size) > resize_max_side:
        scale = resize_max_side / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    elif original is not None and image.format in KEEP_AS_IS:
        return KEEP_AS_IS[image.format], original, image.size
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless and byte-for-byte reproducible
    return "png", buffer.getvalue(), image.size


def select_classes(loaded: Source, classes: list[int], source: str) -> Source:
    """Only the samples of ``classes``, relabelled 0, 1, ... in the order given (a class
    split: pre-train on some classes, fine-tune on the others)."""
    names = loaded.classes or []
    if not all(item.label is not None for item in loaded.items):
        raise DataError(f"--classes needs a labelled source; {source} has unlabelled samples.")
    bad = [c for c in classes if not 0 <= c < len(names)]
    if not classes or bad or len(set(classes)) != len(classes):
        raise DataError(f"--classes {','.join(map(str, classes))} must name distinct class indices of {source}, which has {len(names)} classes (0..{len(names) - 1}: {', '.join(names)}).")
    new_label = {old: new for new, old in enumerate(classes)}
    items = [replace(item, label=new_label[item.label]) for item in loaded.items if item.label in new_label]
    return Source(items, loaded.modality, [names[c] for c in classes], loaded.name)


def _at_most_per_class(items: list[SourceItem], split_of: list[str], limit: int, source: str) -> tuple[list[SourceItem], list[str]]:
    """The first ``limit`` samples of each class in each split, in the packed order (a
    subset of what the same command without the limit packs into that split)."""
    if not all(item.label is not None for item in items):
        raise DataError(f"--max-per-class needs a labelled source; {source} has unlabelled samples.")
    seen: Counter = Counter()
    kept = []
    for item, split in zip(items, split_of):
        seen[split, item.label] += 1
        if seen[split, item.label] <= limit:
            kept.append((item, split))
    return [item for item, _ in kept], [split for _, split in kept]


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} samples/s" if task.speed else "- samples/s", style="progress.data.speed")


def _encode_in_pool(items: list[SourceItem], resize_max_side: int | None, workers: int):
    """Encoded samples in the order of `items`, whatever the number of processes."""
    if workers <= 1:
        for item in items:
            yield encode_item(item, resize_max_side)
        return
    # fork: workers inherit the already-imported modules, so they start in milliseconds
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_encode_star, ((item, resize_max_side) for item in items), chunksize=16)


def _encode_star(args: tuple[SourceItem, int | None]) -> dict:
    return encode_item(*args)


def pack(
    source: str,
    out: str | os.PathLike,
    *,
    prefix: str | None = None,
    max_samples_per_shard: int | None = None,
    max_shard_bytes: int | None = None,
    resize_max_side: int | None = None,
    workers: int = 2,
    holdout: float | None = None,
    seed: int = 0,
    progress: bool = True,
    classes: list[int] | None = None,
    max_per_class: int | None = None,
) -> list[Path]:
    """Pack `source` into shards under `out`; returns the index paths written (one, or train + holdout)."""
    if max_samples_per_shard is not None and max_shard_bytes is not None:
        raise DataError("Give --max-samples-per-shard or --max-shard-bytes, not both.")
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise DataError(f"--max-samples-per-shard must be at least 1, not {max_samples_per_shard}.")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise DataError(f"--max-shard-bytes must be positive, not {max_shard_bytes}.")
    if holdout is not None and not 0 < holdout < 1:
        raise DataError(f"--holdout is the held-out fraction, strictly between 0 and 1; got {holdout}.")
    if resize_max_side is not None and resize_max_side < 1:
        raise DataError(f"--resize-max-side must be a positive number of pixels, not {resize_max_side}.")
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"--max-per-class must be at least 1, not {max_per_class}.")
    loaded: Source = load_source(source)
    if classes is not None:
        loaded = select_classes(loaded, classes, source)
    prefix = prefix or loaded.name
    if not all(c.isalnum() or c in "_-" for c in prefix):
        raise DataError(f"--prefix '{prefix}' may hold only letters, digits, '_' and '-'.")
    out = Path(out)

    # A fixed pseudo-random order (by key and seed) mixes classes across shards, reproducibly.
    items = sorted(loaded.items, key=lambda item: derive_seed("order", seed, item.key))
    if holdout is None:
        splits = {"all": out}
        split_of = ["all"] * len(items)
    else:
        splits = {"train": out / "train", "holdout": out / "holdout"}
        split_of = ["holdout" if in_holdout(item.key, holdout, seed) else "train" for item in items]
        for name in splits:
            if name not in split_of:
                raise DataError(f"--holdout {holdout} with --seed {seed} leaves the {name} split of {len(items)} samples empty; choose another fraction.")

    if max_per_class is not None:
        items, split_of = _at_most_per_class(items, split_of, max_per_class, source)

    args = {
        "source": source, "out": str(out), "prefix": prefix, "max_samples_per_shard": max_samples_per_shard,
        "max_shard_bytes": max_shard_bytes, "resize_max_side": resize_max_side, "holdout": holdout, "seed": seed,
        "classes": classes, "max_per_class": max_per_class,
    }  # fmt: skip
    # Shards are written into a hidden folder beside the output and swapped in only once
    # every sample has been encoded: a source that fails half-way (an image that does not
    # decode) leaves the shards and index a job may be reading as they were.
    staging = _staging_folder(out, prefix)
    try:
        writers, counts = {}, {}
        for split in splits:
            (staging / split).mkdir()
            writers[split] = wds.ShardWriter(
                str(staging / split / f"{prefix}-%06d.tar"),
                maxcount=max_samples_per_shard or 10**12,
                maxsize=max_shard_bytes or (DEFAULT_MAX_SHARD_BYTES if max_samples_per_shard is None else 10**15),
                verbose=0,
                mtime=0,  # a fixed timestamp makes the tar bytes reproducible
                encoder=False,
            )
            counts[split] = Counter()

        columns = [TextColumn("pack {task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn()]
        try:
            with Progress(*columns, disable=not progress, transient=False) as bar:
                task = bar.add_task(source, total=len(items))
                for split, sample in zip(split_of, _encode_in_pool(items, resize_max_side, workers)):
                    writer = writers[split]
                    writer.write(sample)
                    counts[split][os.path.basename(writer.fname)] += 1
                    bar.advance(task)
        finally:
            for writer in writers.values():
                writer.close()

        for split in splits:
            shards = [
                ShardEntry(name=name, samples=count, bytes=(staging / split / name).stat().st_size)
                for name, count in sorted(counts[split].items())
            ]
            raw = IndexFile(
                prefix=prefix, modality=loaded.modality, shards=shards, total=sum(counts[split].values()),
                classes=loaded.classes, labelled=items[0].label is not None, split=split, args=args,
            )  # fmt: skip
            write_index(staging / split, raw)
        return [_swap_in(staging / split, directory, prefix) for split, directory in splits.items()]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_folder(out: Path, prefix: str) -> Path:
    """A new hidden folder in ``out`` (the same filesystem, so that the swap is renames),
    named by host and process. Folders a killed pack of this prefix on this host left
    behind are deleted first."""
    out.mkdir(parents=True, exist_ok=True)
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname())
    for left in out.glob(f".{prefix}.packing-{host}-*"):
        pid = left.name.removeprefix(f".{prefix}.packing-{host}-").split("-", 1)[0]
        if pid.isdigit() and not _is_running(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{prefix}.packing-{host}-{os.getpid()}-", dir=out))


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(staged: Path, directory: Path, prefix: str) -> Path:
    """Replaces the shards of ``prefix`` and the index in ``directory`` by the staged ones
    (renames on one filesystem); the index goes last, so that it never names a shard that
    is not there yet. Shards of other prefixes are left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    new = {path.name for path in staged.glob(f"{prefix}-*.tar")}
    for name in sorted(new):
        os.replace(staged / name, directory / name)
    # Re-running replaces the previous shards of this prefix instead of adding duplicates.
    for stale in directory.glob(f"{prefix}-*.tar"):
        if stale.name not in new:
            stale.unlink(missing_ok=True)
    os.replace(staged / INDEX_NAME, directory / INDEX_NAME)
    return directory / INDEX_NAME
