"""Runs that change under the job: preemption, damaged checkpoints, a second launch on the
same run directory, a spec edited since the run started, another world size, and one
process without the launcher. Real ranks (deepspeed launcher, gloo, CPU) on the tiny FD job
of test_reliability.py; the figures go to docs/reliability.md (``pytest -s`` prints them).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import all_finite, checkpoint_weights, complete, job, records, steps_logged

from distill_engine.training.checkpoints import tag_of

from helpers import ROOT, StartedJob, check_in_process, env, run_deepspeed, write_spec

pytestmark = pytest.mark.distributed

LONG = 5000  # steps: a budget no launch here reaches; each is stopped by a signal


@pytest.fixture(scope="module")
def digits(digits_shards) -> Path:
    return digits_shards / "train"


def wait_for_step(stage: Path, step: int, started: StartedJob, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (stage / "metrics.jsonl").is_file() or not steps_logged(stage) or \
            steps_logged(stage)[-1] < step:
        assert started.process.poll() is None and time.time() < deadline, started.output[-3000:]
        time.sleep(0.2)


def stop_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("stopped:")]


def show(what: str, code: int, seconds: float, output: str) -> None:
    print(f"\n{what}: exit {code}, the whole process tree gone {seconds:.1f} s after the signal")
    for line in output.splitlines():
        if line.startswith(("stopped:", "note:", "error")) or "resumed from" in line:
            print("   ", line.strip()[:300])


# ---------------------------------------------------------------------------- preemption, lock

def test_signals_end_in_one_checkpoint_and_a_second_launch_is_refused(digits, teacher_file,
                                                                       tmp_path):
    run_dir = tmp_path / "run"
    spec = job(run_dir, digits, teacher_file)
    spec["optimisation"]["steps"] = LONG
    spec["checkpointing"]["every_steps"] = LONG  # no periodic checkpoint: only the signal's
    spec_file = write_spec(tmp_path / "job.yaml", spec)
    stage, checkpoints = run_dir / "fd", run_dir / "fd" / "checkpoints"

    # 1. A second launch on the run directory of a running job is refused, naming the holder.
    first = StartedJob(spec_file, log=tmp_path / "first.log")
    try:
        wait_for_step(stage, 1, first)
        second = run_deepspeed(spec_file, timeout=300)
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        refusal = second.stdout + second.stderr
        print("\nsecond launch on the run directory: exit", second.returncode, "\n   ",
              next(l for l in refusal.splitlines() if "is in use" in l)[:400])
        assert f"{run_dir} is in use by another job: host {socket.gethostname()}, pid " in refusal
        assert "Traceback" not in refusal
        assert first.process.poll() is None  # the first job went on

        # 2. SIGTERM to the whole process group (what SLURM and Kubernetes send).
        first.signal_group(signal.SIGTERM)
        code, seconds, orphans = first.wait()
    finally:
        first.clean_up()
    show("SIGTERM to the process group", code, seconds, first.output)
    assert code != 0 and orphans == [], orphans
    assert "Traceback" not in first.output, first.output[-4000:]
    step = steps_logged(stage)[-1]
    [line] = stop_lines(first.output)
    assert "SIGTERM" in line and f"finished step {step}" in line, line
    assert f"saved checkpoint {tag_of(step)} (complete)" in line, line
    assert complete(checkpoints) == [tag_of(step)]  # nothing lost: the last step logged is saved

    # 3. A lock left by a job that was SIGKILLed (flock released, holder still written) is
    # taken over with a note; Ctrl-C (SIGINT to the group) stops this run the same way.
    (run_dir / ".lock").write_text(json.dumps({"host": "node-that-died", "pid": 4242,
                                               "started": "2026-11-22T01:02:03+00:00",
                                               "command": "launch/run.py --spec job.yaml"}))
    again = StartedJob(spec_file, log=tmp_path / "again.log")
    try:
        wait_for_step(stage, step + 2, again)
        again.signal_group(signal.SIGINT)
        code, seconds, orphans = again.wait()
    finally:
        again.clean_up()
    show("SIGINT to the process group", code, seconds, again.output)
    assert code != 0 and orphans == [], orphans
    assert "note: took over the lock" in again.output and "node-that-died, pid 4242" in again.output
    assert f"resumed from {tag_of(step)}" in again.output
    # No rank prints a traceback. The one KeyboardInterrupt traceback in the output is the
    # deepspeed runner's own: DeepSpeed 0.19.8's runner.py has no SIGINT handler on one
    # node and is interrupted in its result.wait().
    assert again.output.count("Traceback") <= 1, again.output[-4000:]
    assert "distill_engine" not in again.output.split("Traceback")[-1].split("stopped:")[0]
    if "Traceback" in again.output:
        assert "launcher/runner.py" in again.output and "result.wait()" in again.output
    step2 = steps_logged(stage)[-1]
    [line] = stop_lines(again.output)
    assert "SIGINT" in line and f"saved checkpoint {tag_of(step2)} (complete)" in line, line

    # 4. SIGTERM to the deepspeed runner alone: the ranks see it go, save, and exit; the
    # launcher follows. Nothing is left running.
    third = StartedJob(spec_file, log=tmp_path / "third.log")
    try:
        wait_for_step(stage, step2 + 2, third)
        os.kill(third.process.pid, signal.SIGTERM)
        code, seconds, orphans = third.wait(timeout=120)
    finally:
        third.clean_up()
    show("SIGTERM to the deepspeed runner alone", code, seconds, third.output)
    assert code != 0 and orphans == [], orphans
    step3 = steps_logged(stage)[-1]
    [line] = stop_lines(third.output)
    assert "the deepspeed runner" in line and f"saved checkpoint {tag_of(step3)}" in line, line
    assert complete(checkpoints) == [tag_of(step2), tag_of(step3)]
    # Every step was logged exactly once across the three runs: none lost, none repeated.
    assert steps_logged(stage) == list(range(1, step3 + 1))
    assert (run_dir / ".lock").read_text() == ""  # released


# ---------------------------------------------------------------------------- damaged checkpoints

def test_checkpoints_that_do_not_verify_are_passed_over(digits, teacher_file, tmp_path):
    run_dir = tmp_path / "run"
    spec = job(run_dir, digits, teacher_file)
    spec["optimisation"]["steps"] = 8
    spec["checkpointing"]["keep"] = 3
    spec_file = write_spec(tmp_path / "job.yaml", spec)
    stage, checkpoints = run_dir / "fd", run_dir / "fd" / "checkpoints"
    result = run_deepspeed(spec_file, "--stop-after", "6", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert complete(checkpoints) == [tag_of(2), tag_of(4), tag_of(6)]
    before = records(stage)

    # Step 6: rank 0's model file cut to half. Step 4: 64 bytes in the middle of rank 1's
    # optimizer file overwritten (same size: only the checksum can tell).
    truncated = checkpoints / tag_of(6) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:size // 2])
    overwritten = checkpoints / tag_of(4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(overwritten.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    overwritten.write_bytes(bytes(data))

    result = run_deepspeed(spec_file, timeout=300)
    output = result.stdout + result.stderr
    print("\n".join(l.strip()[:400] for l in output.splitlines()
                    if "does not verify" in l or "resumed from" in l))
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert f"checkpoint {checkpoints / tag_of(6)} does not verify" in output
    assert f"{truncated} has {size // 2:,} bytes, {size:,} when it was saved" in output
    assert f"{overwritten} does not match its checksum" in output
    assert f"resumed from {tag_of(2)}" in output
    # The resume is exact (step 3 as before), every step logged once, and the newest
    # verified checkpoints are complete and finite; the damaged tags are gone.
    assert records(stage)[3]["loss"] == pytest.approx(before[3]["loss"], rel=1e-6)
    assert steps_logged(stage) == list(range(1, 9))
    assert complete(checkpoints) == [tag_of(4), tag_of(6), tag_of(8)]
    assert all_finite(checkpoint_weights(checkpoints, tag_of(8)))
    assert not list(checkpoints.glob("*.corrupt"))


# ---------------------------------------------------------------------------- changed specs

@pytest.fixture(scope="module")
def two_stage_run(digits, teacher_file, tmp_path_factory) -> tuple[Path, dict]:
    """A finished two-stage job: FD, then a second FD stage taught by the first's export."""
    work = tmp_path_factory.mktemp("changed")
    spec = job(work / "run", digits, teacher_file)
    spec["optimisation"]["steps"] = 2
    spec["stages"].append({
        "name": "second",
        "teacher": {"arch": "stage:fd", "dtype": "fp32"},
        "student": copy.deepcopy(spec["stages"][0]["student"]),
        "objectives": [{"kind": "feature", "student_tap": "norm", "teacher_tap": "norm"}]})
    result = run_deepspeed(write_spec(work / "job.yaml", spec), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, spec


def check_with(work: Path, spec: dict, *extra: str) -> tuple[int, str]:
    code, out, err = check_in_process(write_spec(work / "changed.yaml", spec), *extra)
    return code, out + err


def test_a_changed_spec_is_refused_with_the_differences_and_the_ways_forward(two_stage_run):
    work, spec = two_stage_run

    for field, value, shown in [("num_heads", 4, "stages[0].student.kwargs.num_heads: 2 -> 4"),
                                ("embed_dim", 48, "stages[0].student.kwargs.embed_dim: 32 -> 48")]:
        changed = copy.deepcopy(spec)
        changed["stages"][0]["student"]["kwargs"][field] = value
        code, output = check_with(work, changed)
        assert code == 2, output
        assert shown in output and "--restart-from fd" in output and "new run_dir" in output
        assert "Traceback" not in output
        # The second stage's teacher is fd's export, whatever the spec now says fd is.
        assert "stages[1]" not in output

    changed = copy.deepcopy(spec)
    changed["optimisation"]["lr"] = 1e-3
    code, output = check_with(work, changed)
    assert code == 2 and "stages[0].optimisation.lr: 0.003 -> 0.001" in output, output
    assert "stages[1].optimisation.lr: 0.003 -> 0.001" in output, output

    # More steps, other logging and checkpoint interval: allowed.
    changed = copy.deepcopy(spec)
    changed["optimisation"]["steps"] = 4
    changed["logging"]["every_steps"] = 5
    changed["checkpointing"]["every_steps"] = 3
    code, output = check_with(work, changed)
    assert code == 0, output

    # --restart-from fd accepts the change (fd and second will start again).
    changed = copy.deepcopy(spec)
    changed["stages"][0]["student"]["kwargs"]["num_heads"] = 4
    code, output = check_with(work, changed, "--restart-from", "fd")
    assert code == 0, output
    code, output = check_with(work, changed, "--restart-from", "nope")
    assert code == 2 and "no stage of that name; its stages: fd, second" in output, output


def test_a_stage_taught_by_an_export_takes_the_exports_architecture(two_stage_run):
    from distill_engine.planning.load import load_plan
    work, spec = two_stage_run
    changed = copy.deepcopy(spec)
    changed["stages"][0]["student"]["kwargs"]["num_heads"] = 4
    plan = load_plan(write_spec(work / "changed.yaml", changed), world_size=2)
    teacher = plan.stages[1].teacher
    assert teacher.kwargs["num_heads"] == 2 and teacher.weights == work / "run" / "fd" / \
        "export" / "model.safetensors"
    exported = json.loads((work / "run" / "fd" / "export" / "model.json").read_text())
    assert exported["spec"]["student"]["kwargs"]["num_heads"] == 2  # the fingerprint, exported


# ---------------------------------------------------------------------------- world size, one process

def one_process(spec_file: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python launch/run.py --spec JOB.yaml`` with no launcher and no RANK & co. set."""
    environment = {k: v for k, v in env().items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--spec",
                           str(spec_file), *extra], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=300)


def adam_steps(tag_dir: Path) -> set[int]:
    states = set()
    for path in tag_dir.glob("*optim_states.pt"):
        optim = torch.load(path, weights_only=False)  # our own file, written by this test's run
        states |= {int(s["step"]) for s in
                   optim["optimizer_state_dict"]["optimizer_state_dict"]["state"].values()}
    return states


def test_one_process_without_the_launcher_and_resuming_at_another_world_size(
        digits, teacher_file, tmp_path):
    run_dir = tmp_path / "run"
    spec = job(run_dir, digits, teacher_file)
    spec["optimisation"]["steps"] = 9
    spec["checkpointing"]["every_steps"] = 3
    spec_file = write_spec(tmp_path / "job.yaml", spec)
    stage, checkpoints = run_dir / "fd", run_dir / "fd" / "checkpoints"

    # One process, no launcher: steps 1-3 at world size 1.
    result = one_process(spec_file, "--stop-after", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mpi4py" not in result.stderr and "Traceback" not in result.stderr
    # 1 -> 2 ranks: steps 4-6.
    result = run_deepspeed(spec_file, "--stop-after", "3", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "saved at 1 ranks, resumed at 2" in output and f"resumed from {tag_of(3)}" in output
    # 2 -> 1 rank: steps 7-9, to the end.
    result = one_process(spec_file)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "saved at 2 ranks, resumed at 1" in output and f"resumed from {tag_of(6)}" in output

    losses = {step: r["loss"] for step, r in records(stage).items()}
    lrs = [records(stage)[step]["lr"] for step in range(3, 10)]  # past the warm-up
    print("\nlosses across 1 -> 2 -> 1 ranks:", {k: round(v, 4) for k, v in losses.items()})
    assert steps_logged(stage) == list(range(1, 10))
    # The weights carried over: the loss after each resize continues from where it was
    # (a student starting over would be back at the first step's loss).
    for resized in (4, 7):
        assert losses[resized] < 1.25 * losses[resized - 1], losses
        assert losses[resized] < 0.9 * losses[1], losses
    # The schedule carried over: cosine decay without a restart (no warm-up again).
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:])), lrs
    # So did Adam: its step count is that of the whole stage.
    assert adam_steps(checkpoints / tag_of(9)) == {9}
    assert (stage / "export" / "metrics.json").is_file()


def test_restart_from_moves_the_stage_and_those_after_it_aside(two_stage_run, tmp_path):
    import shutil

    from distill_engine.planning.load import load_plan
    from distill_engine.training.fingerprint import restart_from
    work, spec = two_stage_run
    shutil.copytree(work / "run", tmp_path / "run")  # the fixture's run stays as it was
    changed = copy.deepcopy(spec)
    changed["run_dir"] = str(tmp_path / "run")
    changed["stages"][0]["student"]["kwargs"]["num_heads"] = 4
    spec_file = write_spec(tmp_path / "changed.yaml", changed)
    restart_from(load_plan(spec_file, world_size=2), "fd")  # what rank 0 does, holding the lock
    moved = sorted(p.name.split(".replaced-")[0] for p in (tmp_path / "run").glob("*.replaced-*"))
    assert moved == ["fd", "second"]
    assert not (tmp_path / "run" / "fd").exists() and not (tmp_path / "run" / "second").exists()
    code, out, err = check_in_process(spec_file)  # nothing left to compare: the spec passes
    assert code == 0, out + err
