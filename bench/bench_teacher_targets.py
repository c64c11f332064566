"""The teacher's cost gone: the FD step with the live teacher, with recorded targets, and the
student alone, side by side in one run; and reading targets against decoding images.

ViT-B/16 teacher (pruned at ``norm``) -> ViT-S/16 student, 112 px (50 tokens), batch 16,
fp32, 1 rank, placement auto, the real engines (``StageTrainer.train_step``), each side fed
by its real stream in this process (``num_workers: 0``, so data costs are not hidden behind
loader workers):

- live: the image stream (decode, crop, flip, normalise) -> teacher -> student;
- targets: the replay stream (decode and view of the student's image, read and join its
  record) -> student; the records were written once, before, by the recording stage
  (``RecordingStage``, fp16) from the same teacher on the same stream;
- student alone: the image stream -> student, with FD against a fixed tensor of the
  teacher's tap shape: the same loss shapes, no teacher and no records.

Steps alternate (live, targets, alone, live, ...) because this shared machine's speed
drifts within seconds; a ratio is the median of the per-round ratios of step times. Then
the data path alone, alternating too: a batch from the image stream (read + decode + views)
against a batch of records (read + parse + stack).

    python bench/bench_teacher_targets.py [--rounds 8 --images 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEACHER = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000)
STUDENT = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000)
ARCH = "timm:vit_base_patch16_224"


def make_images(root: Path, count: int) -> None:
    """Smooth random colour fields at 320x256 as JPEG (quality 90), as bench_stream.py."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 256), Image.Resampling.BICUBIC).save(root / f"img{i:05d}.jpg", quality=90)


