"""What the user sees: a progress bar on rank 0, a JSONL metrics log, a loss-curve PNG per
stage and a summary table at the end. Other ranks print nothing unless something fails."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

import sys

# Cluster logs are files, not terminals: give tables room rather than rich's 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


class _DropKnownNoise(logging.Filter):
    """Warnings DeepSpeed emits on every healthy run (its warm-up schedulers are asked for
    a learning rate at construction)."""

    NOISE = ("Attempting to get learning rate from scheduler before it has started",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO through rich; other ranks only warnings and errors. DeepSpeed's
    own INFO chatter is silenced everywhere, and so are deprecation notices that torch
    raises inside DeepSpeed's collectives on every call."""
    import warnings
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated",
                            category=FutureWarning)
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        ds_logger.addFilter(_DropKnownNoise())
    except ImportError:
        pass


class StageProgress:
    """Progress bar + metrics log for one stage; a no-op on ranks other than 0."""

    def __init__(self, stage: str, directory: Path, total_steps: int, start_step: int,
                 samples_per_step: int, enabled: bool):
        self.enabled = enabled
        self.samples_per_step = samples_per_step
        self.metrics_path = directory / "metrics.jsonl"
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.rate = 0.0
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh stage; a resumed one appends
        elif self.metrics_path.exists():
            self._drop_records_after(start_step)
        self.progress = Progress(
            TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False)
        self.task = self.progress.add_task(stage, total=total_steps, completed=start_step,
                                           loss="-", rate="-")
        self.progress.start()

    def _drop_records_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: forget their old records
        (and a last line that a kill cut short), so that every step is logged once."""
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.metrics_path)

    def step(self, step: int, record: dict[str, Any], log_now: bool) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if log_now:
            elapsed = now - self._last_time
            self.rate = (step - self._last_step) * self.samples_per_step / max(elapsed, 1e-9)
            self._last_time, self._last_step = now, step
            record = {**record, "samples_per_s": round(self.rate, 2)}
            with self.metrics_path.open("a") as out:
                out.write(json.dumps(record) + "\n")
        self.progress.update(self.task, completed=step, loss=f"{record['loss']:.4f}",
                             rate=f"{self.rate:.1f}")

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png: Path, title: str) -> Path | None:
    records = read_metrics(metrics_path)
    if not records:
        return None
    # matplotlib writes a font cache to ~/.cache unless told otherwise; a run writes only
    # under its run directory (a user's own MPLCONFIGDIR wins).
    os.environ.setdefault("MPLCONFIGDIR", str(png.parent / ".matplotlib"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="total", linewidth=2)
    terms = [k.removeprefix("loss/") for k in records[0] if k.startswith("loss/")]
    if len(terms) > 1:
        for term in terms:
            ax.plot(steps, [r[f"loss/{term}"] for r in records], label=term, alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def summary_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="distillation summary")
    for column in ("stage", "teacher", "steps", "first loss", "last loss", "held-out acc."):
        table.add_column(column, no_wrap=True)
    for row in rows:
        accuracy = row.get("accuracy")
        teacher = (row.get("teacher") or "-").split(":", 1)[-1]
        table.add_row(row["stage"], teacher, str(row["steps"]), _fmt(row.get("first_loss")),
                      _fmt(row.get("last_loss")), f"{accuracy:.2%}" if accuracy is not None else "-")
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
