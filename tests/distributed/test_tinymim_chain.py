"""A CPU-sized twin of TinyMIM's sequential chain, on 2 real ZeRO-3 ranks:
"ViT-B" -> "ViT-S" with relation and feature objectives combined, then "ViT-S" -> "ViT-T"
(activation checkpointing on) with the first stage's exported student as the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import ZERO3_CONFIGS, run_deepspeed, write_spec

pytestmark = pytest.mark.distributed

STEPS = 14
GRID = {"img_size": 16, "patch_size": 4, "num_classes": 0}
VIT_B = {**GRID, "embed_dim": 64, "depth": 2, "num_heads": 4}
VIT_S = {**GRID, "embed_dim": 32, "depth": 2, "num_heads": 2}
VIT_T = {**GRID, "embed_dim": 16, "depth": 2, "num_heads": 1}


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory, digits_shards) -> Path:
    import timm
    work = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", **VIT_B).state_dict(),
              str(work / "vit_b.safetensors"))
    relation = {"kind": "relation", "teacher_qkv": "blocks.1.attn.qkv",
                "student_qkv": "blocks.1.attn.qkv", "chunk_rows": 5}
    spec = {
        "name": "chain-test", "run_dir": str(work / "run"),
        "data": {"train": str(digits_shards / "train"), "micro_batch_size": 16, "num_workers": 1,
                 "views": {"geometry": {"size": 16, "scale": [0.6, 1.0], "interpolation": "bilinear"},
                           "views": {"teacher": {}, "student": {"color_jitter": 0.4}}}},
        "optimisation": {"lr": 3e-3, "betas": [0.9, 0.95], "warmup_steps": 2, "steps": STEPS},
        "checkpointing": {"every_steps": STEPS},
        "deepspeed": ZERO3_CONFIGS,
        "logging": {"every_steps": 1},
        "stages": [
            {"name": "vit_small",
             "teacher": {"arch": "timm:vit_tiny_patch16_224", "kwargs": VIT_B,
                         "weights": str(work / "vit_b.safetensors"), "dtype": "fp32"},
             "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": VIT_S, "dtype": "fp32",
                         "drop_path_rate": 0.1, "drop_path_schedule": "constant"},
             # Relation from the last block's qkv, plus FD on the block's output: the
             # combination a user would try first.
             "objectives": [relation, {"kind": "feature", "student_tap": "blocks.1",
                                       "teacher_tap": "blocks.1", "weight": 0.5}]},
            {"name": "vit_tiny",
             "teacher": {"arch": "stage:vit_small", "dtype": "fp32"},
             # Activation checkpointing on, with the tap inside a checkpointed block.
             "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": VIT_T, "dtype": "fp32",
                         "grad_checkpointing": True},
             "objectives": [relation]},
        ],
    }
    result = run_deepspeed(write_spec(work / "job.yaml", spec))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "run"


def records(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["vit_small", "vit_tiny"])
def test_every_stage_runs_and_its_loss_falls(chain_run, stage):
    rows = records(chain_run / stage)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.9 * first, [r["loss"] for r in rows]


def test_combined_objectives_each_fall(chain_run):
    rows = records(chain_run / "vit_small")
    for term in ("loss/relation", "loss/feature"):
        assert sum(r[term] for r in rows[-3:]) < sum(r[term] for r in rows[:3]), term


def test_second_stage_is_taught_by_the_first_stages_export(chain_run):
    summary = json.loads((chain_run / "vit_tiny" / "export" / "metrics.json").read_text())
    assert summary["teacher_weights"] == str(chain_run / "vit_small" / "export" / "model.safetensors")
    assert json.loads((chain_run / "vit_small" / "export" / "model.json").read_text())["kwargs"] == VIT_S
