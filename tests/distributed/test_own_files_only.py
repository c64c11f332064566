"""What a run leaves on disk, with real launches of the tiny digits FD job: pruning deletes
only the engine's own tags, an export that lost its weights is refused by --check (which
changes nothing), a world-size conversion stopped by a signal is redone, and a run_dir
the lock cannot make is one paragraph at launch."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (DIGITS_STUDENT, ROOT, ZERO3_CONFIGS, StartedJob, check_in_process,
                     digits_fd_job, env, run_deepspeed, write_spec)

pytestmark = pytest.mark.distributed


def files_on_disk(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_process(spec_file: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python launch/run.py --spec JOB.yaml``: one rank, no launcher."""
    environment = {k: v for k, v in env().items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--spec",
                           str(spec_file), *extra], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=300)


# ---------------------------------------------------------------------------- 5 and 10

def two_stages(run_dir: Path, train: Path, teacher: Path) -> dict:
    """fd (6 steps, a checkpoint every 2, keep 1), then a classifier fine-tuned from it."""
    spec = digits_fd_job(run_dir, train, teacher, 6, checkpointing={"every_steps": 2, "keep": 1},
                         logging={"every_steps": 1, "plot": False})
    spec["stages"].append({"name": "finetune", "objectives": [{"kind": "cross_entropy"}],
                           "student": {"arch": "timm:vit_tiny_patch16_224",
                                       "kwargs": DIGITS_STUDENT, "init": "stage:fd",
                                       "dtype": "fp32"},
                           "optimisation": {"steps": 2}})
    return spec


def test_pruning_keeps_folders_it_did_not_write_and_check_sees_a_lost_export(
        digits_shards, teacher_file, tmp_path):
    run_dir = tmp_path / "run"
    spec_file = write_spec(tmp_path / "job.yaml",
                           two_stages(run_dir, digits_shards / "train", teacher_file))
    checkpoints = run_dir / "fd" / "checkpoints"
    # What a user keeps beside the tags, and what an earlier crash of the engine left.
    for mine in ("step00000002.bak", "best_by_hand", "archive"):
        (checkpoints / mine).mkdir(parents=True)
        (checkpoints / mine / "notes.txt").write_text(f"{mine}, kept by hand")
    for left in ("step00000001", "step00000001.corrupt"):
        (checkpoints / left).mkdir()
        (checkpoints / left / "mp_rank_00_model_states.pt").write_bytes(b"half a save")
    by_hand = {k: v for k, v in files_on_disk(checkpoints).items() if "notes" in k}

    result = run_deepspeed(spec_file, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = files_on_disk(checkpoints)
    # Before: every folder not a complete tag that sorted before the newest was deleted.
    assert {k: v for k, v in after.items() if "notes" in k} == by_hand
    folders = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert folders == ["archive", "best_by_hand", "step00000002.bak", "step00000006"], folders

    # 10. The finished stage fd loses its export's weights; finetune starts from them.
    (run_dir / "fd" / "export" / "model.safetensors").unlink()
    before = files_on_disk(run_dir)
    code, out, err = check_in_process(spec_file)
    # Before: the spec was called valid, and finetune failed on every rank after
    # DeepSpeed had started.
    assert code == 2, out + err
    lines = [line.removeprefix("  - ") for line in err.splitlines()[1:]]
    assert lines == [
        f"stages[1].student.init: stage 'fd' is finished (its export/metrics.json is there) "
        f"but its weights {run_dir}/fd/export/model.safetensors do not exist any more, and a "
        f"finished stage is not trained again; put the file back, or run with --restart-from "
        f"fd to train it and every stage after it again (their folders are moved aside, not "
        f"deleted)"], lines
    code, out, err = check_in_process(spec_file, "--restart-from", "fd")
    assert code == 0, err  # the way out the message names passes the check
    assert files_on_disk(run_dir) == before  # checking moved and wrote nothing


# ---------------------------------------------------------------------------- 6

def test_a_conversion_stopped_by_a_signal_is_redone(digits_shards, teacher_file, tmp_path):
    run_dir = tmp_path / "run"
    # ZeRO-3, as in test_runs_that_change's resize (the auto placement's checkpoint of this
    # tiny job is one ds_to_universal refuses: "universal_checkpoint_info state is missing").
    spec = digits_fd_job(run_dir, digits_shards / "train", teacher_file, 6,
                         checkpointing={"every_steps": 3, "keep": 1},
                         logging={"every_steps": 1, "plot": False},
                         deepspeed=dict(ZERO3_CONFIGS))
    spec_file = write_spec(tmp_path / "job.yaml", spec)
    result = run_deepspeed(spec_file, "--stop-after", "3", timeout=600)  # saved at 2 ranks
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    universal = run_dir / "fd" / "universal" / "step00000003"

    # One rank: the checkpoint is converted; SIGTERM to the job's process group (the
    # converter is in it) while it is.
    job = StartedJob(spec_file, log=tmp_path / "stopped.log", single_process=True)
    try:
        job.wait_for("converting checkpoint")
        job.signal_group(signal.SIGTERM)
        code, _, left = job.wait(timeout=120)
    finally:
        job.clean_up()
    output = job.output
    assert code == 143 and not left, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "was being converted for this one (the conversion is " \
        "redone next time)" in stopped[0], output[-3000:]
    # Before: CONVERTED said "failed: no message", and every later run at this world size
    # failed on it without trying again.
    assert not (universal / "CONVERTED").exists()
    assert (universal / "INTERRUPTED").is_file()

    result = one_process(spec_file)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "saved at 2 ranks, resumed at 1" in output, output[-3000:]
    assert (universal / "CONVERTED").read_text() == "ok"
    assert not (universal / "INTERRUPTED").exists()
    assert (run_dir / "fd" / "export" / "metrics.json").is_file()


# ---------------------------------------------------------------------------- 17

def test_a_run_dir_the_lock_cannot_make_is_one_paragraph_at_launch(digits_shards,
                                                                    teacher_file, tmp_path):
    from distill_engine.planning.references import run_dir_problem
    run_dir = Path("/proc/no-such-run/run")  # looks writable here, and mkdir fails
    if run_dir_problem(run_dir) is not None:
        pytest.skip("--check already refuses this run_dir on this machine")
    spec_file = write_spec(tmp_path / "job.yaml", digits_fd_job(
        run_dir, digits_shards / "train", teacher_file, 2, logging={"plot": False}))
    result = one_process(spec_file)
    output = result.stdout + result.stderr
    # Before: a NotADirectoryError / FileNotFoundError traceback from the run lock.
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert f"error: run_dir {run_dir} cannot be made or written (" in output, output[-3000:]
