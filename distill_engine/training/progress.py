"""What the user sees: a progress bar on rank 0 (a plain line per logging interval where
stderr is a file), a JSONL metrics log, TensorBoard events when installed, and a summary
table at the end (the PNGs are drawn by ``plots``). Other ranks print nothing unless
something fails."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

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


# The parts of a step whose time a record may carry (``{part}_s``), and what a log line calls
# each share: the teacher's forward, the student's forward and backward, the optimizer step
# (training.step_timing) and the wait for data (the trainer).
TIMED_PARTS = ("teacher", "student", "optimizer", "data_wait")
LINE_ORDER = (("data_wait", "data wait"), ("teacher", "teacher"), ("student", "student"),
              ("optimizer", "optimizer"))


class StageProgress:
    """Progress display, metrics log and TensorBoard events for one stage; a no-op on
    ranks other than 0.

    Every ``logging.every_steps`` steps (and at the first and last) one record goes to
    ``metrics.jsonl``: the losses averaged over the steps since the previous record, the
    learning rate, samples/s, where the steps' time went (the shares of the teacher's
    forward, the student's forward and backward, the optimizer step and the wait for data,
    from the records' ``*_s`` timings) and the model FLOPs utilisation (``mfu``: the
    records' ``model_flops`` per second over ``peak_flops``). On a terminal a rich bar shows
    it; where stderr is a file (a cluster job's log) the bar would print only at the end, so
    a plain line is printed per record instead. Evaluation results go to ``eval.jsonl``.
    """

    def __init__(self, stage: str, directory: Path, total_steps: int, start_step: int,
                 samples_per_step: int, enabled: bool, tensorboard: bool = False,
                 peak_flops: float | None = None):
        self.enabled = enabled
        self.peak_flops = peak_flops
        self.stage = stage
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.metrics_path = directory / "metrics.jsonl"
        self.eval_path = directory / "eval.jsonl"
        self._started = self._last_time = time.perf_counter()
        self._start_step = self._last_step = start_step
        self._sums: dict[str, float] = {}
        self._count = 0
        self.rate = 0.0
        self.writer = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        for path in (self.metrics_path, self.eval_path):
            if start_step == 0 and path.exists():
                path.unlink()  # a fresh stage; a resumed one appends
            elif path.exists():
                _drop_records_after(path, start_step)
        if tensorboard:
            self.writer = tensorboard_writer(directory / "tensorboard")
        self.plain = not console.is_terminal
        if self.plain:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False)
        self.task = self.progress.add_task(stage, total=total_steps, completed=start_step,
                                           loss="-", rate="-")
        self.progress.start()

    def step(self, step: int, record: dict[str, Any], log_now: bool) -> None:
        if not self.enabled:
            return
        for key, value in record.items():
            if key == "loss" or key.startswith("loss/") or key.endswith("_s") or \
                    key == "model_flops":
                self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        if log_now:
            record = self._averaged(step, record)
            with self.metrics_path.open("a") as out:
                out.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for key, value in record.items():
                    if key.startswith("loss") or key.endswith("_share") or \
                            key in ("lr", "samples_per_s", "mfu"):
                        self.writer.add_scalar(f"train/{key}", value, step)
            if self.plain:
                console.print(self._line(step, record), markup=False, highlight=False,
                              soft_wrap=True)
        if not self.plain:
            self.progress.update(self.task, completed=step, loss=f"{record['loss']:.4f}",
                                 rate=f"{self.rate:.1f}")

    def _averaged(self, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """The record with its losses and timings averaged over the steps since the last."""
        now = time.perf_counter()
        self.rate = (step - self._last_step) * self.samples_per_step / max(now - self._last_time,
                                                                           1e-9)
        self._last_time, self._last_step = now, step
        averaged = {k: round(v / self._count, 5) if k.endswith("_s") else v / self._count
                    for k, v in self._sums.items()}
        step_s = max(self._sums.get("step_s", 0.0), 1e-9)
        shares = {f"{part}_share": round(self._sums[f"{part}_s"] / step_s, 4)
                  for part in TIMED_PARTS if f"{part}_s" in self._sums}
        if self.peak_flops and "model_flops" in self._sums:
            shares["mfu"] = round(self._sums["model_flops"] / step_s / self.peak_flops, 4)
        out = {**record, **averaged, "steps_averaged": self._count,
               "samples_per_s": round(self.rate, 2), **shares}
        self._sums, self._count = {}, 0
        return out

    def _line(self, step: int, record: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self._started
        done = step - self._start_step
        eta = elapsed / done * (self.total_steps - step) if done else 0.0
        shares = " ".join(f"{name} {record[f'{part}_share']:.0%}"
                          for part, name in LINE_ORDER if f"{part}_share" in record)
        mfu = f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
        return (f"{self.stage} step {step}/{self.total_steps} loss {record['loss']:.4f} "
                f"lr {record['lr']:.3g} {record['samples_per_s']:.1f} samples/s {shares}{mfu} "
                f"ETA {_duration(eta)}")

    def evaluation(self, step: int, result: dict[str, Any]) -> None:
        """Records an evaluation result (``accuracy`` or ``knn_accuracy``) at ``step``."""
        if not self.enabled or not result:
            return
        with self.eval_path.open("a") as out:
            out.write(json.dumps({"step": step, **result}) + "\n")
        if self.writer is not None:
            for key, value in result.items():
                if key != "samples":
                    self.writer.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if not self.plain:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


class RecordingProgress:
    """Rank 0's display of a recording stage (no loss, no optimizer): a rich bar of batches
    with samples/s and ETA on a terminal; where stderr is a file, a plain line every
    ``every`` batches and at the last. A no-op on other ranks."""

    def __init__(self, stage: str, total: int, done: int, samples_per_batch: int, every: int,
                 enabled: bool):
        self.enabled, self.stage, self.total, self.every = enabled, stage, total, every
        self.samples_per_batch = samples_per_batch
        self._started = self._last_time = time.perf_counter()
        self._start = self._last = done
        if not enabled:
            return
        self.plain = not console.is_terminal
        if self.plain:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{stage}"), TextColumn("recording"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False)
        self.task = self.progress.add_task(stage, total=total, completed=done, rate="-")
        self.progress.start()

    def advance(self, done: int, epoch: int) -> None:
        """``done`` batches of ``total`` recorded, the last of them from ``epoch``."""
        if not self.enabled or not (done % self.every == 0 or done == self.total):
            return
        now = time.perf_counter()
        rate = (done - self._last) * self.samples_per_batch / max(now - self._last_time, 1e-9)
        self._last, self._last_time = done, now
        if not self.plain:
            self.progress.update(self.task, completed=done, rate=f"{rate:.1f}")
            return
        elapsed = now - self._started
        eta = elapsed / (done - self._start) * (self.total - done) if done > self._start else 0.0
        console.print(f"{self.stage} recorded batch {done}/{self.total} (epoch {epoch}) "
                      f"{rate:.1f} samples/s ETA {_duration(eta)}", markup=False,
                      highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.enabled and not self.plain:
            self.progress.stop()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget their old records (and
    a last line that a kill cut short), so that every step is logged once."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


_tensorboard_missing_said = False


def tensorboard_writer(directory: Path):
    """A TensorBoard ``SummaryWriter``, or None (with one note per job) when the optional
    ``tensorboard`` package is not installed (``pip install ".[tensorboard]"``)."""
    global _tensorboard_missing_said
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _tensorboard_missing_said:
            logging.getLogger("distill_engine").info(
                "TensorBoard event files are not written: the tensorboard package is not "
                "installed (pip install \".[tensorboard]\")")
            _tensorboard_missing_said = True
        return None
    return SummaryWriter(str(directory))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_table(rows: list[dict[str, Any]]) -> Table:
    """One row per stage; a stage that trains no classifier shows the kNN accuracy of its
    features instead of a head accuracy."""
    table = Table(title="distillation summary",
                  caption="time %: the shares of the steps spent in the teacher's forward / "
                          "the student's forward and backward / the optimizer step / waiting "
                          "for data")
    for column in ("stage", "teacher", "steps", "first loss", "last loss", "held-out acc.",
                   "kNN acc.", "time %", "MFU"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        teacher = (row.get("teacher") or "-").split(":", 1)[-1]
        table.add_row(row["stage"], teacher, str(row["steps"]), _fmt(row.get("first_loss")),
                      _fmt(row.get("last_loss")), _percent(row.get("accuracy")),
                      _percent(row.get("knn_accuracy")), _shares(row.get("time_shares")),
                      _percent(row.get("mfu"), 1))
    return table


def _shares(shares: dict[str, float] | None) -> str:
    """``38/45/9/1``: the teacher, student, optimizer and data-wait shares of the steps, %."""
    if not shares:
        return "-"
    return "/".join(f"{100 * shares[part]:.0f}" for part in TIMED_PARTS)


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
