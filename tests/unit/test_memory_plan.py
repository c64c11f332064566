"""The memory planner: a plan that does not fit naming the setting that would make it fit,
and what sharding, checkpointing and chunking change (the estimate against measured peaks:
``tests/distributed/test_memory_measured.py``)."""

from __future__ import annotations

import re

import pytest

from distill_engine.cli.main import main as cli_main
from distill_engine.planning.load import load_plan
from distill_engine.planning.placement import memory_report
from helpers import ROOT


def plan_output(*args: str) -> tuple[int, str]:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli_main(["--spec", str(ROOT / "jobs" / "fd_vitl.yaml"), "--plan", *args])
    return code, re.sub(r"\s+", " ", out.getvalue())


def test_a_plan_that_does_not_fit_says_which_setting_would_make_it_fit():
    # The paper-scale spec's weights and shards are not on this machine: warnings, not errors.
    code, text = plan_output("--world-size", "8", "--gpu-memory", "10GB")
    assert code == 3, text
    assert "does not exist (a memory plan needs shapes only)" in text
    assert "does not fit" in text
    assert "would fit with: turn on activation checkpointing" in text
    assert re.search(r"would fit with: micro-batch \d+ \(data.micro_batch_size\)", text), text
    code, text = plan_output("--world-size", "8", "--gpu-memory", "80GB")
    assert code == 0 and "fits" in text and "does not fit" not in text, text


def test_sharding_and_checkpointing_shrink_what_they_should():
    job = load_plan(ROOT / "jobs" / "fd_vitl.yaml", world_size=8, missing_inputs_ok=True)
    at = {n: {l.what: l.bytes for l in memory_report(job.stages[0], n).lines} for n in (8, 64)}
    # The shard is parameters x 2 B / N plus a gathered working set that does not depend on N.
    params = job.stages[0].models.teacher_params_kept
    saved = at[8]["teacher shard"] - at[64]["teacher shard"]
    assert saved == pytest.approx(params * 2 * (1 / 8 - 1 / 64), rel=1e-6)
    on = load_plan(ROOT / "jobs" / "fd_vitl.yaml", ["stages.0.student.grad_checkpointing=true"],
                   world_size=8, missing_inputs_ok=True)
    with_ckpt = {l.what: l.bytes for l in memory_report(on.stages[0], 8).lines}
    assert with_ckpt["student activations"] < at[8]["student activations"] / 4


def relation_plan(tmp_path, chunk_rows):
    from helpers import TINY_VIT, TINY_VIT_ARCH, write_spec
    (tmp_path / "shards").mkdir(exist_ok=True)
    spec = {"name": "relation", "run_dir": str(tmp_path / "run"),
            "data": {"train": str(tmp_path / "shards"), "micro_batch_size": 8,
                     "views": {"geometry": {"size": TINY_VIT["img_size"]}}},
            "optimisation": {"lr": 1e-4, "steps": 3},
            "stages": [{"name": "tinymim",
                        "teacher": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT,
                                    "weights": str(tmp_path / "absent.safetensors")},
                        "student": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT},
                        "objectives": [{"kind": "relation", "student_qkv": "blocks.1.attn.qkv",
                                        "teacher_qkv": "blocks.1.attn.qkv",
                                        "chunk_rows": chunk_rows}]}]}
    job = load_plan(write_spec(tmp_path / f"job{chunk_rows}.yaml", spec), missing_inputs_ok=True)
    memory = memory_report(job.stages[0], world_size=1)
    return next(line for line in memory.lines if line.what == "objective")


def test_plan_counts_the_relation_maps_and_fewer_with_chunk_rows(tmp_path):
    tokens, heads, batch = 17, 2, 8          # 32 px / 8 px patches + CLS; TINY_VIT's heads
    whole = relation_plan(tmp_path, None)
    # Q-K and V-V relations, each at least one [h, N, N] fp32 map per sample.
    assert whole.bytes >= 2 * heads * tokens * tokens * 4 * batch, whole
    chunked = relation_plan(tmp_path, 4)
    assert chunked.bytes < whole.bytes / 2, (chunked, whole)
    assert "chunk_rows 4" in chunked.note
