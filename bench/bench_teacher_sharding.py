"""Teacher sharding at steady state: peak resident memory per rank of a ZeRO-3 teacher
(built under ``zero.Init``, bf16, random init: no weights exist here, the working set sized
from the plan as the engine sizes it) at 1 and at 2 ranks, over several forwards (from the
second forward on ZeRO-3 prefetches along the recorded trace, so a first forward alone
understates the peak), against the planner's teacher figure; and, on 1 rank for the first
model, seconds per forward of the engine against the bare bf16 model, alternating. Each
rank measures its own peak RSS (VmHWM, reset after start-up) minus its RSS before building,
so the figures are what the teacher costs, not the Python and DeepSpeed start-up; glibc
runs with a fixed mmap threshold (``common.EXACT_MALLOC``), so that peak RSS follows the
live tensors rather than the allocator's retained blocks. On CUDA ranks (DS_ACCELERATOR=cuda,
as gpu_check.sh runs it) the peak is the CUDA allocator's instead, and ``--worlds 1,N``
measures N GPUs against one.

    python bench/bench_teacher_sharding.py [--models vit_large_patch16_224,...] [--forwards 3]
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


def measure(teacher: str, ranks: int, batch: int, forwards: int, compare_bare: bool) -> list[dict]:
    from distill_engine.planning.placement import memory_report
    student, tap = TEACHERS[teacher]
    work = Path(tempfile.mkdtemp(prefix=f"bench_shard_{teacher}_"))
    job = common.fd_job(work, {}, STUDENT_KWARGS.get(teacher, {}), batch=batch, size=224,
                        dtype="bf16", arch=f"timm:{teacher}", student_arch=f"timm:{student}",
                        tap=tap, teacher_weights=False, world_size=ranks,
                        teacher_config="ds_configs/teacher_zero3_inference.json")
    rows = common.measure_memory(work / "job.yaml", ranks=ranks, steps=forwards,
                                 teacher_only=True, random_teacher=True,
                                 compare_bare=compare_bare, timeout=900)
    memory = memory_report(job.stages[0], ranks)
    planned = {l.what: l.bytes for l in memory.lines}
    for row in rows:
        row["planned"] = planned["teacher shard"] + planned["teacher activations"]
        row["params"] = job.stages[0].models.teacher_params_kept
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="vit_large_patch16_224")
    parser.add_argument("--batch", type=int, default=1, help="images per rank per forward")
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--worlds", default="1,2", help="world sizes to measure")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    lines = ["| teacher | params (after pruning) | ranks | peak per rank after forward 1 / "
             "last | held per rank after build | planned (shard + activations) | planned / "
             "peak | seconds per forward (per rank) |", "|---|---|---|---|---|---|---|---|"]
    ratios, errors, timing = {}, [], None
    for teacher in args.models.split(","):
        peaks = {}
        for ranks in map(int, args.worlds.split(",")):
            compare = ranks == 1 and timing is None
            rows = measure(teacher, ranks, args.batch, args.forwards, compare)
            peaks[ranks] = max(r["peak"] for r in rows)
            if compare:
                timing = rows[0]["alternating"]
            seconds = ", ".join(f"{common.median(r['forward_s'][1:] or r['forward_s']):.2f}"
                                for r in rows)
            peak = ", ".join(f"{r['peak_after_forward'][0] / GiB:.2f} / {r['peak'] / GiB:.2f}"
                             for r in rows)
            held = ", ".join(f"{r['teacher_held'] / GiB:.2f}" for r in rows)
            error = rows[0]["planned"] / peaks[ranks]
            errors.append(error)
            lines.append(f"| {teacher} | {rows[0]['params'] / 1e9:.2f} B | {ranks} | {peak} GiB | "
                         f"{held} GiB | {rows[0]['planned'] / GiB:.2f} GiB | {error:.2f} | "
                         f"{seconds} |")
            print(lines[-1], flush=True)
        if 1 in peaks and len(peaks) > 1:
            ratios[teacher] = (max(peaks), peaks[max(peaks)] / peaks[1])
    body = ("ZeRO-3 teacher engine (ds_configs/teacher_zero3_inference.json, working set "
            "sized from the plan: 2 x the largest layer live, 1 layer prefetched), bf16, built "
            f"under `zero.Init` with random init, pruned to its FD tap, {args.batch} image(s) of "
            f"224 px per rank per forward, {args.forwards} forwards. Peak = "
            + ("the CUDA allocator's peak minus what it held "
               if common.on_cuda() else
               "VmHWM minus RSS (glibc with a fixed 64 KiB mmap threshold, so that RSS follows "
               "live tensors) ") +
            "before building, per rank, after the first and after the last forward; seconds "
            "= median forward after the first.\n\n" + "\n".join(lines))
    body += "\n\n" + "\n".join(f"- **{t}: peak per rank at {n} ranks / at 1 rank = {r:.3f}** "
                                  "(goal <= 0.6 at 2 ranks)" for t, (n, r) in ratios.items())
    body += (f"\n- planned / measured peak: {', '.join(f'{e:.2f}' for e in errors)} "
             "(goal within 0.75-1.25)")
    if timing:
        engine, bare = common.median(timing["engine"]), common.median(timing["bare"])
        body += (f"\n- 1 rank, {args.models.split(',')[0]}: engine forward {engine:.2f} s vs bare "
                 f"bf16 forward {bare:.2f} s, alternating x{len(timing['bare'])}: **bare / "
                 f"engine = {bare / engine:.2f}** (a teacher that fits is replicated by auto "
                 "placement and runs bare)")
    print(body)
    if not args.no_record:
        common.record("Teacher sharding", body)
    for first, (ranks, ratio) in list(ratios.items())[:1]:
        print(f"ratio peak per rank {ranks} ranks / 1 rank ({first}): {ratio:.3f}")


if __name__ == "__main__":
    main()
