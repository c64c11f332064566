"""Bad data: truncated shards, undecodable images, missing fields, unsafe tar members."""

import io
import logging
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_shards import (DataError, EvalStream, GeometryConfig, ShardIndex, ShardStream, ViewConfig,
                         ViewsConfig, pack)
from data_shards.__main__ import main
from data_shards.safety import ShardError, read_shard

VIEWS = ViewsConfig(geometry=GeometryConfig(size=8), views={"image": ViewConfig()})


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def digits_with_truncated_shard(tmp_path) -> tuple[Path, str]:
    """1,797 digits in 4 shards; the third is cut in the middle of a member."""
    pack("sklearn:digits", tmp_path, max_samples_per_shard=500, workers=1, progress=False)
    broken = ShardIndex.load(tmp_path).urls[2]
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[: len(data) // 2 + 100])
    return tmp_path, broken


def test_verify_reports_the_truncated_shard(digits_with_truncated_shard, capsys):
    directory, broken = digits_with_truncated_shard
    assert main(["verify", str(directory)]) == 1
    out = capsys.readouterr().out
    assert f"bad: shard {broken}" in out and "truncated or corrupt after sample 'digits_" in out
    assert "verify: FAILED" in out


def test_stream_skips_counts_and_logs_the_truncated_shard(digits_with_truncated_shard, caplog):
    directory, broken = digits_with_truncated_shard

    def make():
        return ShardStream(directory, batch_size=32, rank=0, world_size=1, num_workers=0, views=VIEWS, shuffle_buffer=32, seed=1)

    stream = make()
    with caplog.at_level(logging.WARNING, logger="data_shards"):
        batches = [batch for _, batch in zip(range(30), stream)]
    assert all(len(batch["key"]) == 32 for batch in batches)  # bad samples are replaced, batches stay full
    assert stream.bad_samples > 0 and batches[-1]["bad_samples"] == stream.bad_samples
    assert any(broken in record.getMessage() for record in caplog.records)

    # Resuming past the bad shard is still exact: the saved positions account for the skipped items.
    interrupted = make()
    for _, _ in zip(range(18), interrupted):
        pass
    assert interrupted.bad_samples > 0  # the interruption comes after the bad shard was met
    restored = make()
    restored.load_state_dict(interrupted.state_dict())
    assert [b["key"] for _, b in zip(range(12), restored)] == [b["key"] for b in batches[18:]]
    assert restored.bad_samples == stream.bad_samples

    with pytest.raises(DataError, match=r"more than max_bad_samples=0.*truncated"):
        for _ in ShardStream(directory, batch_size=32, rank=0, world_size=1, num_workers=2, views=VIEWS, shuffle_buffer=32, max_bad_samples=0):
            pass


def test_eval_stream_pads_what_a_truncated_shard_lost(digits_with_truncated_shard):
    directory, _ = digits_with_truncated_shard
    stream = EvalStream(directory, batch_size=256, rank=0, world_size=1, views=VIEWS)
    batches = list(stream)
    valid = sum(int(b["valid"].sum()) for b in batches)
    assert len(batches) == len(stream) == 8
    assert 0 < stream.bad_samples and valid + stream.bad_samples == 1797


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def test_undecodable_image_and_missing_field_are_skipped_and_named(tmp_path, caplog):
    shard = tmp_path / "mixed-000000.tar"
    good = [{"__key__": f"good{i}", "png": _png(10 * i), "cls": b"1"} for i in range(6)]
    _write_tar(shard, good[:3] + [{"__key__": "garbled", "png": b"not a png", "cls": b"1"}, {"__key__": "nolabel_noimage", "json": b"{}"}] + good[3:])
    stream = ShardStream([str(shard)], batch_size=4, rank=0, world_size=1, num_workers=0, samples_per_epoch=4, views=VIEWS, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="data_shards"):
        first = next(iter(stream))
    assert first["key"] == ["good0", "good1", "good2", "good3"]
    assert first["bad_samples"] == 2 and stream.bad_samples == 2
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "sample 'garbled': field 'png' does not decode" in messages
    assert "sample 'nolabel_noimage': missing an image field" in messages


def test_tar_with_parent_directory_member_is_refused(tmp_path, capsys):
    shard = tmp_path / "evil-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("ok.png", _png(1)), ("ok.cls", b"0"), ("../escape.cls", b"1")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"refused: tar member '\.\./escape\.cls'"):
        list(read_shard(str(shard)))

    absolute = tmp_path / "abs-000000.tar"
    with tarfile.open(absolute, "w") as tar:
        info = tarfile.TarInfo("/etc/x.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(ShardError, match="refused"):
        list(read_shard(str(absolute)))

    stream = ShardStream([str(shard)], batch_size=2, rank=0, world_size=1, num_workers=0, samples_per_epoch=2, views=VIEWS, max_bad_samples=3)
    with pytest.raises(DataError, match=r"max_bad_samples=3.*refused"):
        next(iter(stream))  # the shard never gets past its unsafe member, so the stream stops


def test_shard_that_cannot_be_opened_is_reported_with_its_url(tmp_path):
    index_dir = tmp_path / "gone"
    pack("sklearn:digits", index_dir, max_samples_per_shard=1000, workers=1, progress=False)
    missing = ShardIndex.load(index_dir).urls[1]
    Path(missing).unlink()
    with pytest.raises(DataError, match=f"Shard {missing} does not exist"):
        ShardStream(index_dir, batch_size=8, rank=0, world_size=1)
    with pytest.raises(ShardError, match=f"Shard {missing}: cannot be opened"):
        list(read_shard(missing))
