"""scripts/tinymim_digits_results.py: the table a reader of docs/tinymim_digits.md relies on,
mean and standard deviation over seeds, the paired differences per seed, and a claim called
confirmed only when its arm is ahead in every seed."""

from __future__ import annotations

import importlib.util
import json

from helpers import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location(
        "tinymim_digits_results", ROOT / "scripts" / "tinymim_digits_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run, accuracies):
    for stage, accuracy in accuracies.items():
        (run / stage / "export").mkdir(parents=True)
        (run / stage / "export" / "metrics.json").write_text(json.dumps({"accuracy": accuracy}))


def test_mean_std_paired_differences_and_verdicts(tmp_path):
    results = load_script()
    # (a): relation ahead in both seeds; (b): chain ahead on the mean but behind in seed1.
    write_run(tmp_path / "seed0", {"rel_finetune": 0.80, "feat_finetune": 0.70,
                                   "chain_small_finetune": 0.60, "direct_small_finetune": 0.50})
    write_run(tmp_path / "seed1", {"rel_finetune": 0.75, "feat_finetune": 0.72,
                                   "chain_small_finetune": 0.54, "direct_small_finetune": 0.56})
    text = results.report([tmp_path / "seed0", tmp_path / "seed1"])

    rel_row = next(line for line in text.splitlines() if line.startswith("| `rel_finetune`"))
    assert "| 80.00 % | 75.00 % | 77.50 % | 3.54 |" in rel_row   # stdev of 80, 75 = 3.536
    assert "| `teacher` |" in text and "| - | - | - | - |" in text  # not run: shown, not invented
    claim_a, claim_b = [line for line in text.splitlines() if line.startswith("- (")]
    assert "seed0 +10.00, seed1 +3.00" in claim_a and "**confirmed**: ahead in 2 of 2" in claim_a
    assert "seed0 +10.00, seed1 -2.00" in claim_b
    assert "**not confirmed**: ahead in 1 of 2 seeds, mean difference +4.00" in claim_b


def test_no_verdict_before_the_stages_finish(tmp_path):
    results = load_script()
    write_run(tmp_path / "seed0", {"rel_finetune": 0.80})
    text = results.report([tmp_path / "seed0"])
    assert text.count("no verdict (the stages have not finished)") == 2
