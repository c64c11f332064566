"""Faults survived with real processes: 2 CPU ranks under the deepspeed launcher.

Each fault is injected with the test-only DISTILL_FAULT variable (tests/faults.py)
or with real broken inputs (corrupt shards, a full tmpfs, wrong teacher weights). The
figures these tests produce are recorded in docs/reliability.md.

Launches are chained where one fault's aftermath is the next one's starting point, so that
the module needs 8 launches (45 to 70 s each here).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import (DIGITS_STUDENT, DIGITS_TEACHER, ROOT, ZERO3_CONFIGS, digits_fd_job, env,
                     run_deepspeed, write_spec)

pytestmark = pytest.mark.distributed

STEPS = 6
TIMEOUT_S = 20  # the collective timeout: how long a rank waits for one that stopped answering
TEACHER, STUDENT = DIGITS_TEACHER, DIGITS_STUDENT


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def digits(digits_shards) -> Path:
    return digits_shards / "train"


@pytest.fixture(scope="module")
def corrupt_digits(digits, tmp_path_factory) -> Path:
    """The same shards with every 8th sample's image replaced by bytes no decoder reads."""
    out = tmp_path_factory.mktemp("corrupt") / "train"
    shutil.copytree(digits, out)
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as source:
            members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
        keys = sorted({m.name.rsplit(".", 1)[0] for m, _ in members})
        poisoned = set(keys[::8])
        with tarfile.open(shard, "w") as target:
            for member, data in members:
                if member.name.endswith(".png") and member.name.rsplit(".", 1)[0] in poisoned:
                    data = b"not an image"
                    member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    return out


def job(run_dir: Path, train: Path, teacher: Path) -> dict:
    """A tiny Feature Distillation job: checkpoints at steps 2, 4 and 6."""
    return digits_fd_job(run_dir, train, teacher, STEPS, name="reliability",
                         deepspeed={"timeout_s": TIMEOUT_S, **ZERO3_CONFIGS},
                         checkpointing={"every_steps": 2, "keep": 2},
                         logging={"plot": False})


# ---------------------------------------------------------------------------- helpers

def launch(spec_file: Path, *extra: str, fault: str | None = None,
           extra_env: dict[str, str] | None = None):
    """Runs the job; returns (result, output, the unix time the launcher exited)."""
    extra_env = {**(extra_env or {}), **({"DISTILL_FAULT": fault} if fault else {})}
    result = run_deepspeed(spec_file, *extra, timeout=300, extra_env=extra_env)
    exited = time.time()
    output = result.stdout + result.stderr
    print(f"\n$ DISTILL_FAULT={fault or ''} deepspeed ... {' '.join(extra)}  -> exit "
          f"{result.returncode}")
    for line in output.splitlines():  # what the user saw, for docs/reliability.md (pytest -s)
        if re.search(r"error on rank|DISTILL_FAULT|resumed from|non-finite", line):
            print("   ", line.strip()[:400])
    return result, output, exited


def time_of_death(output: str) -> float:
    return float(re.search(r"(?:SIGKILL at|hangs at step \d+ from) unix time ([0-9.]+)",
                           output).group(1))


def complete(checkpoints: Path) -> list[str]:
    return sorted(p.parent.name for p in checkpoints.glob("*/COMPLETE"))


def steps_logged(stage_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def records(stage_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads,
                                       (stage_dir / "metrics.jsonl").read_text().splitlines())}


