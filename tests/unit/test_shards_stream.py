"""Streaming sklearn:digits: round trip, equal batch counts per rank, exact resume, EvalStream, URL forms."""

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from data_shards import (DataError, EvalStream, GeometryConfig, ShardIndex, ShardStream, ViewConfig,
                         ViewsConfig, pack)
from data_shards.__main__ import main

# 8x8 output, no resampling and no normalisation: the stream must hand back the packed pixels.
IDENTITY = ViewsConfig(geometry=GeometryConfig(size=8, crop="resize", interpolation="nearest", hflip=0), views={"image": ViewConfig(normalize="none")})
AUGMENTED = ViewsConfig(
    geometry=GeometryConfig(size=8, scale=(0.3, 1.0)),
    views={"teacher": ViewConfig(normalize="clip"), "student": ViewConfig(color_jitter=0.4)},
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory) -> Path:
    """All 1,797 digits in 5 shards of 360, 360, 360, 360 and 357 samples."""
    out = tmp_path_factory.mktemp("digits5")
    pack("sklearn:digits", out, max_samples_per_shard=360, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def split_shards(digits_shards) -> Path:
    return digits_shards


def _expected_pixels(digits, key: str) -> torch.Tensor:
    i = int(key.removeprefix("digits_"))
    grey = torch.from_numpy(np.rint(digits.images[i] * 255 / 16) / 255).float()
    return grey.expand(3, 8, 8)


def take(stream, n: int) -> list[dict]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def test_digits_pack_verify_eval_round_trip(split_shards, digits, capsys):
    assert main(["verify", str(split_shards)]) == 0
    assert "all samples decode" in capsys.readouterr().out
    seen = {}
    for split in ("train", "holdout"):
        index = ShardIndex.load(split_shards / split)
        assert index.classes == [str(d) for d in range(10)]
        for batch in EvalStream(split_shards / split, batch_size=256, rank=0, world_size=1, views=IDENTITY):
            for key, label, image, valid in zip(batch["key"], batch["label"], batch["image"], batch["valid"]):
                if valid:
                    assert key not in seen, "a sample is on both sides of the split"
                    seen[key] = (int(label), image)
    assert len(seen) == 1797
    for key, (label, image) in seen.items():
        assert label == digits.target[int(key.removeprefix("digits_"))]
        torch.testing.assert_close(image, _expected_pixels(digits, key), atol=1e-6, rtol=0)


def test_shard_stream_batches_carry_true_labels_and_views(five_shards, digits):
    stream = ShardStream(five_shards, batch_size=32, rank=0, world_size=1, num_workers=0, views=IDENTITY, shuffle_buffer=64)
    for batch in take(stream, 5):
        assert batch["image"].shape == (32, 3, 8, 8) and batch["label"].dtype == torch.long
        for key, label, image in zip(batch["key"], batch["label"], batch["image"]):
            assert label == digits.target[int(key.removeprefix("digits_"))]
            torch.testing.assert_close(image, _expected_pixels(digits, key), atol=1e-6, rtol=0)
        assert batch["bad_samples"] == 0
    augmented = take(ShardStream(five_shards, batch_size=16, rank=0, world_size=1, num_workers=0, views=AUGMENTED, shuffle_buffer=64), 1)[0]
    assert set(augmented) == {"key", "label", "teacher", "student", "bad_samples"}
    assert augmented["teacher"].shape == augmented["student"].shape == (16, 3, 8, 8)


def test_world_size_2_with_5_shards_gives_equal_batch_counts(five_shards):
    index = ShardIndex.load(five_shards)
    assert len(index.shards) == 5 and index.total == 1797
    counts = {}
    for rank in (0, 1):
        stream = ShardStream(five_shards, batch_size=64, rank=rank, world_size=2, num_workers=0, views=IDENTITY, shuffle_buffer=64)
        assert stream.batches_per_epoch == 15  # ceil(1797 / 128)
        per_epoch: dict[int, int] = {}
        iterator = iter(stream)
        while stream.epoch < 2:
            epoch = stream.epoch
            next(iterator)
            per_epoch[epoch] = per_epoch.get(epoch, 0) + 1
        counts[rank] = per_epoch
    assert counts[0] == counts[1] == {0: 15, 1: 15}


def test_ranks_and_epochs_see_different_samples(five_shards):
    def keys(rank, seed=0, epoch=0):
        stream = ShardStream(five_shards, batch_size=64, rank=rank, world_size=2, num_workers=0, seed=seed, views=IDENTITY, shuffle_buffer=64)
        stream.load_state_dict({"epoch": epoch, "batch": 0})
        return take(stream, 1)[0]["key"]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1) and keys(0) != keys(0, seed=1) and keys(0) != keys(0, epoch=1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_stream_yields_the_uninterrupted_batches(five_shards, num_workers):
    def make():
        return ShardStream(five_shards, batch_size=32, rank=1, world_size=2, num_workers=num_workers, seed=5,
                           views=AUGMENTED, samples_per_epoch=320, shuffle_buffer=100)  # fmt: skip

    uninterrupted = take(make(), 13)  # 5 batches per epoch: crosses two epoch boundaries
    interrupted = make()
    take(interrupted, 7)
    state = interrupted.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    for saved in (state, {"epoch": state["epoch"], "batch": state["batch"]}):  # full and minimal state
        restored = make()
        restored.load_state_dict(saved)
        for expected, actual in zip(uninterrupted[7:], take(restored, 6)):
            assert actual["key"] == expected["key"]
            for name in ("label", "teacher", "student"):
                assert torch.equal(actual[name], expected[name])
        assert restored.state_dict()["epoch"] == 2


def test_eval_stream_covers_every_sample_once_with_equal_lengths(five_shards):
    streams = [EvalStream(five_shards, batch_size=100, rank=r, world_size=3, views=IDENTITY) for r in range(3)]
    assert len({len(s) for s in streams}) == 1 and len(streams[0]) == 6  # ceil(ceil(1797/3) / 100)
    keys = []
    for stream in streams:
        batches = list(stream)
        assert len(batches) == len(stream)
        for batch in batches:
            assert batch["image"].shape[0] == len(batch["valid"]) == 100
            keys += [k for k, v in zip(batch["key"], batch["valid"]) if v]
            assert (batch["label"][~batch["valid"]] == -1).all()
    assert len(keys) == len(set(keys)) == 1797


def test_url_forms(five_shards):
    pattern = str(five_shards / "digits-{000000..000004}.tar")
    with pytest.raises(DataError, match="samples_per_epoch is required"):
        ShardStream(pattern, batch_size=8, rank=0, world_size=1)
    by_pattern = ShardStream(pattern, batch_size=8, rank=0, world_size=1, num_workers=0, samples_per_epoch=80, views=IDENTITY, shuffle_buffer=8)
    assert by_pattern.batches_per_epoch == 10 and len(by_pattern.urls) == 5
    assert take(by_pattern, 1)[0]["label"].shape == (8,)

    piped = [f"pipe:cat {url}" for url in ShardIndex.load(five_shards).urls]
    with pytest.raises(DataError, match="allow_pipe=True"):
        ShardStream(piped, batch_size=8, rank=0, world_size=1, samples_per_epoch=80)
    by_pipe = ShardStream(piped, batch_size=8, rank=0, world_size=1, num_workers=0, samples_per_epoch=80, views=IDENTITY, shuffle_buffer=8, allow_pipe=True)
    by_list = ShardStream(ShardIndex.load(five_shards).urls, batch_size=8, rank=0, world_size=1, num_workers=0, samples_per_epoch=80, views=IDENTITY, shuffle_buffer=8)
    assert [k.split(":")[-1] for k in take(by_pipe, 2)[1]["key"]] == take(by_list, 2)[1]["key"]
    with pytest.raises(DataError, match="does not exist"):
        ShardStream([str(five_shards / "nope.tar")], batch_size=8, rank=0, world_size=1, samples_per_epoch=8)


def _rank_process(shards: Path, rank: int, port: int, results) -> None:
    """One simulated rank: RANK/WORLD_SIZE in the environment, a real gloo all_reduce per batch."""
    import datetime

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    stream = ShardStream(shards, batch_size=50, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                         num_workers=0, views=IDENTITY, samples_per_epoch=450, shuffle_buffer=32)  # fmt: skip
    batches = 0
    for batch in stream:
        dist.all_reduce(torch.tensor([len(batch["key"])]))  # a rank with fewer batches would leave the other waiting here
        batches += 1
        if stream.epoch == 2:
            break
    dist.destroy_process_group()
    results.put((rank, batches))


def test_two_real_ranks_never_wait_at_a_collective(five_shards):
    context = multiprocessing.get_context("fork")  # children inherit the imports: no 10 s interpreter start
    results = context.Queue()
    port = 29500 + os.getpid() % 2000
    ranks = [context.Process(target=_rank_process, args=(five_shards, rank, port, results)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=90)
    assert [process.exitcode for process in ranks] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in ranks) == [(0, 10), (1, 10)]  # 2 epochs of ceil(450 / 100)


def test_inspect_prints_samples_and_draws_a_contact_sheet(split_shards, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["inspect", str(split_shards), "--count", "10", "--png", str(sheet)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("digits_")]
    assert len(lines) == 10 and all("image 8x8" in line and "label " in line for line in lines)
    from PIL import Image

    with Image.open(sheet) as image:
        assert image.size == (8 * 96, 2 * (96 + 14))  # 10 tiles in rows of 8, each with a caption