def write_job(work: Path, size: int, batch: int) -> Path:
    import timm
    import torch
    import yaml
    from safetensors.torch import save_file
    weights = work / "teacher.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_base_patch16_224", img_size=size,
                                                               **TEACHER).state_dict().items()}, str(weights))
    teacher = {"arch": ARCH, "kwargs": {**TEACHER, "img_size": size}, "weights": str(weights), "dtype": "fp32"}
    student = {"arch": ARCH, "kwargs": {**STUDENT, "img_size": size}, "dtype": "fp32"}
    fd = [{"kind": "feature", "student_tap": "norm", "teacher_tap": "norm"}]
    spec = {"name": "bench", "run_dir": str(work / "run"), "seed": 0,
            "data": {"train": str(work / "shards"), "micro_batch_size": batch, "num_workers": 0,
                     "views": {"geometry": {"size": size, "hflip": 0.5}}},
            "optimisation": {"lr": 1e-4, "steps": 1000, "warmup_steps": 10, "grad_clip": 3.0},
            "logging": {"plot": False},
            "stages": [{"name": "record", "teacher": teacher, "record": {"epochs": 1, "dtype": "fp16"},
                        "objectives": fd},
                       {"name": "targets", "teacher": {"targets": "stage:record", "allow_wrap": True},
                        "student": student, "objectives": fd},
                       {"name": "live", "teacher": teacher, "student": student, "objectives": fd}]}
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds of steps")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import itertools

    import torch

    from data_shards import ShardStream, pack
    from data_shards.targets import TargetsIndex, decode_batch, read_records
    from distill_engine.planning.load import load_plan
    from distill_engine.training.recording import RecordingStage
    common.init_distributed()
    work = Path(tempfile.mkdtemp(prefix="bench_targets_"))
    make_images(work / "images", args.images)
    pack(str(work / "images"), work / "shards", workers=1, progress=False)
    job_file = write_job(work, args.size, args.batch)
    load_before = os.getloadavg()[0]
    job = load_plan(job_file)
    record_plan, targets_plan, live_plan = job.stages
    started = time.perf_counter()
    RecordingStage(job, record_plan).record()
    record_seconds = time.perf_counter() - started
    index = TargetsIndex.load(record_plan.targets_dir)

    def image_stream(plan):
        data = plan.spec.data
        return ShardStream(data.train, batch_size=data.micro_batch_size, rank=0, world_size=1, num_workers=0,
                           seed=job.spec.seed + data.seed, views=data.views)

    live = common.engine_trainer(job, live_plan, iter(image_stream(live_plan)))
    targets = common.engine_trainer(job, targets_plan, None)
    targets.batches = iter(targets.open_stream())  # the replay stream the stage itself opens
    constant = {"norm": torch.randn(args.batch, *index.tap("norm").shape).half()}
    alone = common.engine_trainer(job, targets_plan, ({**b, "targets": constant} for b in image_stream(targets_plan)))
    sides = {"live teacher": live.train_step, "recorded targets": targets.train_step, "student alone": alone.train_step}
    for step in sides.values():  # warm-up: allocator, optimizer state, caches
        step()
        step()
    seconds = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, step in sides.items():
            begun = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - begun)

    def ratio(a: str, b: str) -> float:
        return common.median([x / y for x, y in zip(seconds[b], seconds[a])])  # a samples/s over b's

    # The data path alone: a batch of decoded views against a batch of records.
    decoding = iter(image_stream(live_plan))
    store = [index.tap("norm")]
    shards = index.shards_of(0, 0, 0)
    records = read_records(index.directory, shards)  # front to back, as a replaying worker reads
    decode_s, read_s = [], []
    for _ in range(args.rounds):
        begun = time.perf_counter()
        next(decoding)
        decode_s.append(time.perf_counter() - begun)
        begun = time.perf_counter()
        batch = list(itertools.islice(records, args.batch))
        if len(batch) < args.batch:  # the recording's end: from its start again
            records = read_records(index.directory, shards)
            batch = list(itertools.islice(records, args.batch))
        decode_batch([r.tensors for r in batch], store)
        read_s.append(time.perf_counter() - begun)
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    rate = {name: args.batch / common.median(values) for name, values in seconds.items()}
    rows = "\n".join(f"| {name} | {rate[name]:.2f} | {fmt(seconds[name])} |" for name in sides)
    per_record = index.raw.bytes / index.raw.samples
    body = (f"FD step, ViT-B/16 teacher (pruned at `norm`) -> ViT-S/16 student, {args.size} px, batch "
            f"{args.batch}, fp32, 1 rank, placement auto ({live.plan.placement.teacher.name} teacher, "
            f"{live.plan.placement.student.name} student); each side fed by its own stream in the "
            f"process (num_workers 0: image decoding and record reading are in the step times); "
            f"torch threads {torch.get_num_threads()}; {args.rounds} alternating rounds after 2 warm-up "
            f"steps each. Records: fp16 `norm` tokens [50, 768] of {args.images} JPEG images (320x256), "
            f"{per_record / 1e3:.1f} kB per record, recorded once in {record_seconds:.0f} s "
            f"(1 epoch). Load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n\n"
            f"| | median samples/s | step times (s) |\n|---|---|---|\n{rows}\n\n"
            f"- **targets / live samples/s: {ratio('recorded targets', 'live teacher'):.3f}**\n"
            f"- **targets / student-only samples/s: {ratio('recorded targets', 'student alone'):.3f}** "
            f"(goal >= 0.9: the teacher's cost gone)\n"
            f"- data per batch of {args.batch}: decoding images (read, decode, crop, flip, normalise) "
            f"{common.median(decode_s) * 1e3:.1f} ms, reading targets (read, parse, stack) "
            f"{common.median(read_s) * 1e3:.1f} ms: **reading / decoding time "
            f"{common.median([r / d for r, d in zip(read_s, decode_s)]):.3f}** (goal <= 1)")
    print(body)
    if not args.no_record:
        common.record("Recorded teacher targets", body)
    common.remove_shm_buffers()
    print(f"ratios targets/live {ratio('recorded targets', 'live teacher'):.3f}, targets/student-only "
          f"{ratio('recorded targets', 'student alone'):.3f}, reading/decoding "
          f"{common.median([r / d for r, d in zip(read_s, decode_s)]):.3f}")


if __name__ == "__main__":
    main()
