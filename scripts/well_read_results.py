"""The Well-Read Students recipe's summary: held-out accuracy per stage, and whether the
paper's claim (pre-trained distillation beats both baselines of the same budget) holds here.

    python scripts/well_read_results.py runs/well_read_students
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [  # stage, what it is
    ("teacher", "teacher: MiniLM-L6 (6 x 384) fine-tuned on the labelled split"),
    ("pd_distil", "PD: MLM pre-trained student, distilled on unlabelled transfer text"),
    ("pd_finetune", "PD + fine-tuning on the labelled split"),
    ("pretrained_finetune", "baseline: MLM pre-trained student, fine-tuned (no distillation)"),
    ("scratch_distil", "baseline: never pre-trained student, distilled"),
    ("scratch_distil_finetune", "baseline: never pre-trained student, distilled + fine-tuned"),
]


def accuracies(run: Path) -> dict[str, float | None]:
    out = {}
    for stage, _ in ROWS:
        metrics = run / stage / "export" / "metrics.json"
        out[stage] = json.loads(metrics.read_text())["accuracy"] if metrics.is_file() else None
    return out


def summary(run: Path) -> str:
    acc = accuracies(run)
    lines = ["| stage | model | held-out accuracy |", "|---|---|---|"]
    for stage, what in ROWS:
        value = acc[stage]
        lines.append(f"| `{stage}` | {what} | {'-' if value is None else f'{100 * value:.2f} %'} |")
    pd, baselines = acc["pd_finetune"], {k: acc[k] for k in ("pretrained_finetune", "scratch_distil_finetune")}
    if pd is None or None in baselines.values():
        verdict = "not all stages have finished: no verdict"
    else:
        beaten = [k for k, v in baselines.items() if pd > v]
        margins = ", ".join(f"{100 * (pd - v):+.2f} points over `{k}`" for k, v in baselines.items())
        verdict = ("**confirmed**" if len(beaten) == len(baselines) else "**not confirmed**") + (
            f": pre-trained distillation + fine-tuning scores {100 * pd:.2f} %, {margins}.")
        if acc["pd_distil"] is not None and acc["scratch_distil"] is not None:
            verdict += (f" Without the final fine-tuning, distillation from the pre-trained student "
                        f"scores {100 * acc['pd_distil']:.2f} % against {100 * acc['scratch_distil']:.2f} % "
                        f"from a never pre-trained one.")
    return "\n".join(lines) + f"\n\nThe paper's claim (PD beats both baselines): {verdict}\n"


if __name__ == "__main__":
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/well_read_students")
    text = summary(run)
    (run / "results.md").write_text(text)
    print(text)
