"""2 ranks against 1 on the same global batch: samples/s of the engine's FD step
(ViT-B/16 -> ViT-S/16, 112 px, global batch 16, fp32, placement ``auto``) with 1 rank of
micro-batch 16 and with 2 ranks of micro-batch 8, each launched by ``deepspeed --num_gpus N``.
Launches cannot alternate step by step, so they alternate run by run (1, 2, 1, 2, ...), and
each figure is the median step time after 2 warm-up steps.

On this machine the 2 "ranks" are 2 processes on the same 2 CPU cores: the ratio says what
splitting the batch costs here (communication through gloo / shared memory, two processes
of two threads each on two cores, the launcher binding no cores), not what a second GPU or
node would give. Run it on an idle machine: Linux shares CPU time per thread, so under load
the 2-rank launch draws a larger share and the ratio measures the scheduler.

    python bench/bench_ranks.py [--rounds 2 --steps 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_engine_overhead import STUDENT, TEACHER  # noqa: E402

GLOBAL_BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per launch, after 2 warm-up")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    jobs = {}
    for ranks in (1, 2):
        work = Path(tempfile.mkdtemp(prefix=f"bench_ranks_{ranks}_"))
        common.fd_job(work, {**TEACHER, "img_size": args.size}, {**STUDENT, "img_size": args.size},
                      batch=GLOBAL_BATCH // ranks, size=args.size, dtype="fp32", world_size=ranks)
        jobs[ranks] = work / "job.yaml"
    medians = {1: [], 2: []}
    placements = {}
    for _ in range(args.rounds):
        for ranks in (1, 2):
            rows = common.measure_memory(jobs[ranks], ranks=ranks, steps=args.steps + 2,
                                         exact_memory=False)  # timings: glibc as users run it
            # A step ends when the slowest rank's does: the step time is the max over ranks.
            steps = [max(r["step_s"][i] for r in rows) for i in range(2, args.steps + 2)]
            medians[ranks].append(common.median(steps))
            placements[ranks] = rows[0]["placement"]
            print(f"{ranks} rank(s): median step {medians[ranks][-1]:.2f} s", flush=True)
    one, two = common.median(medians[1]), common.median(medians[2])
    ratio = one / two  # samples/s at 2 ranks / at 1 rank, same global batch
    body = (f"FD step, ViT-B/16 -> ViT-S/16, {args.size} px, global batch {GLOBAL_BATCH}, fp32, "
            f"placement auto (1 rank: {', '.join(placements[1])}; 2 ranks: "
            f"{', '.join(placements[2])}); {args.rounds} rounds of launches alternating 1 and 2 "
            f"ranks, {args.steps} timed steps each. The machine was shared.\n\n"
            f"| ranks | micro-batch | median step (s), per launch | samples/s |\n|---|---|---|---|\n"
            f"| 1 | {GLOBAL_BATCH} | {', '.join(f'{m:.2f}' for m in medians[1])} | "
            f"{GLOBAL_BATCH / one:.2f} |\n"
            f"| 2 | {GLOBAL_BATCH // 2} | {', '.join(f'{m:.2f}' for m in medians[2])} | "
            f"{GLOBAL_BATCH / two:.2f} |\n\n"
            f"**samples/s at 2 ranks / at 1 rank: {ratio:.3f}**. Both ranks share the same 2 "
            f"cores, so this is the cost of splitting one batch across processes here (half "
            f"batches, two processes of two torch threads each on two cores, the gradient "
            f"all-reduce), not the speed-up a second GPU or node gives; that needs real devices. "
            f"On a machine shared with other jobs it measures the scheduler's share instead.")
    print(body)
    if not args.no_record:
        common.record("2 ranks against 1", body)
    print(f"ratio samples/s 2 ranks / 1 rank: {ratio:.3f}")


if __name__ == "__main__":
    main()
