"""The held-out accuracies of a self-distillation run as Markdown tables: one column per seed,
the mean and standard deviation of each method, the paired differences (self-distilled minus
each baseline, seed by seed) and whether self-distillation beat both baselines;
jobs/self_distillation.yaml (images) and jobs/self_distillation_text.yaml (text) name their
fine-tunings alike.

    python scripts/self_distillation_results.py runs/self-distillation 0 1 2 3 4
    python scripts/self_distillation_results.py runs/self-distillation-text 0

Seed 0 is the job's own stages; seed k the same stages named ``NAME_seedk``
(scripts/self_distillation.sh and self_distillation_text.sh run them). With ``--curves`` it
also shows, per seed, what says whether the setting can answer: each fine-tuning's logged
loss over its last 20 % of steps against the 20 % before (flat once converged), the
self-distillation stage's hidden and MAE terms at its first and last logged step, and (images)
the MAE loss of the initial, further pre-trained and self-distilled models on the target's
held-out images (the same masks for all), which shows whether further pre-training
over-fits the target's training images.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from paired_claims import RULE, verdict

ROWS = [("finetune_initial", "fine-tune the initial model (baseline)"),
        ("finetune_further", "further pre-training, then fine-tune (baseline)"),
        ("finetune_selfdist", "further pre-training + self-distillation, then fine-tune")]


def named(stage: str, seed: int) -> str:
    return stage if seed == 0 else f"{stage}_seed{seed}"


def accuracy(run: Path, stage: str, seed: int) -> float:
    return json.loads((run / named(stage, seed) / "export" / "metrics.json").read_text())["accuracy"]


def records(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * statistics.mean(values):+.2f} ± {100 * sd:.2f}"


def table(run: Path, seeds: list[int]) -> str:
    values = {stage: [accuracy(run, stage, seed) for seed in seeds] for stage, _ in ROWS}
    mean = {stage: statistics.mean(v) for stage, v in values.items()}
    sd = {stage: statistics.stdev(v) if len(v) > 1 else float("nan") for stage, v in values.items()}
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for stage, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.2f} %" for v in values[stage])
                     + f" | {100 * mean[stage]:.2f} % | {100 * sd[stage]:.2f} |")
    selfdist = values["finetune_selfdist"]
    diffs = {baseline: [s - b for s, b in zip(selfdist, values[baseline])]
             for baseline in ("finetune_initial", "finetune_further")}
    for baseline, label in (("finetune_initial", "self-distilled minus initial"),
                            ("finetune_further", "self-distilled minus further")):
        lines.append(f"| {label} (paired, points) | "
                     + " | ".join(f"{100 * d:+.2f}" for d in diffs[baseline])
                     + f" | {spread(diffs[baseline]).replace(' ± ', ' | ')} |")
    wins = sum(selfdist[i] > max(values["finetune_initial"][i], values["finetune_further"][i])
               for i in range(len(seeds)))
    lines += ["", f"Self-distillation beats both baselines in {wins} of {len(seeds)} seeds "
              "(std: sample standard deviation over the seeds)."]
    claim, intervals = verdict(diffs, scale=100)
    lines += intervals + ["", f"The paper's claim (self-distillation beats both baselines) is "
                          f"**{claim}** here: {RULE}."]
    return "\n".join(lines)


def curves(run: Path, seeds: list[int]) -> str:
    lines = ["", "Fine-tuning loss (the logged means), last 20 % of steps against the 20 % "
             "before, and the self-distillation terms at the first and last logged step:", "",
             "| seed | stage | loss, steps 61-80 % | loss, last 20 % | change | "
             "selfdist hidden first -> last | selfdist MAE / MLM first -> last |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for seed in seeds:
        sd = records(run, named("selfdist", seed))
        masked = "loss/mae" if "loss/mae" in sd[0] else "loss/mlm"   # images or text
        terms = (f"{sd[0]['loss/hidden']:.3f} -> {sd[-1]['loss/hidden']:.4f}",
                 f"{sd[0][masked]:.3f} -> {sd[-1][masked]:.3f}")
        for stage, _ in ROWS:
            rows = records(run, named(stage, seed))
            last = rows[-1]["step"]
            window = lambda lo, hi: [r["loss"] for r in rows if lo * last < r["step"] <= hi * last]
            before, end = statistics.mean(window(0.6, 0.8)), statistics.mean(window(0.8, 1.0))
            lines.append(f"| {seed} | {stage} | {before:.4f} | {end:.4f} | "
                         f"{100 * (end - before) / before:+.0f} % | {terms[0]} | {terms[1]} |")
    return "\n".join(lines)


def heldout_mae(run: Path, seeds: list[int], holdout: Path) -> str:
    """MAE loss of the pre-trained exports on the target's held-out images (resized, not
    cropped), the same random masks for every model: falling means the model still learns
    what generalises to the target; rising, that it over-fits the target's train images."""
    import io
    import tarfile

    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    images = []
    for shard in sorted(holdout.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in sorted((m for m in tar.getmembers() if m.name.endswith(".png")),
                                 key=lambda m: m.name):
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                images.append(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1))
    x = (F.interpolate(torch.stack(images), size=24, mode="bilinear", align_corners=False) - 0.5) / 0.5
    noise = torch.rand(x.shape[0], 36, generator=torch.Generator().manual_seed(1234))

    def loss(stage: str) -> float:
        folder = run / stage / "export"
        model = ViTMAEForPreTraining(ViTMAEConfig.from_pretrained(folder)).eval()
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        model.config.mask_ratio = 0.75
        with torch.no_grad():
            return model(pixel_values=x, noise=noise).loss.item()

    lines = ["", f"MAE loss on the {x.shape[0]} held-out target images (75 % masked, the same "
             f"masks for every model): initial {loss('initial'):.4f}", "",
             "| seed | further | selfdist |", "|---:|---:|---:|"]
    for seed in seeds:
        lines.append(f"| {seed} | {loss(named('further', seed)):.4f} | "
                     f"{loss(named('selfdist', seed)):.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--curves", action="store_true")
    parser.add_argument("--heldout", type=Path, default=None,
                        help="image shards for the MAE loss of the pre-trained models")
    args = parser.parse_args()
    print(table(args.run, args.seeds))
    if args.curves:
        print(curves(args.run, args.seeds))
    if args.heldout:
        print(heldout_mae(args.run, args.seeds, args.heldout))
