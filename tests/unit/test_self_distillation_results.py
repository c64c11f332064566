"""scripts/self_distillation_results.py, the table that docs/self_distillation.md quotes: one
column per seed, mean and std, the paired differences, and the paper's claim called confirmed
only when both paired 95 % t intervals lie above 0, contradicted when either lies below."""

from __future__ import annotations

import json

import pytest

from helpers import script_module, write_stage_accuracies

STAGES = ("finetune_initial", "finetune_further", "finetune_selfdist")


def write_run(run, per_seed):
    """per_seed: one (initial, further, selfdist) accuracy triple per seed."""
    for seed, triple in enumerate(per_seed):
        write_stage_accuracies(run, {stage if seed == 0 else f"{stage}_seed{seed}": accuracy
                                     for stage, accuracy in zip(STAGES, triple)})


def claim(text: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith("The paper's claim"))
    return line.split("**")[1]


@pytest.mark.parametrize("per_seed, expected", [
    # Ahead of both baselines by 2-4 points in every seed: both intervals above 0.
    ([(0.70, 0.71, 0.74), (0.72, 0.72, 0.75), (0.69, 0.70, 0.73)], "confirmed"),
    # Ahead on the mean (+0.60) but behind in one seed by more: the interval spans 0.
    ([(0.90, 0.90, 0.93), (0.93, 0.91, 0.90), (0.91, 0.92, 0.93)], "not shown"),
    # Behind the initial model in every seed.
    ([(0.75, 0.70, 0.71), (0.76, 0.71, 0.72), (0.74, 0.70, 0.70)], "contradicted"),
    # One seed: no interval, so no verdict however large the lead.
    ([(0.50, 0.50, 0.90)], "not shown"),
])
def test_the_verdict_follows_the_paired_intervals(tmp_path, per_seed, expected):
    results = script_module("self_distillation_results")
    write_run(tmp_path, per_seed)
    text = results.table(tmp_path, list(range(len(per_seed))))
    assert claim(text) == expected


def test_the_table_gives_each_seed_the_mean_the_std_and_the_paired_differences(tmp_path):
    results = script_module("self_distillation_results")
    write_run(tmp_path, [(0.80, 0.70, 0.75), (0.70, 0.72, 0.77)])
    lines = results.table(tmp_path, [0, 1]).splitlines()
    initial = next(line for line in lines if line.startswith("| fine-tune the initial"))
    assert "| 80.00 % | 70.00 % | 75.00 % | 7.07 |" in initial  # stdev of 80, 70 = 7.071
    minus_initial = next(line for line in lines if line.startswith("| self-distilled minus initial"))
    assert "| -5.00 | +7.00 | +1.00 | 8.49 |" in minus_initial
    assert "beats both baselines in 1 of 2 seeds" in "\n".join(lines)
    # t(0.975, 1 dof) = 12.706: +1.00 ± 12.706 * 8.485 / sqrt(2) = +1.00 ± 76.24 points.
    interval = next(line for line in lines if line.startswith("- minus `finetune_initial`"))
    assert "95 % interval -75.24 to +77.24" in interval


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("term", ["mae", "mlm"])
def test_the_heldout_table_finds_where_further_pretraining_turned_up(tmp_path, term):
    """Over-fitting, as the table reports it: the held-out loss's lowest value and step, how
    far the last one rose above it, and the training loss then and at the end; a stage that
    never rose shows +0.0000. Images log MAE, text masked LM."""
    results = script_module("self_distillation_results")
    write_jsonl(tmp_path / "further" / "eval.jsonl", [
        {"step": 100, f"heldout/{term}": 0.40, "knn_accuracy": 0.30},
        {"step": 200, f"heldout/{term}": 0.36, "knn_accuracy": 0.45},
        {"step": 300, f"heldout/{term}": 0.39, "knn_accuracy": 0.40}])
    write_jsonl(tmp_path / "further" / "metrics.jsonl", [
        {"step": 150, f"loss/{term}": 0.35}, {"step": 190, f"loss/{term}": 0.30},
        {"step": 290, f"loss/{term}": 0.20}])
    write_jsonl(tmp_path / "selfdist" / "eval.jsonl", [
        {"step": 100, f"heldout/{term}": 0.41}, {"step": 200, f"heldout/{term}": 0.38}])
    write_jsonl(tmp_path / "selfdist" / "metrics.jsonl", [
        {"step": 100, "loss/hidden": 1.0, f"loss/{term}": 0.33}])
    lines = results.heldout_losses(tmp_path, [0]).splitlines()
    assert ("| 0 | further | 0.4000 | 0.3600 (200) | 0.3900 | +0.0300 | 0.3000 -> 0.2000 | "
            "30.00 -> 40.00 % |") in lines
    assert "| 0 | selfdist | 0.4100 | 0.3800 (200) | 0.3800 | +0.0000 | 0.3300 -> 0.3300 | - |" in lines


def test_the_curves_give_the_absolute_change_and_the_last_heldout_accuracies(tmp_path):
    results = script_module("self_distillation_results")
    write_jsonl(tmp_path / "selfdist" / "metrics.jsonl", [
        {"step": 10, "loss/hidden": 12.0, "loss/mae": 0.5}, {"step": 20, "loss/hidden": 0.01, "loss/mae": 0.3}])
    for stage in STAGES:
        # 10 logged points: steps 61-80 % hold 0.30 and 0.20, the last 20 % 0.11 and 0.09.
        losses = [1.5, 1.2, 1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.11, 0.09]
        write_jsonl(tmp_path / stage / "metrics.jsonl",
                    [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)])
        write_jsonl(tmp_path / stage / "eval.jsonl",
                    [{"step": step, "accuracy": acc} for step, acc in
                     ((25, 0.5), (50, 0.8), (75, 0.85), (100, 0.86))])
    lines = results.curves(tmp_path, [0]).splitlines()
    row = next(line for line in lines if line.startswith("| 0 | finetune_initial"))
    assert row == ("| 0 | finetune_initial | 0.2500 | 0.1000 | -0.1500 | 80.00 / 85.00 / 86.00 | "
                   "12.000 -> 0.0100 | 0.500 -> 0.300 |")
