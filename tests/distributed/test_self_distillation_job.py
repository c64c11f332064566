"""jobs/self_distillation.yaml, made small by --set, on 2 real ZeRO-3 ranks: the initial MAE
on the source classes, further pre-training, self-distillation (mae + hidden, teacher = the
further pre-trained model), and the three fine-tunings. The first launch loses a rank in
step 4 of the first stage; the rerun resumes from step 2 and draws the same masks (step 3's
loss, which depends on them, is computed again and is the same)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import ROOT, pack_digits, run_deepspeed, script_module

pytestmark = pytest.mark.distributed

FINETUNES = ("finetune_selfdist", "finetune_further", "finetune_initial")


@pytest.fixture(scope="module")
def job_run(tmp_path_factory) -> tuple[Path, str, float]:
    work = tmp_path_factory.mktemp("selfdist")
    source = pack_digits(work / "source", "--classes", "0,1,2,3,4")
    target = pack_digits(work / "target", "--classes", "5,6,7,8,9", "--holdout", "0.2")
    labelled = pack_digits(work / "labelled", "--classes", "5,6,7,8,9", "--holdout", "0.2",
                           "--max-per-class", "8")
    small = ["--set", f"run_dir={work / 'run'}",
             "--set", f"data.train={labelled / 'train'}", "--set", f"data.eval={target / 'holdout'}",
             "--set", "data.micro_batch_size=16", "--set", "optimisation.steps=3",
             "--set", "checkpointing.every_steps=2", "--set", "logging.every_steps=1",
             "--set", "logging.plot=false",
             "--set", f"stages.0.data.train={source}", "--set", "stages.0.optimisation.steps=6",
             *[arg for index in (1, 2) for arg in
               ("--set", f"stages.{index}.data.train={target / 'train'}",
                "--set", f"stages.{index}.eval.every_steps=1")],
             *[arg for index in (3, 4, 5) for arg in
               ("--set", f"stages.{index}.optimisation.steps=3")]]
    spec = ROOT / "jobs" / "self_distillation.yaml"
    crashed = run_deepspeed(spec, *small, timeout=300,
                            extra_env={"DISTILL_FAULT": "kill_rank_at_step:1:4"})
    assert crashed.returncode != 0, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    step3_before = records(work / "run" / "initial")[2]
    result = run_deepspeed(spec, *small, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return work / "run", output, step3_before


def records(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "export" / "metrics.json").read_text())


def test_a_resumed_mae_stage_draws_the_same_masks(job_run):
    run, output, step3_before = job_run
    assert "initial: resumed from step00000002" in output
    # The resumed run logs each step once: step 3, computed again, replaced the record.
    rows = records(run / "initial")
    assert step3_before["step"] == 3 and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["loss"] == pytest.approx(step3_before["loss"], rel=1e-6)


def test_self_distillation_trains_both_terms_against_the_further_pretrained_teacher(job_run):
    run, output, _ = job_run
    row = summary(run, "selfdist")
    assert row["teacher_weights"] == str(run / "further" / "export" / "model.safetensors")
    terms = records(run / "selfdist")
    assert all(math.isfinite(r["loss/mae"]) and r["loss/hidden"] > 0 for r in terms)
    assert all(r["loss"] == pytest.approx(r["loss/mae"] + r["loss/hidden"], rel=1e-5)
               for r in terms)
    # The student starts again from the initial model, decoder included (no fresh weights).
    assert "teacher pruned after its deepest tap: removed decoder" in output


def test_every_finetuning_starts_from_its_model_and_is_evaluated(job_run):
    run, output, _ = job_run
    for stage, origin in zip(FINETUNES, ("selfdist", "further", "initial")):
        accuracy = summary(run, stage)["accuracy"]
        assert 0.0 <= accuracy <= 1.0, (stage, accuracy)
        # The ViT classifier takes the MAE encoder; only its head starts fresh. (The log may
        # wrap anywhere, a long path included: compare without whitespace.)
        expected = (f"classifier.bias, classifier.weight start fresh (not in "
                    f"{run / origin / 'export' / 'model.safetensors'}")
        assert "".join(expected.split()) in "".join(output.split()), stage


def test_the_initial_mae_keeps_its_fixed_sin_cos_positions(job_run):
    """ViTMAE's position embeddings are fixed (no gradient) and set at construction: built
    under ZeRO-3's partitioned init they must still be the sin-cos table, not empty memory."""
    import torch
    from safetensors.torch import load_file

    from distill_engine.families.masking import _sin_cos_table
    exported = load_file(str(run_of(job_run) / "initial" / "export" / "model.safetensors"))
    for name in ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed"):
        table = _sin_cos_table(exported[name].shape[-1], 36)
        assert table.abs().max() > 0.5 and torch.allclose(exported[name], table, atol=1e-6), name


def test_pretraining_logs_its_heldout_mae_with_every_sample_masked_by_its_key(job_run):
    """eval.loss: the held-out MAE of further pre-training, at every evaluation, on 2 ranks with
    padding rows, equals one plain pass of the export over the whole held-out split with
    each image's mask drawn from its key (scripts/self_distillation_results.py, which also
    gives the initial model's value so); self-distillation logs its MAE term's alone."""
    run, _, _ = job_run
    further = [json.loads(line) for line in (run / "further" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in further] == [1, 2, 3]
    assert all(e["heldout/mae"] > 0 and "knn_accuracy" in e for e in further)
    assert summary(run, "further")["heldout/mae"] == further[-1]["heldout/mae"]
    selfdist = [json.loads(line) for line in (run / "selfdist" / "eval.jsonl").read_text().splitlines()]
    assert selfdist and all("heldout/mae" in e and "heldout/hidden" not in e for e in selfdist)
    plain = script_module("self_distillation_results").export_heldout_mae(run, "further")
    assert further[-1]["heldout/mae"] == pytest.approx(plain, rel=1e-5)


def run_of(job_run) -> Path:
    return job_run[0]
