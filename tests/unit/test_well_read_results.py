"""scripts/well_read_results.py, the table docs/well_read_students.md quotes: every stage per
seed with mean and std, PD minus each baseline paired by seed, and the claim judged by the
paired 95 % intervals (scripts/paired_claims.py)."""

from __future__ import annotations

from helpers import script_module, write_stage_accuracies


def test_seeds_mean_std_paired_differences_and_verdict(tmp_path):
    results = script_module("well_read_results")
    # PD ahead of the never pre-trained L3 by 7-9 points, of the fine-tuned-only L3 by -0.40 to
    # +2.10 (the spread of the 2026-12-03 seeds): one interval above 0, one across it.
    for seed, (pd, finetune, scratch) in enumerate([(0.6495, 0.6535, 0.5620),
                                                    (0.6605, 0.6485, 0.5870),
                                                    (0.6635, 0.6425, 0.5950)]):
        write_stage_accuracies(tmp_path / f"seed{seed}", {
            "l3_pd_finetune": pd, "l3_finetune": finetune, "l3_scratch_distil_finetune": scratch})
    text = results.report([tmp_path / f"seed{seed}" for seed in range(3)])
    pd_row = next(line for line in text.splitlines() if line.startswith("| `l3_pd_finetune`"))
    assert "| 64.95 % | 66.05 % | 66.35 % | 65.78 % | 0.74 |" in pd_row
    assert "| `teacher` |" in text and "| - | - | - | - | - |" in text  # not run: not invented
    assert "- PD - `l3_finetune`, paired by seed: -0.40, +1.20, +2.10 points" in text
    assert "- PD - `l3_scratch_distil_finetune`, paired by seed: +8.75, +7.35, +6.85 points" in text
    assert "minus `l3_scratch_distil_finetune`: mean +7.65 points, 95 % interval +5.20 to +10.10" \
        in text
    assert "The paper's claim (PD beats both baselines) is **not shown** here" in text


def test_one_seed_or_unfinished_stages_give_no_verdict(tmp_path):
    results = script_module("well_read_results")
    write_stage_accuracies(tmp_path / "seed0", {"l3_pd_finetune": 0.70, "l3_finetune": 0.60,
                                                "l3_scratch_distil_finetune": 0.50})
    assert "is **not shown** here" in results.report([tmp_path / "seed0"])
    write_stage_accuracies(tmp_path / "seed1", {"l3_pd_finetune": 0.70})
    assert "Not all stages have finished: no verdict." in results.report([tmp_path / "seed1"])
