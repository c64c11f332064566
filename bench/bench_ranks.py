"""Weak scaling, 2 ranks against 1: per-rank samples/s of the engine's FD step (ViT-B/16 ->
ViT-S/16, 112 px, fp32, placement ``auto``) with the same micro-batch per rank at 1 and at
2 ranks, each rank running one torch thread (OMP_NUM_THREADS=1), each world launched by
``deepspeed --num_gpus N``. With one thread per rank and as many cores as ranks, a rank's
compute is the same in both launches, so what the ratio loses below 1 is what the second
rank adds: the gradient all-reduce and partitioned optimizer step of the placement chosen
at 2 ranks, the loss and sample-count all-reduces, waiting for the slower rank, and the
two processes sharing memory bandwidth and caches. (The strong-scaling figure, one global
batch split over two processes of two threads each on two cores, measured the scheduler's
share of the cores rather than the engine.)

Launches cannot alternate step by step, so they alternate run by run (1, 2, 1, 2, ...),
and each figure is the median step time after 2 warm-up steps, the slower rank's per step.
Other jobs on the machine still take cores from either launch: run it on an idle machine,
and read the load average recorded beside it.

    python bench/bench_ranks.py [--rounds 2 --steps 6 --batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_engine_overhead import STUDENT, TEACHER  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per launch, after 2 warm-up")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per rank, in both worlds")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    jobs = {}
    for ranks in (1, 2):
        work = Path(tempfile.mkdtemp(prefix=f"bench_ranks_{ranks}_"))
        common.fd_job(work, {**TEACHER, "img_size": args.size}, {**STUDENT, "img_size": args.size},
                      batch=args.batch, size=args.size, dtype="fp32", world_size=ranks)
        jobs[ranks] = work / "job.yaml"
    medians = {1: [], 2: []}
    placements, threads = {}, {}
    for _ in range(args.rounds):
        for ranks in (1, 2):
            rows = common.measure_memory(jobs[ranks], ranks=ranks, steps=args.steps + 2,
                                         exact_memory=False,  # timings: glibc as users run it
                                         threads=args.threads)
            # A step ends when the slowest rank's does: the step time is the max over ranks.
            steps = [max(r["step_s"][i] for r in rows) for i in range(2, args.steps + 2)]
            medians[ranks].append(common.median(steps))
            placements[ranks] = rows[0]["placement"]
            threads[ranks] = sorted({r["threads"] for r in rows})
            print(f"{ranks} rank(s): median step {medians[ranks][-1]:.2f} s "
                  f"(load average {common.load_average()})", flush=True)
    one, two = common.median(medians[1]), common.median(medians[2])
    ratio = one / two  # per-rank samples/s at 2 ranks / at 1 rank, same per-rank batch
    body = (f"Weak scaling. FD step, ViT-B/16 -> ViT-S/16, {args.size} px, micro-batch "
            f"{args.batch} per rank in both worlds, fp32, placement auto (1 rank: "
            f"{', '.join(placements[1])}; 2 ranks: {', '.join(placements[2])}); torch threads "
            f"per rank {threads[1]} / {threads[2]}; {args.rounds} rounds of launches alternating "
            f"1 and 2 ranks, {args.steps} timed steps each after 2 warm-up steps.\n\n"
            f"| ranks | micro-batch per rank | median step (s), per launch | samples/s per rank |\n"
            f"|---|---|---|---|\n"
            f"| 1 | {args.batch} | {', '.join(f'{m:.2f}' for m in medians[1])} | "
            f"{args.batch / one:.2f} |\n"
            f"| 2 | {args.batch} | {', '.join(f'{m:.2f}' for m in medians[2])} | "
            f"{args.batch / two:.2f} |\n\n"
            f"**per-rank samples/s at 2 ranks / at 1 rank: {ratio:.3f}** (1.0: the second rank "
            f"costs nothing; what is missing is the engine's communication and synchronisation "
            f"plus the two processes' shared memory bandwidth on one machine).")
    print(body)
    if not args.no_record:
        common.record("2 ranks against 1 (weak scaling)", body)
    print(f"ratio per-rank samples/s 2 ranks / 1 rank (weak scaling): {ratio:.3f}")


if __name__ == "__main__":
    main()
