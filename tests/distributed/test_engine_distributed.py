"""The real DeepSpeed engine on 2 CPU ranks (gloo): a ZeRO-3 teacher sharded across the
ranks, Feature Distillation whose loss falls, exact resume, an export that timm loads in one
line, and the evaluation that ``data.eval`` alone turns on (kNN, since FD trains no head).

One job spec serves all three launches: a straight 12-step run, and the same run stopped
after 6 steps and resumed by running the same command again.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (DIGITS_STUDENT, DIGITS_TEACHER, ZERO3_CONFIGS, digits_fd_job, run_deepspeed,
                     write_spec)

pytestmark = pytest.mark.distributed

STEPS = 12
TEACHER, STUDENT = DIGITS_TEACHER, DIGITS_STUDENT


@pytest.fixture(scope="module")
def fd_spec(tmp_path_factory, digits_shards) -> dict:
    digits = digits_shards
    import timm
    work = tmp_path_factory.mktemp("fd")
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", **TEACHER)
    save_file(teacher.state_dict(), str(work / "teacher.safetensors"))
    return digits_fd_job(
        work / "run", digits / "train", work / "teacher.safetensors", STEPS,
        # data.eval and no eval section: evaluation is on, every 6 steps and at the end.
        data={"eval": str(digits / "holdout"),
              "views": {"geometry": {"size": 24, "crop": "random_resized", "scale": [0.5, 1.0],
                                     "hflip": 0.5, "interpolation": "bilinear"}}},
        optimisation={"warmup_steps": 2, "grad_clip": 3.0},
        checkpointing={"every_steps": 6, "keep": 2},
        deepspeed=ZERO3_CONFIGS,
        eval={"every_steps": 6},
        stage={"student": {"drop_path_rate": 0.1}})


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (run_dir / "fd" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def straight(fd_spec, tmp_path_factory):
    spec_file = write_spec(tmp_path_factory.mktemp("straight") / "job.yaml", fd_spec)
    result = run_deepspeed(spec_file)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight_run(fd_spec, straight) -> Path:
    return Path(fd_spec["run_dir"])


def test_teacher_is_sharded_about_half_per_rank(straight_run):
    shards = json.loads((straight_run / "fd" / "teacher_shards.json").read_text())
    assert len(shards["held_per_rank"]) == 2
    for held in shards["held_per_rank"]:
        assert 0.45 <= held / shards["total"] <= 0.55, shards


def test_distillation_loss_falls(straight_run):
    loss = losses(straight_run)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (10, 11, 12)) / 3
    assert last < 0.8 * first, loss


def test_run_writes_what_a_user_reads(straight_run):
    stage = straight_run / "fd"
    assert (stage / "loss.png").stat().st_size > 1000
    summary = json.loads((stage / "export" / "metrics.json").read_text())
    assert summary["steps"] == STEPS and summary["last_loss"] < summary["first_loss"]
    assert (stage / "export" / "spec.yaml").is_file()
    # Only the last `keep` complete checkpoints remain.
    tags = sorted(p.name for p in (stage / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000006", "step00000012"]


def test_export_loads_in_one_line_and_computes_the_probe(straight_run):
    import timm
    from timm.data import resolve_data_config
    export = straight_run / "fd" / "export"
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    probe = load_file(str(export / "probe.safetensors"))
    with torch.no_grad():
        features = model.forward_features(probe["input"])
        logits = model(probe["input"])
    # The same computation as the engine's student, classifier included (a classifier that
    # timm re-initialised would differ by whole units).
    torch.testing.assert_close(features, probe["tap/norm"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, probe["tap/output"], rtol=1e-5, atol=1e-6)
    # How the student was fed and what its classes are, as timm reports them.
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 24, 24) and config["interpolation"] == "bilinear"
    assert list(config["mean"]) == pytest.approx([0.485, 0.456, 0.406])  # the view's default
    assert config["crop_pct"] == 1.0
    assert json.loads((export / "config.json").read_text())["label_names"] == [
        str(digit) for digit in range(10)]
    # The FD projection head is training machinery, not part of the student.
    assert not any("projection" in k for k in load_file(str(export / "model.safetensors")))


def test_export_is_readable_by_the_group(straight_run):
    export = straight_run / "fd" / "export"
    assert stat.S_IMODE(export.stat().st_mode) == 0o755
    for path in export.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_data_eval_alone_evaluates_the_fd_features_by_knn(straight_run, straight, digits_shards):
    from data_shards import ShardIndex
    held_out = ShardIndex.load(digits_shards / "holdout").total
    summary = json.loads((straight_run / "fd" / "export" / "metrics.json").read_text())
    # FD trains no classifier: its random head is never reported, its features are.
    assert summary["accuracy"] is None
    assert 0.2 < summary["knn_accuracy"] <= 1.0  # chance is 0.1
    evaluations = [json.loads(l) for l in
                   (straight_run / "fd" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluations] == [6, 12]
    assert all(set(e) == {"step", "knn_accuracy", "samples"} and e["samples"] == held_out
               for e in evaluations)
    log = straight.stdout + straight.stderr
    assert "kNN accuracy" in log and "held-out accuracy" not in log


def test_a_log_file_gets_one_plain_line_per_logging_interval(straight):
    # stderr is a pipe here, as in a cluster job's log file: no progress bar, one line per
    # logging interval (every step in this spec).
    # Each says where the steps' time went and the model FLOPs utilisation.
    lines = re.findall(r"^.*fd step (\d+)/12 loss [\d.]+ lr \S+ [\d.]+ samples/s data wait "
                       r"\d+% teacher \d+% student \d+% optimizer \d+% MFU [\d.]+% "
                       r"ETA \d+:\d\d:\d\d$", straight.stderr, re.MULTILINE)
    assert [int(step) for step in lines] == list(range(1, STEPS + 1)), straight.stderr[-3000:]


def test_the_stage_summary_says_where_the_time_went(straight_run):
    summary = json.loads((straight_run / "fd" / "export" / "metrics.json").read_text())
    shares = summary["time_shares"]
    assert set(shares) == {"teacher", "student", "optimizer", "data_wait"}
    assert all(0 <= share <= 1 for share in shares.values()) and sum(shares.values()) <= 1.05
    # Every part was timed (which part is largest depends on the machine's load: on a tiny
    # model the optimizer step can outlast the student's forward and backward).
    assert shares["teacher"] > 0 and shares["student"] > 0 and shares["optimizer"] > 0
    assert 0 < summary["mfu"] < 1


def test_stopped_and_resumed_run_continues_with_identical_losses(fd_spec, straight_run,
                                                                 tmp_path_factory):
    work = tmp_path_factory.mktemp("resumed")
    spec = {**fd_spec, "run_dir": str(work / "run")}
    spec_file = write_spec(work / "job.yaml", spec)
    first = run_deepspeed(spec_file, "--stop-after", str(STEPS // 2))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert not (work / "run" / "fd" / "export" / "metrics.json").exists()
    second = run_deepspeed(spec_file)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from step00000006" in second.stderr + second.stdout
    want, got = losses(straight_run), losses(work / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (step, got, want)
