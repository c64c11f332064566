"""Teacher pruning: forward time and memory of a ViT-B/16 teacher engine (ZeRO-3, 1 rank,
fp32, random init) pruned to its tapped block (``blocks.8``, 9 of 12 blocks, as TinyMIM
taps an intermediate teacher block) against the same teacher kept whole (tapped at its
output). Both engines live in one process; forwards alternate; each forward's peak is
VmHWM (reset before it) minus RSS before it.

    python bench/bench_teacher_pruning.py [--pairs 6 --batch 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from measure_memory import random_teacher  # noqa: E402

TEACHER = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
STUDENT = dict(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import torch
    common.init_distributed()
    teachers, held, params = {}, {}, {}
    for name, tap in (("full", "norm"), ("pruned", "blocks.8")):
        work = Path(tempfile.mkdtemp(prefix=f"bench_prune_{name}_"))
        # The full teacher is tapped at its final norm: only the classifier head goes.
        job = common.fd_job(work, TEACHER, STUDENT, batch=args.batch, size=224, tap="norm",
                            teacher_tap=tap, teacher_weights=False)
        common.trim()
        before = common.rss()
        teachers[name], _ = random_teacher(job.stages[0])
        common.trim()
        held[name] = common.rss() - before
        params[name] = job.stages[0].models.teacher_params_kept
    images = next(common.fixed_batches(args.batch, 224))["image"]
    for teacher in teachers.values():
        teacher(images)  # warm-up
    seconds = {k: [] for k in teachers}
    peaks = {k: [] for k in teachers}
    for _ in range(args.pairs):
        for name, teacher in teachers.items():
            common.trim()
            common.reset_peak()
            before = common.rss()
            started = time.perf_counter()
            with torch.no_grad():
                teacher(images)
            seconds[name].append(time.perf_counter() - started)
            peaks[name].append(common.peak_rss() - before)
    MiB = 1024 ** 2
    ratios = [p / f for f, p in zip(seconds["full"], seconds["pruned"])]
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    rows = "\n".join(
        f"| {name} | {params[name] / 1e6:.1f} M | {held[name] / MiB:.0f} MiB | "
        f"{common.median(peaks[name]) / MiB:.0f} MiB | {fmt(seconds[name])} |" for name in teachers)
    ratio = common.median(ratios)
    body = (f"ViT-B/16 teacher engine, 224 px, batch {args.batch}, fp32, 1 rank, ZeRO-3, random "
            f"init; {args.pairs} alternating forwards after a warm-up.\n\n"
            f"| teacher | params kept | held after build | forward peak (median) | forward s |\n"
            f"|---|---|---|---|---|\n{rows}\n\n"
            f"Forward time pruned / full, per pair: {fmt(ratios)}; **median {ratio:.3f}** "
            f"(9 of 12 blocks: 0.75 expected).")
    print(body)
    if not args.no_record:
        common.record("Teacher pruning", body)
    common.remove_shm_buffers()
    print(f"ratio forward time pruned/full: {ratio:.3f}")


if __name__ == "__main__":
    main()
