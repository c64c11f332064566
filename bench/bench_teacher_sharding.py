"""Teacher sharding: peak resident memory per rank of a ZeRO-3 teacher (built under
``zero.Init``, bf16, random init: no weights exist here) at world size 1 against 2, and the
giant teachers (SwinV2-G 2.6 B, ViT-g 1.0 B, ViT-L 0.3 B) across 2 CPU ranks: built, one
forward on a small batch, peak memory per rank and time per forward. Each rank measures its
own peak RSS (VmHWM, reset after start-up) minus its RSS before building, so the figures
are what the teacher costs, not the Python and DeepSpeed start-up.

    python bench/bench_teacher_sharding.py [--models vit_large_patch16_224,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GiB = common.GiB
# teacher -> (student that yields the same token grid at the tap, tap)
TEACHERS = {
    "vit_large_patch16_224": ("vit_tiny_patch16_224", "norm"),
    "vit_giant_patch14_224": ("vit_tiny_patch16_224", "norm"),
    "swinv2_cr_giant_224": ("swinv2_cr_tiny_224", "stages.3.blocks.1"),
}
STUDENT_KWARGS = {"vit_giant_patch14_224": {"patch_size": 14}}


def measure(teacher: str, ranks: int, batch: int, forwards: int) -> list[dict]:
    from distill_engine.memory_plan import plan_stage
    student, tap = TEACHERS[teacher]
    work = Path(tempfile.mkdtemp(prefix=f"bench_shard_{teacher}_"))
    job = common.fd_job(work, {}, STUDENT_KWARGS.get(teacher, {}), batch=batch, size=224,
                        dtype="bf16", arch=f"timm:{teacher}", student_arch=f"timm:{student}",
                        tap=tap, teacher_weights=False, world_size=ranks)
    rows = common.measure_memory(work / "job.yaml", ranks=ranks, steps=forwards,
                                 teacher_only=True, random_teacher=True, timeout=900)
    memory = plan_stage(job.stages[0], ranks)
    planned = {l.what: l.bytes for l in memory.lines}
    for row in rows:
        row["planned"] = planned["teacher shard"] + planned["teacher activations"]
        row["params"] = job.stages[0].models.teacher_params_kept
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(TEACHERS))
    parser.add_argument("--batch", type=int, default=1, help="images per rank per forward")
    parser.add_argument("--forwards", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    lines = ["| teacher | params (after pruning) | ranks | peak per rank | held per rank after "
             "build | planned (shard + activations) | seconds per forward (per rank) |",
             "|---|---|---|---|---|---|---|"]
    halving = None
    for teacher in args.models.split(","):
        worlds = (1, 2) if teacher == "vit_large_patch16_224" else (2,)
        peaks = {}
        for ranks in worlds:
            rows = measure(teacher, ranks, args.batch, args.forwards)
            peaks[ranks] = max(r["peak"] for r in rows)
            seconds = ", ".join(f"{min(r['forward_s']):.1f}" for r in rows)
            peak = ", ".join(f"{r['peak'] / GiB:.2f}" for r in rows)
            held = ", ".join(f"{r['teacher_held'] / GiB:.2f}" for r in rows)
            lines.append(f"| {teacher} | {rows[0]['params'] / 1e9:.2f} B | {ranks} | {peak} GiB | "
                         f"{held} GiB | {rows[0]['planned'] / GiB:.2f} GiB | {seconds} |")
            print(lines[-1], flush=True)
        if len(peaks) == 2:
            halving = peaks[2] / peaks[1]
    body = (f"ZeRO-3 teacher engine (ds_configs/teacher_zero3_inference.json), bf16, built under "
            f"`zero.Init` with random init, pruned to its FD tap, {args.batch} image(s) of 224 px "
            f"per rank per forward, best of {args.forwards} forwards. Peak = VmHWM minus RSS "
            f"before building, per rank.\n\n" + "\n".join(lines))
    if halving is not None:
        body += (f"\n\n**ViT-L teacher: peak per rank at 2 ranks / at 1 rank = {halving:.3f}** "
                 f"(goal: close to 0.5)")
    print(body)
    if not args.no_record:
        common.record("Teacher sharding", body)
    if halving is not None:
        print(f"ratio peak per rank 2 ranks / 1 rank (ViT-L): {halving:.3f}")


if __name__ == "__main__":
    main()
