"""Every student config that ds_configs/ ships, and auto placement, train a tiny digits FD
job on 2 real CPU ranks, checkpoint and resume; and a placement changes where the states
live, not what is learnt (the same losses under each).

One spec holds one stage per placement (so that one launch builds them all); the first
launch stops the first stage half-way, the second resumes it and runs the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import FD_NORM, ROOT, digits_student, digits_teacher, run_deepspeed, write_spec

pytestmark = pytest.mark.distributed

STEPS = 4
STUDENT_CONFIGS = sorted((ROOT / "ds_configs").glob("student_*.json"))
TEACHER_SHARDED = str(ROOT / "ds_configs" / "teacher_zero3_inference.json")


def stage_name(config: Path) -> str:
    return config.stem.removeprefix("student_")


@pytest.fixture(scope="module")
def placements_run(tmp_path_factory, digits_shards, teacher_file) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("placements")
    teacher, student, fd = digits_teacher(teacher_file), digits_student(), [FD_NORM]
    # Explicit configs with the sharded teacher; auto (a replicated teacher, ZeRO-1 at 2
    # ranks on this machine) last.
    stages = [{"name": stage_name(c), "teacher": teacher, "student": student, "objectives": fd,
               "deepspeed": {"student_config": str(c), "teacher_config": TEACHER_SHARDED}}
              for c in STUDENT_CONFIGS]
    stages.append({"name": "auto", "teacher": teacher, "student": student, "objectives": fd})
    spec = {
        "name": "placements", "run_dir": str(work / "run"), "seed": 3,
        "data": {"train": str(digits_shards / "train"), "micro_batch_size": 16, "num_workers": 0,
                 "views": {"geometry": {"size": 24}}},
        "optimisation": {"lr": 3e-3, "warmup_steps": 1, "steps": STEPS, "grad_clip": 3.0},
        "checkpointing": {"every_steps": 2, "keep": 2},
        "logging": {"every_steps": 1, "plot": False},
        "stages": stages,
    }
    spec_file = write_spec(work / "job.yaml", spec)
    first = run_deepspeed(spec_file, "--stop-after", str(STEPS // 2))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_deepspeed(spec_file)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return work / "run", second.stdout + second.stderr


def losses(stage_dir: Path) -> list[float]:
    records = [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    return [r["loss"] for r in records]


def test_every_shipped_student_config_and_auto_trains_to_an_export(placements_run):
    run, _ = placements_run
    assert len(STUDENT_CONFIGS) >= 4  # ZeRO-0, 1, 2, 3 and 3 + offload
    for name in [stage_name(c) for c in STUDENT_CONFIGS] + ["auto"]:
        summary = json.loads((run / name / "export" / "metrics.json").read_text())
        assert summary["steps"] == STEPS, (name, summary)
        assert (run / name / "export" / "model.safetensors").is_file(), name


def test_auto_placement_replicates_the_small_teacher_and_says_why(placements_run):
    run, output = placements_run
    assert "auto: teacher: replicated: its timm:vit_tiny_patch16_224 fits whole" in output, output
    assert "auto: student: ZeRO-1" in output
    # A replicated teacher is not sharded: every rank holds all of it.
    shards = json.loads((run / "auto" / "teacher_shards.json").read_text())
    assert shards["held_per_rank"] == [shards["total"]] * 2, shards
    shards = json.loads((run / "zero3" / "teacher_shards.json").read_text())
    assert sum(shards["held_per_rank"]) == shards["total"] > max(shards["held_per_rank"])


def test_a_stage_stopped_half_way_resumed_from_its_checkpoint(placements_run):
    _, output = placements_run
    first = stage_name(STUDENT_CONFIGS[0])
    assert f"{first}: resumed from step{STEPS // 2:08d}" in output, output


def test_every_placement_learns_the_same_thing(placements_run):
    """Same seed, data and initial weights: where the states live changes nothing but the
    order of floating-point sums (the first stage was also stopped and resumed). ZeRO-3
    included: its student is built whole, with timm's own initialisation, and partitioned
    afterwards (built under zero.Init it would start from other weights)."""
    run, _ = placements_run
    reference = losses(run / "auto")
    for config in STUDENT_CONFIGS:
        got = losses(run / stage_name(config))
        assert got == pytest.approx(reference, rel=1e-4), (config.name, got, reference)


def test_auto_placement_shards_what_does_not_fit_and_a_named_config_wins():
    """The paper-scale FD recipe (ViT-L teacher and student, bf16, 8 GPUs), planned against
    devices of several sizes: the cheapest placement that fits, leaner as memory shrinks."""
    from distill_engine.planning.load import load_plan
    from distill_engine.planning.placement import place
    gib = 2 ** 30
    job = load_plan(ROOT / "jobs" / "fd_vitl.yaml", world_size=8, missing_inputs_ok=True)
    # (The recipe distils CLIP ViT-L/14 into a ViT-L/14: 257 tokens, 18.8 GiB at ZeRO-1.)
    chosen = {size: place(job.stages[0], 8, size * gib) for size in (80, 20, 4)}
    assert (chosen[80].teacher.name, chosen[80].student.name) == ("replicated", "ZeRO-1")
    assert (chosen[20].teacher.name, chosen[20].student.name) == ("replicated", "ZeRO-3")
    assert chosen[4].teacher.name == "ZeRO-3 sharded"
    assert chosen[4].student.name == "ZeRO-3 + optimizer offload"
    assert "nothing fits" in chosen[4].student.why
    assert chosen[80].memory.total < 0.9 * 80 * gib
    # A sharded teacher gathers at most two of its largest layers (ViT-L: fc1 with its bias).
    assert chosen[4].teacher.defaults["stage3_max_live_parameters"] == 2 * (1024 * 4096 + 4096)
    # The memory each choice was judged by is the memory --plan prints for it.
    named = load_plan(ROOT / "jobs" / "fd_vitl.yaml",
                      [f"stages.0.deepspeed.student_config={STUDENT_CONFIGS[0]}"],
                      world_size=8, missing_inputs_ok=True)
    explicit = place(named.stages[0], 8, 4 * gib)
    assert explicit.student.config == STUDENT_CONFIGS[0]
    assert explicit.student.why == "deepspeed.student_config names it"
