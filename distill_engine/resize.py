"""Resuming at another world size (fewer or more ranks than the checkpoint was saved with).

A ZeRO-3 checkpoint holds one partition of the weights and optimizer state per rank;
DeepSpeed loads it only at the world size that wrote it. At another size we convert the
tag once to DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``:
one file per parameter and per optimizer state, whole) into ``<stage>/universal/TAG`` and
load that with ``load_universal_checkpoint`` switched on for the one call. Weights, Adam's
moments and step count, the learning-rate schedule and the step number carry over.

What cannot carry over is the sample order: each rank draws its own resampled stream, so
at another world size the ranks see other samples. The stream restarts at the same epoch,
at the batch that covers as many samples as had been consumed (``stream_state_after``).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("distill_engine")

DONE = "CONVERTED"  # written last by rank 0: the universal copy is whole (or why it is not)


def universal_copy(checkpoint_dir: Path, tag: str) -> Path:
    """Collective: the universal copy of ``checkpoint_dir/tag``, converted by rank 0 on
    first use. The other ranks wait on a file rather than a collective, whose timeout
    (deepspeed.timeout_s) a large conversion may outlast."""
    out = checkpoint_dir.parent / "universal" / tag
    done = out / DONE
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not done.is_file():
        started = time.perf_counter()
        log.info("converting checkpoint %s to a universal checkpoint in %s to resume at "
                 "another world size", checkpoint_dir / tag, out)
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        converted = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(checkpoint_dir / tag), "--output_folder", str(out),
             "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True)
        failure = (converted.stderr.strip().splitlines() or ["no message"])[-1]
        done.write_text("ok" if converted.returncode == 0 else f"failed: {failure}")
        log.info("converted in %.1f s", time.perf_counter() - started)
    while not done.is_file():
        time.sleep(0.5)
    if done.read_text() != "ok":
        from .checkpoints import CheckpointError
        raise CheckpointError(
            f"checkpoint {checkpoint_dir / tag} was saved at another world size and could not "
            f"be converted for this one ({done.read_text()}); resume at the world size it was "
            f"saved with", every_rank=True)
    return out


def load(engine, checkpoint_dir: Path, tag: str) -> dict[str, Any] | None:
    """Loads ``tag`` (saved at another world size) into ``engine``; returns the client state."""
    out = universal_copy(checkpoint_dir, tag)
    engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
    try:
        _, client_state = engine.load_checkpoint(str(out.parent), tag=out.name)
    finally:
        engine._config.load_universal_checkpoint = False
    # DeepSpeed 0.19.8's universal loader gives every parameter group's state one and the
    # same 'step' tensor; torch's AdamW increments it in place once per group, so Adam's
    # step (and its bias correction) would advance by the number of groups at every step
    # (seen: 3 -> 9 after 3 steps with 2 groups). One tensor per group.
    optimizer = getattr(engine.optimizer, "optimizer", None)
    for state in getattr(optimizer, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return client_state


def stream_state_after(state: dict[str, Any], saved_world: int, world: int,
                       micro_batch: int, batches_per_epoch: int) -> dict[str, Any]:
    """The stream position at ``world`` ranks that has consumed as many samples of the
    epoch as ``state`` had at ``saved_world`` (rounded down: a few samples seen twice
    rather than skipped). Per-worker positions past bad samples are not kept."""
    samples = int(state["batch"]) * micro_batch * saved_world
    batch = min(samples // (micro_batch * world), batches_per_epoch)
    return {**state, "batch": batch, "positions": None}
