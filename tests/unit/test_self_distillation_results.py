"""scripts/self_distillation_results.py, the table that docs/self_distillation.md quotes: one
column per seed, mean and std, the paired differences, and the paper's claim called confirmed
only when both paired 95 % t intervals lie above 0, contradicted when either lies below."""

from __future__ import annotations

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
