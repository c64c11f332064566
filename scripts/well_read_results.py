"""The Well-Read Students recipe's summary: held-out accuracy per stage, and whether the
paper's claim (pre-trained distillation beats both baselines of the same budget) holds, for
the pre-trained L3 student; one run directory per seed.

    python scripts/well_read_results.py runs/well_read_students [runs/well_read_students_seed1 ...]

One directory: its table. Several (seeds): a table of every seed, their mean and standard
deviation, and the paired differences of PD against each baseline. Either is also written to
the first directory's results.md.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

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


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def verdict(acc: dict[str, float | None]) -> str:
    pd, baselines = acc[PD], {k: acc[k] for k in BASELINES}
    if pd is None or None in baselines.values():
        return "not all stages have finished: no verdict"
    beaten = [k for k, v in baselines.items() if pd > v]
    margins = ", ".join(f"{100 * (pd - v):+.2f} points over `{k}`" for k, v in baselines.items())
    return (("**confirmed**" if len(beaten) == len(baselines) else "**not confirmed**")
            + f": PD + fine-tuning scores {100 * pd:.2f} %, {margins}.")


def one_run(run: Path) -> str:
    acc = accuracies(run)
    lines = ["| stage | model | held-out accuracy |", "|---|---|---|"]
    lines += [f"| `{stage}` | {what} | {pct(acc[stage])} |" for stage, what in ROWS]
    return "\n".join(lines) + f"\n\nThe paper's claim (PD beats both baselines): {verdict(acc)}\n"


def seeds(runs: list[Path]) -> str:
    accs = [accuracies(run) for run in runs]
    head = " | ".join(run.name for run in runs)
    lines = [f"| stage | {head} | mean | std |", "|---|" + "---:|" * (len(runs) + 2)]
    for stage, _ in ROWS:
        values = [a[stage] for a in accs]
        known = [v for v in values if v is not None]
        mean = f"{100 * statistics.mean(known):.2f} %" if known else "-"
        std = f"{100 * statistics.stdev(known):.2f}" if len(known) > 1 else "-"
        lines.append(f"| `{stage}` | " + " | ".join(pct(v) for v in values) + f" | {mean} | {std} |")
    text = "\n".join(lines) + "\n\n"
    for baseline in BASELINES:
        pairs = [100 * (a[PD] - a[baseline]) for a in accs if a[PD] is not None and a[baseline] is not None]
        if pairs:
            spread = f", std {statistics.stdev(pairs):.2f}" if len(pairs) > 1 else ""
            text += (f"- PD - `{baseline}`, paired by seed: {', '.join(f'{d:+.2f}' for d in pairs)} "
                     f"(mean {statistics.mean(pairs):+.2f}{spread}); PD ahead in "
                     f"{sum(d > 0 for d in pairs)} of {len(pairs)}\n")
    text += "".join(f"- {run.name}: {verdict(a)}\n" for run, a in zip(runs, accs))
    return text


if __name__ == "__main__":
    runs = [Path(a) for a in sys.argv[1:]] or [Path("runs/well_read_students")]
    text = one_run(runs[0]) if len(runs) == 1 else seeds(runs)
    (runs[0] / "results.md").write_text(text)
    print(text)
