"""The held-out accuracies of a self-distillation run as a Markdown table (one column per
fine-tuning seed), and whether self-distillation beat both baselines: jobs/self_distillation.yaml
(images) and jobs/self_distillation_text.yaml (text) name their fine-tunings alike.

    python scripts/self_distillation_results.py runs/self-distillation 0 1 2
    python scripts/self_distillation_results.py runs/self-distillation-text 0

Seed 0 is the job's own fine-tuning stages; seed k the same stages named ``NAME_seedk``
(scripts/self_distillation.sh and self_distillation_text.sh run them with ``data.seed: k``).
"""

import json
import sys
from pathlib import Path

ROWS = [("finetune_initial", "fine-tune the initial model (baseline)"),
        ("finetune_further", "further pre-training, then fine-tune (baseline)"),
        ("finetune_selfdist", "further pre-training + self-distillation, then fine-tune")]


def accuracy(run: Path, stage: str, seed: int) -> float:
    name = stage if seed == 0 else f"{stage}_seed{seed}"
    return json.loads((run / name / "export" / "metrics.json").read_text())["accuracy"]


def table(run: Path, seeds: list[int]) -> str:
    values = {stage: [accuracy(run, stage, seed) for seed in seeds] for stage, _ in ROWS}
    mean = {stage: sum(v) / len(v) for stage, v in values.items()}
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for stage, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.2f} %" for v in values[stage])
                     + f" | {100 * mean[stage]:.2f} % |")
    wins = sum(values["finetune_selfdist"][i] > max(values["finetune_initial"][i],
                                                     values["finetune_further"][i])
               for i in range(len(seeds)))
    confirmed = mean["finetune_selfdist"] > max(mean["finetune_initial"], mean["finetune_further"])
    lines += ["", f"Self-distillation beats both baselines in {wins} of {len(seeds)} fine-tuning "
              f"seeds; on the mean the paper's claim is "
              f"{'confirmed' if confirmed else 'not confirmed'} here."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]] or [0]))
