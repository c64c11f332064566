"""jobs/self_distillation_text.yaml on 2 real ranks, every stage, with a tiny BERT in place
of MiniLM (built as MiniLM ships: a BertModel with a pooler and no masked-LM head, given one
by scripts/initial_mlm_model.py) and toy text: further pre-training with mlm, self-distillation
with hidden + mlm against the further pre-trained teacher, the three fine-tunings, and the
results table of scripts/self_distillation_results.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import (ROOT, bert_encoder_dir, env, run_deepspeed, script_module, tiny_text_splits,
                     tiny_tokenizer, write_spec)

pytestmark = pytest.mark.distributed

ORIGINS = {"finetune_selfdist": "selfdist", "finetune_further": "further",
           "finetune_initial": None}  # None: the initial model's file


def small_job(work: Path) -> dict:
    """The job's own stages, its paths pointing at toy data and a tiny initial model."""
    data = tiny_text_splits(work / "data", {"fewshot": (200, 0, True),
                                            "test_mlm": (60, 1, True),
                                            "test": (100, 2, True)})
    tokenizer = tiny_tokenizer(data / "tokenizer")
    script_module("initial_mlm_model").initial_mlm_model(
        bert_encoder_dir(work / "encoder", 64), work / "initial")
    text = (ROOT / "jobs" / "self_distillation_text.yaml").read_text()
    for path, replacement in (("data/selfdist_text/initial", work / "initial"),
                              ("data/well_read/minilm", tokenizer),
                              ("data/well_read/", f"{data}/")):
        text = text.replace(path, str(replacement))
    spec = yaml.safe_load(text)
    spec["run_dir"] = str(work / "run")
    spec["data"].update(num_workers=0, text={"tokenizer": str(tokenizer), "max_length": 16})
    spec["optimisation"].update(steps=4, lr=1e-3)
    spec["logging"] = {"every_steps": 1, "plot": False}
    for stage in spec["stages"]:
        stage.get("optimisation", {}).update(steps=4, warmup_steps=1)
    return spec


@pytest.fixture(scope="module")
def job_run(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("selfdist_text")
    spec = small_job(work)
    result = run_deepspeed(write_spec(work / "job.yaml", spec), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return work, output


def records(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "export" / "metrics.json").read_text())


def test_self_distillation_trains_mlm_and_hidden_against_the_further_pretrained_teacher(job_run):
    work, output = job_run
    run = work / "run"
    assert summary(run, "selfdist")["teacher_weights"] == str(run / "further" / "export" / "model.safetensors")
    assert all(math.isfinite(r["loss/mlm"]) for r in records(run / "further"))
    terms = records(run / "selfdist")
    assert len(terms) == 4
    assert all(math.isfinite(r["loss/mlm"]) and r["loss/hidden"] > 0 for r in terms)
    assert all(r["loss"] == pytest.approx(r["loss/mlm"] + r["loss/hidden"], rel=1e-5) for r in terms)
    # The teacher keeps its encoder only; both pre-training students load the initial model's
    # file whole, head included: only the three fine-tunings start anything fresh.
    assert "teacher pruned after its deepest tap: removed cls" in output
    # eval.loss: both pre-training stages end with their masked-LM loss on the held-out
    # sentences, and kNN beside it (they are labelled, as the training sentences are).
    for stage in ("further", "selfdist"):
        heldout = summary(run, stage)["heldout/mlm"]
        assert math.isfinite(heldout) and heldout > 0, (stage, heldout)
        assert 0.0 <= summary(run, stage)["knn_accuracy"] <= 1.0, stage
    assert "carry no labels" not in output
    assert "".join(output.split()).count("startfresh(notin") == len(ORIGINS)


def test_every_finetuning_starts_from_its_encoder_with_a_fresh_classifier_and_pooler(job_run):
    work, output = job_run
    run = work / "run"
    flat = "".join(output.split())  # the log may wrap anywhere, a long path included
    for stage, origin in ORIGINS.items():
        accuracy = summary(run, stage)["accuracy"]
        assert 0.0 <= accuracy <= 1.0, (stage, accuracy)
        source = run / origin / "export" / "model.safetensors" if origin else \
            work / "initial" / "model.safetensors"
        expected = (f"bert.pooler.dense.bias, bert.pooler.dense.weight, classifier.bias, "
                    f"classifier.weight start fresh (not in {source}")
        assert "".join(expected.split()) in flat, stage


def test_the_results_table_names_the_three_methods_and_the_verdict(job_run):
    work, _ = job_run
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "self_distillation_results.py"),
                             str(work / "run"), "0", "--curves", "--heldout"],
                            capture_output=True, text=True, env=env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    accuracy = {stage: summary(work / "run", stage)["accuracy"] for stage in ORIGINS}
    for stage, value in accuracy.items():
        assert f"{100 * value:.2f} %" in result.stdout, stage
    # One seed has no interval, so no verdict either way.
    assert "The paper's claim (self-distillation beats both baselines) is **not shown**" \
        in result.stdout
    # --heldout: the pre-training stages' held-out masked-LM loss (text has no initial MAE).
    lowest = min(record["heldout/mlm"] for record in
                 (json.loads(line) for line in (work / "run" / "further" / "eval.jsonl").open()))
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 0 | further |"))
    assert f"| {lowest:.4f} (" in row, row
