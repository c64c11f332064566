"""The Well-Read Students recipe (jobs/well_read_students.yaml), every stage and baseline,
at toy size on 2 real DeepSpeed ranks: a teacher fine-tuned with labels, a student
pre-trained with masked LM, distilled with soft labels on unlabelled text, fine-tuned; the
exports load in one line with transformers and compute what the engine's probe computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import ROOT, run_deepspeed, tiny_text_splits, tiny_tokenizer, write_spec

pytestmark = pytest.mark.distributed

TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 48}


def pretrained_l3_stand_in(directory: Path) -> Path:
    """A BertModel directory without a pooler, as scripts/onnx_to_bert.py writes the L3."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(7)
    BertModel(BertConfig(**TINY), add_pooling_layer=False).save_pretrained(directory)
    return directory


def small_recipe(tmp_path: Path) -> dict:
    """The recipe's own stages, on toy data and models, with few steps."""
    l3 = pretrained_l3_stand_in(tmp_path / "l3")
    data = tiny_text_splits(tmp_path / "data", {"labelled": (400, 0, True),
                                                 "transfer": (600, 1, False),
                                                 "test": (200, 2, True)})
    tokenizer = tiny_tokenizer(data / "tokenizer")
    spec = yaml.safe_load((ROOT / "jobs" / "well_read_students.yaml").read_text())
    spec["run_dir"] = str(tmp_path / "run")
    spec["data"].update(train=str(data / "labelled"), eval=str(data / "test"), num_workers=0,
                        text={"tokenizer": str(tokenizer), "max_length": 16})
    spec["optimisation"].update(steps=12, warmup_steps=2, lr=2e-3)
    spec["eval"] = {"batch_size": 64}
    for stage in spec["stages"]:
        if stage.get("data", {}).get("train", "").endswith("transfer"):
            stage["data"]["train"] = str(data / "transfer")
        stage["data"] = {**stage.get("data", {}), "micro_batch_size": 16}
        if "samples_per_epoch" in stage["data"]:  # the recorded epoch: the students' 12 steps
            stage["data"]["samples_per_epoch"] = 12 * 16 * 2
        if "record" in stage:  # the teacher's soft labels: no student to shrink
            continue
        stage.get("optimisation", {}).pop("steps", None)
        stage.get("optimisation", {}).pop("lr", None)
        student = stage["student"]
        if student["arch"] == "hf:bert":
            student["kwargs"].update(TINY)
        if student["arch"] == "hf:data/well_read/minilm_l3":  # the converted L3's directory
            student["arch"] = f"hf:{l3}"
            if "init" in student:
                student["init"] = str(l3 / "model.safetensors")
    teacher = spec["stages"][0]
    assert teacher["name"] == "teacher"
    teacher["student"] = {"arch": "hf:bert", "kwargs": {
        **TINY, "hidden_size": 64, "task": "sequence_classification", "num_labels": 3},
        "dtype": "fp32"}
    teacher["optimisation"] = {"steps": 40, "lr": 3e-3}
    return spec


def test_small_recipe_on_two_ranks_exports_models_transformers_loads(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer
    spec = small_recipe(tmp_path)
    result = run_deepspeed(write_spec(tmp_path / "job.yaml", spec), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run = Path(spec["run_dir"])
    accuracy = {s["name"]: json.loads((run / s["name"] / "export" / "metrics.json").read_text())
                ["accuracy"] for s in spec["stages"] if "record" not in s}
    # The distillations read the recorded soft labels: one recording, no teacher engine.
    recorded = json.loads((run / "soft_labels" / "export" / "metrics.json").read_text())
    assert recorded["records"] == 12 * 16 * 2, recorded
    assert accuracy.pop("student_mlm") is None  # masked LM: no classes to score
    # The words decide the class: the tiny teacher learns the task in 40 steps (0.70 in the
    # first run; chance is 0.33). The students' few steps only show that every stage
    # trains and is scored; the claim is judged by the full recipe (docs/well_read_students.md).
    assert accuracy["teacher"] > 0.55, accuracy
    assert all(0.0 <= value <= 1.0 for value in accuracy.values()), accuracy
    for stage, loader in (("pd_finetune", AutoModelForSequenceClassification),
                          ("student_mlm", AutoModelForMaskedLM)):
        export = run / stage / "export"
        model = loader.from_pretrained(export).eval()     # one line, no engine code
        probe = {}
        from safetensors.torch import load_file
        probe = load_file(str(export / "probe.safetensors"))
        with torch.no_grad():
            logits = model(input_ids=probe["input/input_ids"],
                           attention_mask=probe["input/attention_mask"]).logits
        torch.testing.assert_close(logits, probe["tap/output"], atol=1e-5, rtol=1e-5)
        tokenizer = AutoTokenizer.from_pretrained(export)
        assert tokenizer("great film")["input_ids"][0] == tokenizer.cls_token_id
    # Distillation losses were logged: the soft-label term fell.
    records = [json.loads(line) for line in (run / "pd_distil" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"], records
