"""scripts/paired_claims.py, the rule by which every recipe's results call a paper's claim
confirmed, contradicted or not shown: 95 % Student-t intervals of the claimed method minus each
baseline, paired by seed."""

from __future__ import annotations

import pytest

from helpers import script_module


@pytest.mark.parametrize("diffs, expected", [
    # Ahead of both baselines by 2-4 points in every seed: both intervals above 0.
    ({"a": [0.03, 0.02, 0.04], "b": [0.02, 0.03, 0.03]}, "confirmed"),
    # Ahead of one, level with the other (+0.60 on the mean, behind by 3 in one seed).
    ({"a": [0.03, 0.02, 0.04], "b": [0.03, -0.03, 0.02]}, "not shown"),
    # Behind one baseline in every seed, whatever the other says.
    ({"a": [0.03, 0.02, 0.04], "b": [-0.04, -0.03, -0.05]}, "contradicted"),
    # Ahead in every seed, but too unevenly for three seeds to exclude 0: the t quantile
    # for 2 degrees of freedom is 4.303, and +1, +1, +10 gives 4.0 +- 12.9.
    ({"a": [0.01, 0.01, 0.10]}, "not shown"),
    # One seed: no interval, so no verdict however large the lead.
    ({"a": [0.40], "b": [0.40]}, "not shown"),
])
def test_the_verdict_follows_the_paired_intervals(diffs, expected):
    claims = script_module("paired_claims")
    assert claims.verdict(diffs)[0] == expected


def test_the_interval_is_the_t_interval_of_the_mean_difference():
    claims = script_module("paired_claims")
    # Mean 2, sample std sqrt(2/3) over 4 seeds: 2 +- 3.182 * std / sqrt(4).
    low, high = claims.interval([1.0, 2.0, 3.0, 2.0])
    std = (2 / 3) ** 0.5
    assert low == pytest.approx(2 - 3.182 * std / 2) and high == pytest.approx(2 + 3.182 * std / 2)
    _, lines = claims.verdict({"l3_finetune": [0.01, 0.02, 0.03, 0.02]}, scale=100)
    assert lines == [f"- minus `l3_finetune`: mean +2.00 points, 95 % interval "
                     f"{2 - 3.182 * std / 2:+.2f} to {2 + 3.182 * std / 2:+.2f}, ahead in 4 of 4 seeds"]
