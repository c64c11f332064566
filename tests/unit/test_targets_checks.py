"""--check and --plan on recorded teacher targets: each way a recording does not fit the
stage that reads it is refused in one paragraph at the YAML path to change.

The recording is made here, in this process, by the recording stage's own pieces (its plan,
its teacher, ``encode_batch`` and the writer) for both ranks of a 2-rank job, one after the
other; the distributed tests record with real ranks.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from helpers import (DIGITS_STUDENT, FD_NORM, TINY_VIT_ARCH, check_in_process, digits_teacher,
                     write_spec)

SAMPLES = 128  # 4 batches an epoch at 16 per rank x 2 ranks
EPOCHS = 2


def job(run_dir, train, teacher_weights, record=None, student_stage=None, **top) -> dict:
    student = {"arch": TINY_VIT_ARCH, "kwargs": dict(DIGITS_STUDENT), "dtype": "fp32"}
    spec = {"name": "checks", "run_dir": str(run_dir), "seed": 1,
            "data": {"train": str(train), "micro_batch_size": 16, "num_workers": 1,
                     "samples_per_epoch": SAMPLES, "views": {"geometry": {"size": 24, "hflip": 0.5}}},
            "optimisation": {"lr": 1e-3, "steps": 8},
            "stages": [
                {"name": "record", "teacher": digits_teacher(teacher_weights),
                 "record": {"epochs": EPOCHS, "top_k": 4, **(record or {})},
                 "objectives": [dict(FD_NORM), {"kind": "soft_label"},
                                {"kind": "hidden", "student_tap": "norm", "teacher_tap": "blocks.1"}]},
                {"name": "fd", "teacher": {"targets": "stage:record"}, "student": student,
                 "objectives": [dict(FD_NORM)], **(student_stage or {})}]}
    spec.update(top)
    return spec


def record_in_process(spec_file) -> None:
    """Both ranks' records, as the recording stage writes them (2 ranks, one after the other)."""
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from data_shards import ShardStream
    from data_shards.targets import TargetWriter, encode_batch, finish_recording
    from distill_engine.modeling.inputs import to_model
    from distill_engine.planning.load import load_plan
    from distill_engine.training.engines import build_teacher
    from distill_engine.training.recording import RecordingStage, teacher_inputs
    job_plan = load_plan(spec_file, world_size=2)
    plan = job_plan.stages[0]
    stage = RecordingStage(job_plan, plan)
    teacher, dtype = build_teacher(plan, job_plan.spec.seed, plan.placement.teacher)
    data = plan.spec.data
    for rank in range(2):
        stream = ShardStream(data.train, batch_size=data.micro_batch_size, rank=rank, world_size=2,
                             num_workers=data.num_workers, seed=job_plan.spec.seed + data.seed,
                             views=data.views, samples_per_epoch=data.samples_per_epoch, record_views=True)
        writer = TargetWriter(plan.targets_dir, rank, stage.header(stream))
        for batch, _ in zip(stream, range(EPOCHS * stream.batches_per_epoch)):
            taps = teacher(to_model(teacher_inputs(plan, batch), "cpu", dtype))
            writer.write_batch(batch, encode_batch(taps, plan.stores))
        writer.checkpoint(stream.state_dict(), finished=True)
    finish_recording(plan.targets_dir, 2)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, digits_shards, teacher_file):
    """A job whose recording stage is complete: (spec dict, its file)."""
    work = tmp_path_factory.mktemp("recorded")
    spec = job(work / "run", digits_shards / "train", teacher_file)
    spec_file = write_spec(work / "job.yaml", spec)
    record_in_process(spec_file)
    return spec, spec_file


def words(text: str) -> str:
    """What a rich table says, its borders and line breaks gone."""
    return " ".join(text.replace("│", " ").split())


def check(tmp_path, spec: dict, *extra) -> tuple[int, str, str]:
    return check_in_process(write_spec(tmp_path / "changed.yaml", spec), *extra)


def changed(spec: dict, stage: int, **fields) -> dict:
    spec = copy.deepcopy(spec)
    spec["stages"][stage].update(fields)
    return spec


def test_a_stage_reading_the_recording_checks_and_builds_no_teacher(recorded):
    spec, spec_file = recorded
    code, out, err = check_in_process(spec_file)
    assert code == 0, err
    assert "recorded targets of timm:vit_tiny_patch16_224" in out and "no teacher engine" in out
    assert "norm: all of [37, 64], fp16" in words(out)
    from data_shards.__main__ import main
    assert main(["verify", spec["run_dir"] + "/record/targets"]) == 0


def test_targets_recorded_from_other_weights_are_refused(recorded, tmp_path, teacher_file):
    spec, _ = recorded
    other = tmp_path / "teacher.safetensors"
    other.write_bytes(teacher_file.read_bytes())
    from safetensors.torch import load_file, save_file
    state = load_file(str(other))
    state["norm.weight"] = state["norm.weight"] + 1.0
    save_file(state, str(other))
    moved = changed(spec, 0, teacher=digits_teacher(other))
    code, _, err = check(tmp_path, moved)
    assert code == 2
    assert "stages[1].teacher.targets" in err and "other weights than the records hold" in err
    # a directory of targets with the weights named beside it: the same check
    direct = changed(spec, 1, teacher={"targets": spec["run_dir"] + "/record/targets", "weights": str(other)})
    code, _, err = check(tmp_path, direct)
    assert code == 2 and "stages[1].teacher.weights" in err and "sha256" in err


