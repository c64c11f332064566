"""The held-out accuracies of jobs/tinymim_digits.yaml, one run directory per seed, as a
Markdown table (every seed, mean and standard deviation), the paired differences of each
claim's arms per seed, and whether TinyMIM's two claims hold here.

    python scripts/tinymim_digits_results.py runs/tinymim_digits/seed0 runs/tinymim_digits/seed1 ...

Each claim is judged by scripts/paired_claims.py, the rule every recipe's results share: its
arm minus the other, paired by seed, confirmed only when the 95 % interval of the mean
difference lies above 0, contradicted when it lies below, not shown otherwise.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from paired_claims import RULE, seed_table, verdict

ROWS = [  # stage, what it is (all fine-tunings: 150 steps with labels)
    ("teacher", "teacher: ViT 96 x 4, trained with labels (300 steps)"),
    ("rel_finetune", "(a) relation targets -> ViT 72 x 4, fine-tuned"),
    ("feat_finetune", "(a) feature targets -> ViT 72 x 4, fine-tuned"),
    ("chain_small_finetune", "(b) chain: teacher -> ViT 72 x 4 -> ViT 48 x 3, fine-tuned"),
    ("direct_small_finetune", "(b) direct: teacher -> ViT 48 x 3, fine-tuned"),
    ("scratch_small", "context: ViT 48 x 3 from random init, fine-tuning budget only"),
]
CLAIMS = [  # name, the arm the paper says wins, the arm it beats
    ("(a) relation targets beat feature targets", "rel_finetune", "feat_finetune"),
    ("(b) the sequential chain beats direct distillation", "chain_small_finetune",
     "direct_small_finetune"),
]


def accuracies(run: Path) -> dict[str, float | None]:
    """Each stage's held-out accuracy from its export's metrics.json; None if not finished."""
    out = {}
    for stage, _ in ROWS:
        metrics = run / stage / "export" / "metrics.json"
        out[stage] = json.loads(metrics.read_text()).get("accuracy") if metrics.is_file() else None
    return out


def report(runs: list[Path]) -> str:
    accs = [accuracies(run) for run in runs]
    text = (seed_table(ROWS, runs, accs) + "\n\nPaired differences (points, the claimed winner "
            "minus the other, per seed):\n\n")
    for name, winner, other in CLAIMS:
        pairs = [(run.name, 100 * (a[winner] - a[other])) for run, a in zip(runs, accs)
                 if a[winner] is not None and a[other] is not None]
        if not pairs:
            text += f"- {name}: no verdict (the stages have not finished)\n"
            continue
        differences = [d for _, d in pairs]
        std = statistics.stdev(differences) if len(differences) > 1 else None
        per_seed = ", ".join(f"{seed} {d:+.2f}" for seed, d in pairs)
        claim, lines = verdict({other: differences})
        text += (f"- {name} (`{winner}` - `{other}`): {per_seed}"
                 + (f" (std {std:.2f})" if std is not None else "") + f"; **{claim}**\n"
                 + "".join(f"  {line}\n" for line in lines))
    return text + f"\nA claim is {RULE}.\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/tinymim_digits_results.py RUN_DIR [RUN_DIR ...] "
                 "(one run directory per seed, e.g. runs/tinymim_digits/seed0)")
    print(report([Path(a) for a in sys.argv[1:]]))