def checkpoint_weights(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 student of a ZeRO-3 checkpoint, assembled offline from its shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return bool(state) and all(torch.isfinite(v).all() for v in state.values())


def rank0_error_paragraph(output: str) -> None:
    """One message, no traceback: what a user must see when a run fails."""
    assert "Traceback" not in output, output[-4000:]
    assert output.count("error on rank") == 1, output[-4000:]


def snapshot(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime for p in directory.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts
            and ".hypothesis" not in p.parts}


# ---------------------------------------------------------------------------- faults

def test_hung_or_dead_rank_and_death_while_saving_cost_only_steps_since_the_checkpoint(
        digits, teacher_file, tmp_path):
    run_dir = tmp_path / "run"
    spec_file = write_spec(tmp_path / "job.yaml", job(run_dir, digits, teacher_file))
    stage, checkpoints = run_dir / "fd", run_dir / "fd" / "checkpoints"
    figures = {}

    # 1. Rank 1 stops answering at the start of step 4 (step 2 is checkpointed): rank 0's
    # collective times out after deepspeed.timeout_s and the launcher ends the job.
    result, output, exited = launch(spec_file, fault="hang_rank_at_step:1:4")
    assert result.returncode != 0, output[-3000:]
    figures["hung rank: seconds from hang to launcher exit"] = exited - time_of_death(output)
    assert exited - time_of_death(output) < TIMEOUT_S + 40
    assert "error on rank 0: lost contact with another rank" in output, output[-3000:]
    assert "Traceback" not in output, output[-4000:]
    assert complete(checkpoints) == ["step00000002"]
    step3_before = records(stage)[3]["loss"]

    # 2. Rerun: it resumes from step 2; rank 1 is SIGKILLed at the start of step 4.
    result, output, exited = launch(spec_file, fault="kill_rank_at_step:1:4")
    assert result.returncode != 0, output[-3000:]
    assert "resumed from step00000002" in output
    figures["rank death: seconds from SIGKILL to launcher exit"] = exited - time_of_death(output)
    assert exited - time_of_death(output) < 60
    assert complete(checkpoints) == ["step00000002"]

    # 3. Rerun: it resumes from step 2; rank 0 is SIGKILLed inside the step-4 save, after
    # DeepSpeed wrote its files and before the COMPLETE marker.
    result, output, exited = launch(spec_file, fault="die_in_save_at_step:4")
    assert result.returncode != 0, output[-3000:]
    assert "resumed from step00000002" in output
    figures["death in save: seconds from SIGKILL to launcher exit"] = exited - time_of_death(output)
    assert (checkpoints / "step00000004").is_dir() and complete(checkpoints) == ["step00000002"]
    # An older DeepSpeed 'latest' file pointing at the half-written tag must not matter.
    (checkpoints / "latest").write_text("step00000004")

    # 4. Rerun with HOME and TMPDIR in a watched folder: resumes from step 2 (the newest
    # complete checkpoint), finishes, and writes nowhere but its run directory.
    watched = tmp_path / "watched"
    (watched / "home").mkdir(parents=True)
    (watched / "tmp").mkdir()
    repo_before, data_before = snapshot(ROOT), snapshot(digits)
    result, output, _ = launch(spec_file, "--set", "logging.plot=true",
                              extra_env={"HOME": str(watched / "home"),
                                         "TMPDIR": str(watched / "tmp")})
    assert result.returncode == 0, output[-3000:]
    assert "resumed from step00000002" in output
    assert steps_logged(stage) == list(range(1, STEPS + 1))  # each step logged once
    # Resume is exact: step 3 computes the same loss as it did before the crash.
    assert records(stage)[3]["loss"] == pytest.approx(step3_before, rel=1e-6)
    assert complete(checkpoints) == ["step00000004", "step00000006"]
    assert all_finite(checkpoint_weights(checkpoints, "step00000006"))
    assert (stage / "export" / "metrics.json").is_file() and (stage / "loss.png").is_file()
    written_outside = sorted(str(p.relative_to(watched)) for p in watched.rglob("*") if p.is_file())
    assert written_outside == [], written_outside
    repo_after = snapshot(ROOT)
    assert {k for k in repo_after if repo_before.get(k) != repo_after[k]} == set()
    assert snapshot(digits) == data_before
    print(figures)  # the figures in docs/reliability.md (pytest -s shows them)


def test_nonfinite_loss_stops_or_is_skipped_and_corrupt_samples_are_counted(
        corrupt_digits, teacher_file, tmp_path):
    run_dir = tmp_path / "run"
    spec_file = write_spec(tmp_path / "job.yaml", job(run_dir, corrupt_digits, teacher_file))
    stage, checkpoints = run_dir / "fd", run_dir / "fd" / "checkpoints"

    # Default on_nonfinite: stop. A poisoned batch (NaN pixels on rank 0) at step 3.
    result, output, _ = launch(spec_file, fault="nan_loss_at_step:3")
    assert result.returncode == 1, output[-3000:]
    rank0_error_paragraph(output)
    assert "step 3: non-finite loss in total, feature" in output
    assert complete(checkpoints) == ["step00000002"]
    assert all_finite(checkpoint_weights(checkpoints, "step00000002"))

    # The same command with on_nonfinite: skip resumes, skips step 3's bad batch, finishes.
    result, output, _ = launch(spec_file, "--set", "optimisation.on_nonfinite=skip",
                               fault="nan_loss_at_step:3")
    assert result.returncode == 0, output[-3000:]
    # (rich wraps log lines at the terminal width: compare with whitespace collapsed)
    assert "step 3: non-finite loss in total, feature; step skipped" in " ".join(output.split())
    last = records(stage)[STEPS]
    assert last["skipped_steps"] == 1
    assert all_finite(checkpoint_weights(checkpoints, "step00000006"))
    # The skipped attempt made no optimizer step: Adam's step count equals the steps applied.
    optim = torch.load(checkpoints / "step00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)  # our own file, written by this test's run
    adam_steps = {int(s["step"]) for s in
                  optim["optimizer_state_dict"]["optimizer_state_dict"]["state"].values()}
    assert adam_steps == {STEPS}
    # Every 8th sample is corrupt: skipped and counted (summed over both ranks), run done.
    assert last["bad_samples"] > 0
    assert (stage / "export" / "metrics.json").is_file()


def test_corrupt_samples_past_the_limit_end_the_run_with_a_clear_error(
        corrupt_digits, teacher_file, tmp_path):
    spec_file = write_spec(tmp_path / "job.yaml", job(tmp_path / "run", corrupt_digits,
                                                      teacher_file))
    result, output, _ = launch(spec_file, "--set", "data.max_bad_samples=2")
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-4000:]
    assert re.search(r"error on rank \d: .*more than max_bad_samples=2", output), output[-3000:]
    assert "not an image" in output or "bad sample" in output


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs: room for one checkpoint of the tiny job (about 480 KiB), not two."""
    mount_point = tmp_path / "run" / "fd" / "checkpoints"
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); "
                    "the disk-full test needs root or a permitted mount")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
        digits, teacher_file, tmp_path, small_disk):
    spec_file = write_spec(tmp_path / "job.yaml", job(tmp_path / "run", digits, teacher_file))
    result, output, _ = launch(spec_file)
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-4000:]
    assert re.search(r"error on rank \d: saving checkpoint \S+step00000004 failed", output), \
        output[-3000:]
    assert "newest complete checkpoint (step00000002) is intact" in output
    assert complete(small_disk) == ["step00000002"]
    assert all_finite(checkpoint_weights(small_disk, "step00000002"))


def test_teacher_weights_that_do_not_fit_fail_before_any_step(digits, tmp_path):
    import timm
    # The teacher's depth at the student's width: every key present, most shapes wrong.
    wrong = timm.create_model("vit_tiny_patch16_224", **{**TEACHER, "embed_dim": 32}).state_dict()
    wrong.pop("cls_token")
    wrong["extra.weight"] = torch.zeros(3)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    spec = job(tmp_path / "run", digits, tmp_path / "wrong.safetensors")
    spec_file = write_spec(tmp_path / "job.yaml", spec)
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--spec",
                             str(spec_file)], capture_output=True, text=True, cwd=ROOT,
                            env=env(), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for words in ("missing keys: cls_token", "unexpected keys: extra.weight",
                  "shape mismatches: ", "blocks.0.attn.qkv.weight (file [96, 32], model [192, 64])"):
        assert words in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # nothing ran
