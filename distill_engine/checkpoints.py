"""Checkpoints that survive being killed half-way.

DeepSpeed writes one directory per tag (every rank writes its own shard); we add each
rank's RNG state beside it and, only after every rank has finished, a ``COMPLETE`` marker
written atomically by rank 0. Resume takes the newest tag that has the marker, so a
checkpoint cut off mid-write is never taken for the newest. The last ``keep`` complete
checkpoints are kept; older ones are deleted only after a newer one is complete.

A save that fails (disk full, a dead rank) raises ``CheckpointError`` and leaves the
previous complete checkpoint as it was. Weights that are not finite are never saved.
DeepSpeed's own ``latest`` file is not written: resume goes by the marker alone.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import faults

MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or weights that must not be."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank  # every rank raises it together: rank 0 alone reports


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(directory: Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if (p / MARKER).is_file())


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(engine, directory: Path, step: int, client_state: dict[str, Any], keep: int) -> None:
    """Called on every rank. The marker is written after a barrier, so it only exists when
    every rank's files are on disk."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_of(step)
    previous = (complete_tags(directory) or ["none"])[-1]
    if not weights_are_finite(engine):
        raise CheckpointError(
            f"refusing to save checkpoint {tag}: the student's weights hold non-finite values "
            f"(NaN or inf); the newest complete checkpoint ({previous}) is kept as it was",
            every_rank=True)
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state,
                               save_latest=False)
        faults.maybe_die_in_save(step, rank)  # test-only
        torch.save(rng_state(), directory / tag / f"rng_rank{rank}.pt")
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            marker = directory / tag / MARKER
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, marker)
    except (OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        free = shutil.disk_usage(directory).free / 2**20
        raise CheckpointError(
            f"saving checkpoint {directory / tag} failed on rank {rank} ({reason}; the disk "
            f"holding it has {free:.1f} MiB free). It has no "
            f"{MARKER} marker, so it is never resumed from; the newest complete checkpoint "
            f"({previous}) is intact, and running the same command again resumes from it "
            f"once the cause (often a full disk) is fixed") from None
    if rank == 0:
        _prune(directory, keep)
    if dist.is_initialized():
        dist.barrier()


def weights_are_finite(engine) -> bool:
    """True when every rank's share of the weights is finite (ZeRO-3: the partitions)."""
    finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p.data)).all())
                 for p in engine.module.parameters())
    flag = torch.tensor([1 if finite else 0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _prune(directory: Path, keep: int) -> None:
    tags = complete_tags(directory)
    for old in tags[:-keep]:
        shutil.rmtree(directory / old, ignore_errors=True)
    newest = tags[-1] if tags else None
    for path in directory.iterdir():  # leftovers of saves that were cut off
        if path.is_dir() and not (path / MARKER).exists() and newest and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def resume(engine, directory: Path) -> dict[str, Any] | None:
    """Loads the newest complete checkpoint into ``engine`` and this rank's RNG; returns the
    client state (step, stream position), or None when there is nothing to resume."""
    tags = complete_tags(directory)
    if not tags:
        return None
    tag = tags[-1]
    rank = dist.get_rank() if dist.is_initialized() else 0
    _, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {directory / tag} could not be loaded")
    rng_file = directory / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    client_state["tag"] = tag
    return client_state
