"""The Well-Read Students recipe's summary: held-out accuracy per stage, one column per seed
(one run directory each) with the mean and standard deviation, PD minus each baseline paired
by seed, and whether the paper's claim (pre-trained distillation beats both baselines of the
same budget) holds for the pre-trained L3 student, by scripts/paired_claims.py's rule (95 %
intervals of the paired differences; one seed gives none, so no verdict).

    python scripts/well_read_results.py runs/well_read_students [runs/well_read_students_seed1 ...]

The text is also written to the first directory's results.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from paired_claims import RULE, seed_table, verdict

ROWS = [  # stage, what it is
    ("teacher", "teacher: MiniLM-L6 (6 x 384) fine-tuned on the labelled split"),
    ("l3_pd_distil", "PD: pre-trained L3 (paraphrase-MiniLM-L3-v2) distilled on unlabelled transfer text"),
    ("l3_pd_finetune", "PD + fine-tuning on the labelled split"),
    ("l3_finetune", "baseline: pre-trained L3 fine-tuned on the labels (no distillation)"),
    ("l3_scratch_distil", "baseline: L3 never pre-trained, distilled"),
    ("l3_scratch_distil_finetune", "baseline: L3 never pre-trained, distilled + fine-tuned"),
    ("pd_distil", "pre-trained here: BERT 2 x 128 after masked LM on the transfer text, distilled"),
    ("pd_finetune", "pre-trained here: ... + fine-tuning"),
]
PD, BASELINES = "l3_pd_finetune", ("l3_finetune", "l3_scratch_distil_finetune")


def accuracies(run: Path) -> dict[str, float | None]:
    out = {}
    for stage, _ in ROWS:
        metrics = run / stage / "export" / "metrics.json"
        out[stage] = json.loads(metrics.read_text())["accuracy"] if metrics.is_file() else None
    return out


def report(runs: list[Path]) -> str:
    accs = [accuracies(run) for run in runs]
    text = seed_table(ROWS, runs, accs) + "\n\n"
    if any(a[stage] is None for a in accs for stage in (PD, *BASELINES)):
        return text + "Not all stages have finished: no verdict.\n"
    diffs = {baseline: [a[PD] - a[baseline] for a in accs] for baseline in BASELINES}
    for baseline, paired in diffs.items():
        text += (f"- PD - `{baseline}`, paired by seed: "
                 + ", ".join(f"{100 * d:+.2f}" for d in paired) + " points\n")
    claim, intervals = verdict(diffs, scale=100)
    return (text + "\n".join(intervals) + "\n\nThe paper's claim (PD beats both baselines) is "
            f"**{claim}** here: {RULE}.\n")


if __name__ == "__main__":
    runs = [Path(a) for a in sys.argv[1:]] or [Path("runs/well_read_students")]
    text = report(runs)
    (runs[0] / "results.md").write_text(text)
    print(text)