def test_taps_that_were_not_recorded_are_refused(recorded, tmp_path):
    spec, _ = recorded
    other_tap = changed(spec, 1, objectives=[{**FD_NORM, "teacher_tap": "blocks.2"}])
    code, _, err = check(tmp_path, other_tap)
    assert code == 2 and "stages[1].objectives[0]" in err and "'blocks.2', which" in err and "do not hold" in err


def test_other_views_or_another_stream_order_are_refused(recorded, tmp_path):
    spec, _ = recorded
    unflipped = changed(spec, 1, data={**spec["data"], "views": {"geometry": {"size": 24, "hflip": 0.0}}})
    code, _, err = check(tmp_path, unflipped)
    assert code == 2 and "stages[1].data.views" in err and "a flipped crop is another target" in err
    reseeded = changed(spec, 1, data={**spec["data"], "seed": 5})
    code, _, err = check(tmp_path, reseeded)
    assert code == 2 and "stages[1].data" in err and "the data seed" in err and "recorded order" in err


def test_more_epochs_than_recorded_need_allow_wrap_and_check_says_it_wraps(recorded, tmp_path):
    spec, _ = recorded
    longer = changed(spec, 1, optimisation={"lr": 1e-3, "steps": 20})  # 5 epochs of 4 batches
    code, _, err = check(tmp_path, longer)
    assert code == 2 and "stages[1].teacher.allow_wrap" in err and "needs 5 epochs" in err and "hold 2" in err
    wrapping = changed(longer, 1, teacher={"targets": "stage:record", "allow_wrap": True})
    code, out, err = check(tmp_path, wrapping)
    assert code == 0, err
    assert "wraps: epoch e reads recorded epoch e mod 2" in words(out)


def test_a_form_the_objective_cannot_use_is_refused(recorded, tmp_path):
    spec, _ = recorded
    mean_token = changed(spec, 1, student={"arch": TINY_VIT_ARCH, "kwargs": {**DIGITS_STUDENT, "embed_dim": 64},
                                           "dtype": "fp32"},
                         objectives=[{"kind": "hidden", "student_tap": "norm", "teacher_tap": "blocks.1", "token": "mean"}])
    code, _, err = check(tmp_path, mean_token)
    assert code == 2 and "needs its mean token" in err and "first token" in err


def test_maskedkd_teacher_tokens_are_refused_for_recorded_targets(recorded, tmp_path):
    spec, _ = recorded
    masked = changed(spec, 1, objectives=[{"kind": "soft_label", "teacher_tokens": 0.5}])
    code, _, err = check(tmp_path, masked)
    assert code == 2, err
    assert "stages[1].objectives[0].teacher_tokens" in err and "runs no teacher" in err, err
    assert "Traceback" not in err


def test_int8_records_serve_feature_distillation_only(tmp_path, digits_shards, teacher_file):
    spec = job(tmp_path / "run", digits_shards / "train", teacher_file, record={"int8_features": True})
    spec["stages"][0]["objectives"] = [dict(FD_NORM)]
    spec_file = write_spec(tmp_path / "job.yaml", spec)
    record_in_process(spec_file)
    code, out, err = check_in_process(spec_file)
    assert code == 0, err
    assert "int8 + a per-token fp32 scale" in words(out)
    hidden = changed(spec, 1, student={"arch": TINY_VIT_ARCH, "kwargs": {**DIGITS_STUDENT, "embed_dim": 64},
                                       "dtype": "fp32"},
                     objectives=[{"kind": "hidden", "student_tap": "norm", "teacher_tap": "norm", "token": "first"}])
    code, _, err = check(tmp_path, hidden)
    assert code == 2 and "recorded in int8" in err and "only feature distillation reads" in err


def test_a_top_k_that_keeps_every_class_is_refused(tmp_path, digits_shards, teacher_file):
    spec = job(tmp_path / "run", digits_shards / "train", teacher_file, record={"top_k": 10})
    code, _, err = check(tmp_path, spec)
    assert code == 2 and "stages[0].record.top_k" in err and "every one of the 10 classes" in err


def test_plan_refuses_a_recording_larger_than_its_disk_and_says_how_to_shrink_it(tmp_path, digits_shards,
                                                                                 teacher_file):
    spec = job(tmp_path / "run", digits_shards / "train", teacher_file, record={"epochs": 10 ** 8, "dtype": "fp32"})
    spec["stages"][1]["teacher"]["allow_wrap"] = True
    code, _, err = check(tmp_path, spec, "--plan")
    assert code == 2
    paragraph = " ".join(err.split())
    assert "stages[0].record" in paragraph and "more than the" in paragraph and "free on the disk" in paragraph
    assert "fewer epochs" in paragraph and "int8 features" in paragraph and "record.dtype: fp16" in paragraph
    assert err.count("\n") <= 2, err  # one paragraph


def test_plan_shows_the_memory_saved_and_the_disk_the_targets_take(recorded, tmp_path):
    spec, spec_file = recorded
    code, out, err = check_in_process(spec_file, "--plan")
    assert code == 0, err
    flat = words(out)
    assert "no teacher engine: recorded targets of timm:vit_tiny_patch16_224" in flat
    assert "per rank (the teacher replicated" in flat and "the targets take" in flat
    recorded_bytes = json.loads((Path(spec["run_dir"]) / "record" / "targets" / "targets.json").read_text())["bytes"]
    planned = re.search(r"disk: ([\d.]+) MiB for 256 records", flat)
    assert planned, flat
    assert float(planned.group(1)) * 2 ** 20 == pytest.approx(recorded_bytes, rel=0.15)  # the estimate
