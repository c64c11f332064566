"""jobs/tinymim_digits.yaml passes --check on 2 ranks with the chain wired as the docs say,
and scripts/tinymim_digits_results.py: the table a reader of docs/tinymim_digits.md relies on,
mean and standard deviation over seeds, the paired differences per seed, and each claim judged
by the paired 95 % intervals of scripts/paired_claims.py."""

from __future__ import annotations

from helpers import ROOT, check_in_process, script_module, write_stage_accuracies


def test_mean_std_paired_differences_and_verdicts(tmp_path):
    results = script_module("tinymim_digits_results")
    # (a): relation ahead by 8-10 points in every seed; (b): chain ahead on the mean (+4.00)
    # but behind in seed1, so its interval spans 0.
    arms = [(0.80, 0.70, 0.60, 0.50), (0.75, 0.67, 0.54, 0.56), (0.78, 0.69, 0.58, 0.54)]
    for seed, (rel, feat, chain, direct) in enumerate(arms):
        write_stage_accuracies(tmp_path / f"seed{seed}", {
            "rel_finetune": rel, "feat_finetune": feat,
            "chain_small_finetune": chain, "direct_small_finetune": direct})
    text = results.report([tmp_path / f"seed{seed}" for seed in range(3)])

    rel_row = next(line for line in text.splitlines() if line.startswith("| `rel_finetune`"))
    assert "| 80.00 % | 75.00 % | 78.00 % | 77.67 % | 2.52 |" in rel_row  # stdev 2.517
    assert "| `teacher` |" in text and "| - | - | - | - | - |" in text  # not run: not invented
    claim_a, claim_b = [line for line in text.splitlines() if line.startswith("- (")]
    assert "seed0 +10.00, seed1 +8.00, seed2 +9.00" in claim_a and "**confirmed**" in claim_a
    assert "seed0 +10.00, seed1 -2.00, seed2 +4.00" in claim_b and "**not shown**" in claim_b
    # +4.00 +- 4.303 * 6.00 / sqrt(3) = +4.00 +- 14.91
    assert "mean +4.00 points, 95 % interval -10.91 to +18.91, ahead in 2 of 3 seeds" in text


def test_no_verdict_before_the_stages_finish(tmp_path):
    results = script_module("tinymim_digits_results")
    write_stage_accuracies(tmp_path / "seed0", {"rel_finetune": 0.80})
    text = results.report([tmp_path / "seed0"])
    assert text.count("no verdict (the stages have not finished)") == 2


def test_the_job_checks_and_chains_through_the_intermediate_student(tmp_path, digits_shards):
    code, out, err = check_in_process(
        ROOT / "jobs" / "tinymim_digits.yaml", "--set", f"data.train={digits_shards / 'train'}",
        "--set", f"data.eval={digits_shards / 'holdout'}", "--set", f"run_dir={tmp_path}")
    assert code == 0, err
    text = " ".join(out.replace("│", " ").split())
    # chain_small is taught by rel_distil's intermediate student (72 wide), direct_small by
    # the teacher (96 wide); both into the same 48-wide student. (Paths are cut in the table.)
    chain = text.split("stage 6: chain_small")[1].split("stage 7")[0]
    direct = text.split("stage 7: direct_small")[1].split("stage 8")[0]
    chain_teacher, chain_student = chain.split("teacher taps")[0], chain.split("student ")[1]
    direct_teacher, direct_student = direct.split("teacher taps")[0], direct.split("student ")[1]
    assert "'embed_dim': 72" in chain_teacher and "'embed_dim': 96" in direct_teacher
    assert "'embed_dim': 48" in chain_student and "'embed_dim': 48" in direct_student
