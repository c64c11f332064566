"""training.step_timing: the parts of a step the trainer marks, and the model FLOPs that
MFU is counted from (on the meta-device models of the plan)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_masked_kd import _spec  # noqa: E402

from distill_engine.planning.load import load_plan
from distill_engine.training.step_timing import StepTiming, model_flops_per_sample
from helpers import TINY_VIT


def test_each_part_gets_the_time_between_its_marks_and_a_step_left_out_leaves_nothing():
    timing = StepTiming(torch.device("cpu"))
    for _ in range(2):
        timing.begin_step()
        for _micro in range(2):  # gradient accumulation: the parts of both micro-batches add up
            timing.mark()
            for part in ("teacher", "student", "optimizer"):
                torch.ones(64, 64) @ torch.ones(64, 64)
                timing.mark(part)
        timing.end_step()
    seconds = timing.take()
    assert set(seconds) == {"teacher_s", "student_s", "optimizer_s"}
    assert all(value > 0 for value in seconds.values())
    assert timing.take() == dict.fromkeys(seconds, 0.0)  # each step is counted once
    timing.begin_step()
    timing.mark()
    timing.mark("teacher")  # ... and the loss was not finite: no end_step
    timing.begin_step()
    timing.end_step()
    assert timing.take() == dict.fromkeys(seconds, 0.0)


def test_flops_are_counted_on_the_traced_models_and_masked_kd_halves_the_teachers(tmp_path):
    flops = {}
    for tokens in (1.0, 0.5):
        (tmp_path / str(tokens)).mkdir()
        job = load_plan(_spec(tmp_path / str(tokens), "timm:vit_tiny_patch16_224", TINY_VIT, tokens),
                        world_size=1)
        flops[tokens] = model_flops_per_sample(job.stages[0])
    full, half = flops[1.0], flops[0.5]
    # The student (same model as the teacher here) counts forward and backward: 3 forwards.
    assert full["student"] == 3 * full["teacher"] > 0
    assert half["student"] == full["student"]
    # 9 of 17 tokens: a little over half the teacher's FLOPs (attention is quadratic).
    assert 0.45 < half["teacher"] / full["teacher"] < 0.6


def test_the_peak_probe_leaves_the_global_generator_alone():
    # Drop path & co. draw from the global generator, seeded per stage and rank: a probe
    # that drew from it would change what rank 0 learns.
    from distill_engine.training.step_timing import matmul_peak_flops
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    assert matmul_peak_flops(torch.device("cpu"), torch.float32) > 0
    assert torch.equal(torch.rand(4), expected)
