"""One rule for every recipe's "is the paper's claim confirmed here?": the claimed method
minus each baseline, paired by seed, and a 95 % Student-t interval of the mean difference
(the seeds as the sample). The results scripts of the self-distillation, Well-Read Students
and TinyMIM recipes import it, so their tables judge a claim alike; the last two also share
the per-seed table the differences are read from (``seed_table``).

- **confirmed**: every interval lies above 0 (ahead of every baseline beyond the seeds' spread);
- **contradicted**: some interval lies below 0 (behind a baseline beyond the spread);
- **not shown**: otherwise, and always with one seed (no spread, so no interval).
"""

from __future__ import annotations

import statistics
from pathlib import Path

RULE = ("confirmed only when every paired 95 % interval lies above 0, contradicted when any "
        "lies below, not shown otherwise (and with one seed, which gives no interval)")

# Two-sided 95 % quantiles of Student's t for 1-9 degrees of freedom (a paired interval over
# at most ten seeds; more seeds use the normal's 1.96, which is within 7 % from ten on).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]


def interval(diffs: list[float]) -> tuple[float, float]:
    """95 % interval of the mean of paired differences (two or more seeds)."""
    n = len(diffs)
    half = (T_975[n - 2] if n <= 10 else 1.96) * statistics.stdev(diffs) / n ** 0.5
    return statistics.mean(diffs) - half, statistics.mean(diffs) + half


def verdict(diffs: dict[str, list[float]], scale: float = 1.0) -> tuple[str, list[str]]:
    """The claim's verdict from {baseline: [claimed minus baseline, seed by seed]}, and one
    line per baseline with the mean and the interval that decided it (values times
    ``scale``: 100 turns accuracies in [0, 1] into points)."""
    if len(next(iter(diffs.values()))) < 2:
        return "not shown", ["- one seed gives no interval: run more seeds for a verdict"]
    positions, lines = [], []
    for baseline, paired in diffs.items():
        low, high = interval(paired)
        lines.append(f"- minus `{baseline}`: mean {scale * statistics.mean(paired):+.2f} points, "
                     f"95 % interval {scale * low:+.2f} to {scale * high:+.2f}, ahead in "
                     f"{sum(d > 0 for d in paired)} of {len(paired)} seeds")
        positions.append("ahead" if low > 0 else "behind" if high < 0 else "level")
    if "behind" in positions:
        return "contradicted", lines
    return ("confirmed" if set(positions) == {"ahead"} else "not shown"), lines


def seed_table(rows: list[tuple[str, str]], runs: list[Path],
               accuracies: list[dict[str, float | None]]) -> str:
    """Markdown: one line per (stage, what it is) of ``rows``, one column per run directory
    (a seed) with its held-out accuracy, then the mean and sample standard deviation over the
    seeds where the stage has finished ("-" where it has not, or too few have)."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f} %"

    head = " | ".join(run.name for run in runs)
    lines = [f"| stage | model | {head} | mean | std |", "|---|---|" + "---:|" * (len(runs) + 2)]
    for stage, what in rows:
        values = [a[stage] for a in accuracies]
        known = [v for v in values if v is not None]
        mean = pct(statistics.mean(known)) if known else "-"
        std = f"{100 * statistics.stdev(known):.2f}" if len(known) > 1 else "-"
        lines.append(f"| `{stage}` | {what} | " + " | ".join(pct(v) for v in values)
                     + f" | {mean} | {std} |")
    return "\n".join(lines)
