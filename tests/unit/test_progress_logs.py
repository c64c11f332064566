"""What a run writes while it trains, when its output is a file (a cluster job's log):
one plain line per logging interval, records averaged over the interval, and TensorBoard
events when the optional package is installed."""

from __future__ import annotations

import json
import re

import pytest

from distill_engine.training.plots import plot_losses
from distill_engine.training.progress import StageProgress

EVERY, TOTAL = 4, 10


def run_steps(directory, tensorboard=False):
    progress = StageProgress("demo", directory, TOTAL, 0, samples_per_step=8, enabled=True,
                             tensorboard=tensorboard)
    for step in range(1, TOTAL + 1):
        record = {"step": step, "loss": float(step), "loss/feature": 2.0 * step,
                  "lr": 0.01 * step, "step_s": 0.5, "data_wait_s": 0.125}
        progress.step(step, record, log_now=step % EVERY == 0 or step in (1, TOTAL))
        if step == 8:
            progress.evaluation(step, {"knn_accuracy": 0.5, "samples": 360})
    progress.evaluation(TOTAL, {"knn_accuracy": 0.75, "samples": 360})
    progress.close()


def test_a_file_gets_one_plain_line_per_interval_with_averaged_values(tmp_path, capsys):
    run_steps(tmp_path)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    lines = re.findall(r"^demo step (\d+)/10 loss ([\d.]+) lr (\S+) [\d.]+ samples/s data wait "
                       r"(\d+)% ETA \d+:\d\d:\d\d$", err, re.MULTILINE)
    # Steps 1, 4, 8, 10: the loss is the mean over the steps since the last line.
    assert [(int(s), float(loss)) for s, loss, _, _ in lines] == [
        (1, 1.0), (4, 3.0), (8, 6.5), (10, 9.5)]
    assert {wait for *_, wait in lines} == {"25"}
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["loss/feature"], r["steps_averaged"]) for r in records] == [
        (1, 1.0, 2.0, 1), (4, 3.0, 6.0, 3), (8, 6.5, 13.0, 4), (10, 9.5, 19.0, 2)]
    assert records[-1]["lr"] == pytest.approx(0.1) and records[-1]["data_wait_share"] == 0.25
    evaluations = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["knn_accuracy"]) for e in evaluations] == [(8, 0.5), (10, 0.75)]
    # The loss plot has a third panel for the evaluations.
    assert plot_losses(tmp_path, tmp_path / "loss.png", "demo").stat().st_size > 5000


def test_tensorboard_events_are_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_steps(tmp_path, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 4, 8, 10]
    assert [e.value for e in events.Scalars("eval/knn_accuracy")] == [0.5, 0.75]


def test_lines_records_and_the_summary_say_where_the_time_went_and_the_mfu(tmp_path, capsys):
    from distill_engine.training.progress import summary_table
    from distill_engine.training.step_timing import stage_summary
    progress = StageProgress("demo", tmp_path, 4, 0, samples_per_step=8, enabled=True,
                             peak_flops=1e9)
    for step in range(1, 5):
        progress.step(step, {"step": step, "loss": 1.0, "lr": 0.1, "step_s": 0.5,
                             "data_wait_s": 0.05, "teacher_s": 0.2, "student_s": 0.15,
                             "optimizer_s": 0.05, "model_flops": 2e8}, log_now=step in (1, 4))
    progress.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"demo step 4/4 loss 1\.0000 lr 0\.1 [\d.]+ samples/s data wait 10% "
                        r"teacher 40% student 30% optimizer 10% MFU 40\.0% ETA 0:00:00", line), line
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {k: records[-1][k] for k in ("teacher_share", "student_share", "optimizer_share",
                                        "data_wait_share", "mfu")} == {
        "teacher_share": 0.4, "student_share": 0.3, "optimizer_share": 0.1,
        "data_wait_share": 0.1, "mfu": 0.4}
    row = {"stage": "demo", "teacher": "timm:vit", "steps": 4, **stage_summary(records)}
    assert row["time_shares"] == {"teacher": 0.4, "student": 0.3, "optimizer": 0.1,
                                  "data_wait": 0.1} and row["mfu"] == 0.4
    from rich.console import Console
    console = Console(width=200)
    with console.capture() as table:
        console.print(summary_table([row]))
    assert "40/30/10/10" in table.get() and "40.0%" in table.get()


def test_a_recording_shows_batches_rate_and_eta_on_rank_0_only(capsys):
    from distill_engine.training.progress import RecordingProgress
    # Resumed at batch 2 of 10: lines at every 4th batch and at the last, none elsewhere.
    progress = RecordingProgress("record", total=10, done=2, samples_per_batch=16, every=4,
                                 enabled=True)
    for done in range(3, 11):
        progress.advance(done, epoch=(done - 1) // 5)
    progress.close()
    silent = RecordingProgress("record", total=10, done=0, samples_per_batch=16, every=4,
                               enabled=False)  # another rank
    for done in range(1, 11):
        silent.advance(done, epoch=0)
    lines = re.findall(r"^record recorded batch (\d+)/10 \(epoch (\d)\) [\d.]+ samples/s "
                       r"ETA (\d+:\d\d:\d\d)$", capsys.readouterr().err, re.MULTILINE)
    assert [(int(b), int(e)) for b, e, _ in lines] == [(4, 0), (8, 1), (10, 1)]
    assert lines[-1][2] == "0:00:00"
