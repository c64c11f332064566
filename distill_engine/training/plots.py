"""The PNGs a run leaves: ``loss.png`` per stage (averaged loss, learning rate, evaluation
results against the step) and ``summary.png`` per job (its stages side by side)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .progress import read_metrics


def _pyplot(directory: Path):
    # matplotlib writes a font cache to ~/.cache unless told otherwise; a run writes only
    # under its run directory (a user's own MPLCONFIGDIR wins).
    os.environ.setdefault("MPLCONFIGDIR", str(directory / ".matplotlib"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


EVAL_LABELS = {"accuracy": "held-out accuracy (head)", "knn_accuracy": "kNN accuracy (features)"}


def plot_losses(stage_dir: Path, png: Path, title: str) -> Path | None:
    """Loss (each point averaged over a logging interval; every term when there are
    several; the held-out loss of ``eval.loss`` beside it), learning rate, and the
    evaluations of ``eval.jsonl``, against the step."""
    records = read_metrics(stage_dir / "metrics.jsonl")
    if not records:
        return None
    evaluations = read_metrics(stage_dir / "eval.jsonl")
    plt = _pyplot(png.parent)
    accuracies = any(key in e for e in evaluations for key in EVAL_LABELS)
    panels = 3 if accuracies else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.6 * panels), sharex=True)
    steps = [r["step"] for r in records]
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in records], label="total", linewidth=2)
    terms = [k.removeprefix("loss/") for k in records[0] if k.startswith("loss/")]
    if len(terms) > 1:
        for term in terms:
            ax.plot(steps, [r[f"loss/{term}"] for r in records], label=term, alpha=0.7)
    for key in sorted({k for e in evaluations for k in e if k.startswith("heldout/")}):
        points = [(e["step"], e[key]) for e in evaluations if key in e]
        ax.plot(*zip(*points), marker="s", linestyle="--",
                label=f"held-out {key.removeprefix('heldout/')}")
    ax.set_ylabel("loss (interval mean)")
    ax.set_title(title)
    ax.legend()
    axes[1].plot(steps, [r["lr"] for r in records], color="tab:green")
    axes[1].set_ylabel("learning rate")
    if accuracies:
        for key, label in EVAL_LABELS.items():
            points = [(e["step"], 100 * e[key]) for e in evaluations if key in e]
            if points:
                axes[2].plot(*zip(*points), marker="o", label=label)
        axes[2].set_ylabel("held-out %")
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_summary(rows: list[dict[str, Any]], stage_dirs: list[Path], png: Path,
                 title: str) -> Path | None:
    """The job's stages compared: each stage's loss curve, and each stage's final held-out
    accuracy (its head's, or the kNN accuracy of its features)."""
    if not rows:
        return None
    plt = _pyplot(png.parent)
    fig, (losses, accuracies) = plt.subplots(1, 2, figsize=(12, 4),
                                             gridspec_kw={"width_ratios": [3, 2]})
    for row, stage_dir in zip(rows, stage_dirs):
        records = read_metrics(stage_dir / "metrics.jsonl")
        if records:
            losses.plot([r["step"] for r in records], [r["loss"] for r in records],
                        label=row["stage"])
    losses.set_yscale("log")
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("loss (interval mean, log scale)")
    losses.set_title(f"{title}: training loss per stage")
    losses.grid(alpha=0.3)
    losses.legend()
    names, values, colours = [], [], []
    for row in rows:
        for key, colour in (("accuracy", "tab:blue"), ("knn_accuracy", "tab:orange")):
            if row.get(key) is not None:
                names.append(f"{row['stage']}\n({'kNN' if key == 'knn_accuracy' else 'head'})")
                values.append(100 * row[key])
                colours.append(colour)
    if values:
        bars = accuracies.bar(range(len(values)), values, color=colours)
        accuracies.bar_label(bars, fmt="%.2f")
        accuracies.set_xticks(range(len(values)), names, fontsize=8)
        accuracies.set_ylim(0, 105)
    accuracies.set_ylabel("held-out accuracy %")
    accuracies.set_title("held-out accuracy at the end of each stage")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
