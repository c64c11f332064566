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
loss over its last 20 % of steps against the 20 % before (flat once converged) and its last
held-out accuracies, and the self-distillation stage's hidden and MAE terms at its first and
last logged step. With ``--heldout``, the held-out MAE (images) or masked-LM loss (text) that
further pre-training and self-distillation logged along their steps (``eval.loss``), with the
training loss beside it (for images also the initial model's MAE with the same masks), which
shows whether further pre-training over-fits the target's training samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from paired_claims import RULE, verdict

from distill_engine.training.progress import read_metrics

ROWS = [("finetune_initial", "fine-tune the initial model (baseline)"),
        ("finetune_further", "further pre-training, then fine-tune (baseline)"),
        ("finetune_selfdist", "further pre-training + self-distillation, then fine-tune")]


def named(stage: str, seed: int) -> str:
    return stage if seed == 0 else f"{stage}_seed{seed}"


def accuracy(run: Path, stage: str, seed: int) -> float:
    return json.loads((run / named(stage, seed) / "export" / "metrics.json").read_text())["accuracy"]


def records(run: Path, stage: str) -> list[dict]:
    return read_metrics(run / stage / "metrics.jsonl")


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


def evaluations(run: Path, stage: str) -> list[dict]:
    return read_metrics(run / stage / "eval.jsonl")  # none when the stage logged no evaluation


def curves(run: Path, seeds: list[int]) -> str:
    lines = ["", "Fine-tuning: the logged training loss over the last 20 % of steps against the 20 % "
             "before (flat once converged) and the held-out accuracy of the last three "
             "evaluations; self-distillation's terms at its first and last logged step:", "",
             "| seed | stage | loss, steps 61-80 % | loss, last 20 % | change | "
             "last held-out accuracies | selfdist hidden first -> last | "
             "selfdist MAE / MLM first -> last |",
             "|---:|---|---:|---:|---:|---|---:|---:|"]
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
            accuracies = [f"{100 * e['accuracy']:.2f}" for e in evaluations(run, named(stage, seed))
                          if "accuracy" in e][-3:]
            lines.append(f"| {seed} | {stage} | {before:.4f} | {end:.4f} | {end - before:+.4f} | "
                         f"{' / '.join(accuracies) or '-'} | {terms[0]} | {terms[1]} |")
    return "\n".join(lines)


def heldout_losses(run: Path, seeds: list[int]) -> str:
    """The held-out masked loss that further pre-training and self-distillation logged
    (``eval.loss``: MAE for images, masked LM for text, every held-out sample masked alike at
    every evaluation): the first value, the lowest (and its step) and the last, beside the
    training loss of the same objective when the held-out one was lowest and at the end.
    Rising from its lowest while the training loss keeps falling is over-fitting the
    target's training samples."""
    lines = ["", "| seed | stage | first | lowest (step) | last | last - lowest | "
             "training loss at lowest -> last | kNN first -> last |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for seed in seeds:
        for stage in ("further", "selfdist"):
            logged = evaluations(run, named(stage, seed))
            measure = next((k for k in ("heldout/mae", "heldout/mlm")
                            if any(k in e for e in logged)), None)
            if measure is None:
                continue
            logged = [e for e in logged if measure in e]
            lowest = min(logged, key=lambda e: e[measure])
            term = "loss/" + measure.split("/")[1]
            trained = [r for r in records(run, named(stage, seed)) if term in r]
            at_lowest = [r for r in trained if r["step"] <= lowest["step"]] or trained[:1]
            knn = [e["knn_accuracy"] for e in logged if "knn_accuracy" in e]
            lines.append(
                f"| {seed} | {stage} | {logged[0][measure]:.4f} | "
                f"{lowest[measure]:.4f} ({lowest['step']}) | {logged[-1][measure]:.4f} | "
                f"{logged[-1][measure] - lowest[measure]:+.4f} | "
                f"{at_lowest[-1][term]:.4f} -> {trained[-1][term]:.4f} | "
                + (f"{100 * knn[0]:.2f} -> {100 * knn[-1]:.2f} % |" if knn else "- |"))
    return "\n".join(lines)


def export_heldout_mae(run: Path, stage: str) -> float:
    """A stage's exported MAE model on the held-out split that ``further`` evaluates on,
    computed plainly (one process, every image in one batch) with the view and the per-key
    masks of the engine's ``eval.loss``: the initial model's value, which no stage logs, and
    a check of the logged ones."""
    import torch
    import yaml
    from safetensors.torch import load_file
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from data_shards import EvalStream, ViewsConfig
    from data_shards.keys import derive_seed
    from distill_engine.training.evaluation import test_views

    further = yaml.safe_load((run / "further" / "export" / "spec.yaml").read_text())
    data = further["data"]
    folder = run / stage / "export"
    model = ViTMAEForPreTraining(ViTMAEConfig.from_pretrained(folder)).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.config.mask_ratio = next(o["mask_ratio"] for o in further["objectives"]
                                   if o["kind"] == "mae")
    (batch,) = EvalStream(data["eval"], batch_size=100_000, rank=0, world_size=1,
                          views=test_views(ViewsConfig.model_validate(data["views"])))
    valid = batch["valid"]
    patches = (model.config.image_size // model.config.patch_size) ** 2
    noise = torch.stack([torch.rand(patches, generator=torch.Generator().manual_seed(
        derive_seed("heldout", key))).argsort()
        for key, kept in zip(batch["key"], valid.tolist()) if kept])
    with torch.no_grad():
        return model(pixel_values=batch["image"][valid], noise=noise).loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--curves", action="store_true")
    parser.add_argument("--heldout", action="store_true",
                        help="the held-out MAE or masked-LM curves of further pre-training and "
                             "self-distillation (images: and the initial model's MAE)")
    args = parser.parse_args()
    print(table(args.run, args.seeds))
    if args.curves:
        print(curves(args.run, args.seeds))
    if args.heldout:
        print("\nHeld-out masked loss (each held-out sample masked by its key)")
        if (args.run / "initial" / "export").is_dir():  # images: the initial MAE model's value
            print(f"\nThe initial model's held-out MAE: {export_heldout_mae(args.run, 'initial'):.4f}")
        print(heldout_losses(args.run, args.seeds))
