"""Model FLOPs utilisation: the FLOP/s a distillation step achieves (FLOPs counted by
``torch.utils.flop_counter`` on the identical bare step: teacher forward, student forward
and backward, objective) against this machine's fp32 matmul throughput (a 2048 x 2048
``torch.mm``), measured in the same run, alternating bursts: MFU = step FLOP/s / matmul
FLOP/s. Same FD job as bench_engine_overhead (ViT-B/16 -> ViT-S/16, 112 px, batch 16, fp32,
1 rank, ZeRO-3).

    python bench/bench_mfu.py [--pairs 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_engine_overhead import STUDENT, TEACHER, bare_step_fn  # noqa: E402


def matmul_flops_per_s(size: int = 2048, repeats: int = 8) -> float:
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    common.init_distributed()
    work = Path(tempfile.mkdtemp(prefix="bench_mfu_"))
    job = common.fd_job(work, {**TEACHER, "img_size": args.size}, {**STUDENT, "img_size": args.size},
                        batch=args.batch, size=args.size)
    plan = job.stages[0]
    batches = common.fixed_batches(args.batch, args.size)
    engine = common.engine_trainer(job, plan, batches)
    bare = bare_step_fn(plan, next(batches)["image"])
    with FlopCounterMode(display=False) as counter:
        bare()
    step_flops = counter.get_total_flops()
    engine.train_step()  # warm-up
    utilisation, peaks, achieved = [], [], []
    for _ in range(args.pairs):
        peak = matmul_flops_per_s()
        started = time.perf_counter()
        engine.train_step()
        rate = step_flops / (time.perf_counter() - started)
        peaks.append(peak)
        achieved.append(rate)
        utilisation.append(rate / peak)
    mfu = common.median(utilisation)
    fmt = lambda values: ", ".join(f"{v / 1e9:.1f}" for v in values)  # noqa: E731
    body = (f"FD step of the engine (ViT-B/16 teacher -> ViT-S/16 student, {args.size} px, batch "
            f"{args.batch}, fp32, 1 rank, ZeRO-3, torch threads {torch.get_num_threads()}): "
            f"{step_flops / 1e9:.1f} GFLOP per step (teacher forward + student forward and backward "
            f"+ objective; optimizer not counted). Alternating: a 2048^2 fp32 matmul burst, then "
            f"one engine step; {args.pairs} pairs.\n\n"
            f"| | GFLOP/s per pair |\n|---|---|\n| matmul (machine) | {fmt(peaks)} |\n"
            f"| distillation step | {fmt(achieved)} |\n\n"
            f"Per-pair MFU: {', '.join(f'{u:.3f}' for u in utilisation)}. "
            f"**Median MFU (step FLOP/s / matmul FLOP/s): {mfu:.3f}**")
    print(body)
    if not args.no_record:
        common.record("Model FLOPs utilisation", body)
    common.remove_shm_buffers()
    print(f"ratio step FLOP/s / matmul FLOP/s (MFU): {mfu:.3f}")


if __name__ == "__main__":
    main()
