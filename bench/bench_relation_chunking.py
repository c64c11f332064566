"""Peak memory and time of the TinyMIM relation loss, forward + backward, chunked vs unchunked.

Setting: 785 tokens (448 px / patch 16 = 28 x 28 patches + CLS), a ViT-B-like teacher qkv
(768 wide, 12 heads) and a ViT-S-like student qkv (384 wide, 6 heads, regrouped into the
teacher's 12 heads of 32), both the Q-K and the V-V relation.

Memory, two measures, each variant in a fresh subprocess:
- tensor peak: the most bytes held by live torch tensors during one forward + backward, from
  the CPU allocation/free events of torch.profiler(profile_memory=True) summed in time order.
  Allocator-independent; the CPU counterpart of torch.cuda.max_memory_allocated.
- process peak: ru_maxrss (high-water mark of resident memory) after the timed repeats minus
  ru_maxrss just before them (torch imported, inputs built, both code paths warmed up). This
  is what a CPU box runs out of, but glibc malloc keeps freed blocks, so it is noisier.
torch has no CPU allocator statistics, and tracemalloc does not see torch's allocations.

    python bench/bench_relation_chunking.py --batch 8 --chunk-rows 128 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TOKENS, TEACHER_WIDTH, STUDENT_WIDTH, HEADS = 785, 768, 384, 12


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(batch: int, chunk_rows: int | None, repeats: int, threads: int) -> dict:
    """Runs in the worker process: one variant, forward + backward ``repeats`` times."""
    import torch

    from distill_engine.objectives.relation import tinymim_relation_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # Warm up both code paths on a tiny input so that one-off costs (thread pools, kernel
    # libraries, lazy imports) land in the baseline, not in the variant's peak or time.
    for rows in (None, 4):
        tiny = torch.randn(1, 16, 3 * 48, requires_grad=True)
        tinymim_relation_loss(tiny.chunk(3, -1), tiny.chunk(3, -1), heads=HEADS,
                              chunk_rows=rows).backward()
    student_qkv = torch.randn(batch, TOKENS, 3 * STUDENT_WIDTH, requires_grad=True)
    teacher_qkv = torch.randn(batch, TOKENS, 3 * TEACHER_WIDTH)
    rss_before = max_rss_mib()

    def forward_backward():
        student_qkv.grad = None
        loss = tinymim_relation_loss(student_qkv.chunk(3, -1), teacher_qkv.chunk(3, -1),
                                     heads=HEADS, chunk_rows=chunk_rows)
        loss.backward()
        return loss

    # Wall time, and this process's CPU time (all threads), which other load on a shared
    # machine disturbs less.
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = forward_backward()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    process_peak = max_rss_mib() - rss_before

    # Last, so that the profiler's own memory does not count in the process peak.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profiler:
        forward_backward()
    events = sorted((e for e in profiler.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live_bytes = itertools.accumulate(e.nbytes() for e in events)  # + alloc, - free
    return {"chunk_rows": chunk_rows, "loss": loss.item(),
            "grad_norm": student_qkv.grad.norm().item(),
            "tensor_peak_mib": max(live_bytes) / 2**20, "process_peak_mib": process_peak,
            "baseline_mib": rss_before,
            "median_s": statistics.median(seconds), "min_s": min(seconds),
            "median_cpu_s": statistics.median(cpu_seconds)}


def run_in_fresh_process(args, chunk_rows: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--chunk-rows", str(chunk_rows or 0)]
    return json.loads(subprocess.run(command, check=True, capture_output=True,
                                     text=True).stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=[128, 32],
                        help="chunked variants to compare against unchunked (0 = unchunked)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.batch, args.chunk_rows[0] or None, args.repeats,
                                 args.threads)))
        return

    print(f"relation loss fwd+bwd: batch {args.batch}, {TOKENS} tokens, teacher "
          f"{TEACHER_WIDTH}/{HEADS} heads, student {STUDENT_WIDTH} regrouped into {HEADS} heads, "
          f"QK + VV, float32, {args.threads} threads, {args.repeats} repeats per variant")
    relation_mib = args.batch * HEADS * TOKENS * TOKENS * 4 / 2**20
    print(f"one [B, h, N, N] float32 relation = {relation_mib:.0f} MiB")
    results = [run_in_fresh_process(args, None)]
    results += [run_in_fresh_process(args, rows) for rows in args.chunk_rows]

    print("\n| variant | tensor peak (MiB) | process peak over inputs (MiB) | median wall (s) "
          "| min wall (s) | median CPU (s) | loss | grad norm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        name = "unchunked" if r["chunk_rows"] is None else f"chunk_rows={r['chunk_rows']}"
        print(f"| {name} | {r['tensor_peak_mib']:.0f} | {r['process_peak_mib']:.0f} | "
              f"{r['median_s']:.2f} | {r['min_s']:.2f} | {r['median_cpu_s']:.2f} | "
              f"{r['loss']:.6f} | {r['grad_norm']:.6e} |")
    print(f"(process baseline ru_maxrss before the loss: {results[0]['baseline_mib']:.0f} MiB)")

    unchunked = results[0]
    print()
    for r in results[1:]:
        print(f"chunk_rows={r['chunk_rows']} vs unchunked: tensor peak "
              f"x{r['tensor_peak_mib'] / unchunked['tensor_peak_mib']:.3f}, process peak "
              f"x{r['process_peak_mib'] / unchunked['process_peak_mib']:.3f}, median wall "
              f"x{r['median_s'] / unchunked['median_s']:.2f}, median CPU "
              f"x{r['median_cpu_s'] / unchunked['median_cpu_s']:.2f}")


if __name__ == "__main__":
    main()
