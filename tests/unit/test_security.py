"""Inputs are data, never code: crafted pickles are refused, `pipe:` shard urls run only when
the spec opts in (and are logged with their command), unsafe tar members are refused."""

from __future__ import annotations

import copy
import io
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch

from data_shards import DataError, ShardStream
from data_shards.safety import ShardError, read_shard
from distill_engine.weights import WeightsError, read_state_dict
from helpers import check_in_process, write_spec
from test_bad_input import base  # noqa: F401  (a valid spec to break)


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted_pickle(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "teacher.pt"
    torch.save({"blocks.0.weight": torch.zeros(2), "payload": RunsCode(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_crafted_pickle_is_refused_and_runs_nothing(crafted_pickle):
    path, marker = crafted_pickle
    with pytest.raises(WeightsError, match="was refused: it is not a plain tensor checkpoint"):
        read_state_dict(path)
    assert not marker.exists()
    # The file is really malicious: an unsafe load runs its command (here: a harmless touch).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_crafted_pickle_as_teacher_or_init_weights_fails_the_spec(base, crafted_pickle,  # noqa: F811
                                                                  tmp_path):
    path, marker = crafted_pickle
    for field in ("teacher", "student"):
        spec = copy.deepcopy(base)
        if field == "teacher":
            spec["stages"][0]["teacher"]["weights"] = str(path)
        else:
            spec["stages"][0]["student"]["init"] = str(path)
        code, _, err = check_in_process(write_spec(tmp_path / "job.yaml", spec))
        assert code == 2 and "was refused" in err, err
        assert f"stages[0].{field}." in err
    assert not marker.exists()


@pytest.fixture(scope="module")
def shards(digits_shards) -> Path:
    return digits_shards / "train"


def test_pipe_urls_run_only_when_allowed_and_are_logged(shards, caplog):
    shard = sorted(shards.glob("*.tar"))[0]
    url = f"pipe:cat {shard}"
    with pytest.raises(DataError, match="pipe: command, which runs a shell command"):
        ShardStream([url], batch_size=4, rank=0, world_size=1, num_workers=0,
                    samples_per_epoch=8)
    with caplog.at_level(logging.INFO, logger="data_shards"):
        stream = ShardStream([url], batch_size=4, rank=0, world_size=1, num_workers=0,
                             samples_per_epoch=8, allow_pipe=True)
        batch = next(iter(stream))
    assert batch["image"].shape[0] == 4
    assert f"running the shell command of a pipe: shard url: cat {shard}" in caplog.text


def unsafe_shard(path: Path, member_name: str) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in ((member_name, b"1"), ("good.cls", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("member", ["../escape.cls", "/etc/escape.cls", "a/../../escape.cls"])
def test_tar_members_with_absolute_paths_or_dotdot_are_refused(tmp_path, member):
    shard = unsafe_shard(tmp_path / "evil.tar", member)
    with pytest.raises(ShardError, match="refused: tar member .* absolute path or '..'"):
        list(read_shard(str(shard)))
    assert not (tmp_path.parent / "escape.cls").exists()  # nothing is ever extracted
