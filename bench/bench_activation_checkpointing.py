"""Activation checkpointing: the student engine's peak memory and step time with and
without it (timm's ``set_grad_checkpointing``, as ``student.grad_checkpointing`` turns on),
at a size where activations dominate: a ViT-S/16 student at 224 px, batch 16, fp32, 1 rank,
ZeRO-3, FD from a small teacher. Both engines live in one process and take steps in turn;
each step's peak is VmHWM (reset before the step) minus RSS before it.

    python bench/bench_activation_checkpointing.py [--pairs 4 --batch 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEACHER = dict(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3)
STUDENT = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from distill_engine.planning.placement import memory_report
    common.init_distributed()
    trainers, planned = {}, {}
    for name, checkpointing in (("off", False), ("on", True)):
        work = Path(tempfile.mkdtemp(prefix=f"bench_ckpt_{name}_"))
        job = common.fd_job(work, TEACHER, STUDENT, batch=args.batch, size=224,
                            checkpointing=checkpointing)
        trainers[name] = common.engine_trainer(job, job.stages[0],
                                               common.fixed_batches(args.batch, 224))
        planned[name] = {l.what: l.bytes for l in memory_report(job.stages[0], 1, None, False).lines}
        trainers[name].train_step()  # warm-up: optimizer states exist before measuring
    seconds = {"off": [], "on": []}
    peaks = {"off": [], "on": []}
    for _ in range(args.pairs):
        for name, trainer in trainers.items():
            common.trim()
            common.reset_peak()
            before = common.rss()
            started = time.perf_counter()
            trainer.train_step()
            seconds[name].append(time.perf_counter() - started)
            peaks[name].append(common.peak_rss() - before)
    GiB = common.GiB
    peak = {k: common.median(v) for k, v in peaks.items()}
    time_ratios = [on / off for off, on in zip(seconds["off"], seconds["on"])]
    memory_ratio = peak["on"] / peak["off"]
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    body = (f"Student ViT-S/16 (22 M params) at 224 px, batch {args.batch}, fp32, 1 rank, ZeRO-3, FD "
            f"from a 2-block ViT teacher; {args.pairs} alternating steps per setting after a "
            f"warm-up step. Step peak = VmHWM during the step minus RSS before it (the "
            f"activations and transient buffers; parameters and Adam states are already held).\n\n"
            f"| checkpointing | step peak (median) | planner: student activations | step times (s) |\n"
            f"|---|---|---|---|\n"
            f"| off | {peak['off'] / GiB:.2f} GiB | {planned['off']['student activations'] / GiB:.2f} GiB "
            f"| {fmt(seconds['off'])} |\n"
            f"| on | {peak['on'] / GiB:.2f} GiB | {planned['on']['student activations'] / GiB:.2f} GiB "
            f"| {fmt(seconds['on'])} |\n\n"
            f"Step peak with / without: **{memory_ratio:.3f}**. Step time with / without, per pair: "
            f"{fmt(time_ratios)}; **median {common.median(time_ratios):.3f}** (the recomputed "
            f"forward costs about a third of a step).")
    print(body)
    if not args.no_record:
        common.record("Activation checkpointing", body)
    common.remove_shm_buffers()
    print(f"ratio step time on/off: {common.median(time_ratios):.3f} "
          f"(peak memory on/off: {memory_ratio:.3f})")


if __name__ == "__main__":
    main()
