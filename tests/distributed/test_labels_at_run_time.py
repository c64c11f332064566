"""A label the student cannot score, met while training on real ranks: shards given as a
list of urls have no index for --check to read, so the stream counts such samples as bad,
naming shard and key, instead of ending in "IndexError: Target 9 is out of bounds"."""

from __future__ import annotations

import json

import pytest

from helpers import DIGITS_STUDENT, run_deepspeed, write_spec

pytestmark = pytest.mark.distributed


def test_out_of_range_labels_are_bad_samples_named_by_shard_and_key(digits_shards, tmp_path):
    index = json.loads((digits_shards / "train" / "index.json").read_text())
    urls = [str(digits_shards / "train" / shard["name"]) for shard in index["shards"]]
    spec = {
        "name": "labels", "run_dir": str(tmp_path / "run"),
        "data": {"train": urls, "samples_per_epoch": 64, "micro_batch_size": 16,
                 "num_workers": 0, "max_bad_samples": 1000,
                 "views": {"geometry": {"size": 24}}},
        "optimisation": {"lr": 1e-3, "steps": 2},
        "logging": {"every_steps": 1},
        "stages": [{"name": "ce",
                    "student": {"arch": "timm:vit_tiny_patch16_224",
                                "kwargs": {**DIGITS_STUDENT, "num_classes": 8}, "dtype": "fp32"},
                    "objectives": [{"kind": "cross_entropy"}]}],
    }
    result = run_deepspeed(write_spec(tmp_path / "job.yaml", spec), timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "IndexError" not in log and "Traceback" not in log
    # Log lines are wrapped at the console's width: compare without whitespace.
    flat = "".join(log.split())

    def said(text: str) -> bool:
        return "".join(text.split()) in flat
    assert said("skipped a bad sample") and said(f"shard {digits_shards / 'train'}/"), log[-5000:]
    assert said("is outside the model's 8 classes (0..7)"), log[-5000:]
