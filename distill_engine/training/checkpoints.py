"""Checkpoints that survive being killed half-way.

DeepSpeed writes one directory per tag (every rank writes its own shard); we add each
rank's RNG state beside it and, only after every rank has finished, a ``COMPLETE`` marker
written atomically by rank 0. The marker lists every file of the tag with its size and
SHA-256 (the ranks hash the files between them, a share each), the world size and the
stage's spec fingerprint. Resume takes the newest tag whose marker exists and whose files
all verify; a tag that does not verify is named with the file at fault, renamed
``TAG.corrupt`` and passed over. So a checkpoint cut off mid-write or damaged afterwards is
never resumed from. The last ``keep`` complete checkpoints are kept; older ones are
deleted only after a newer one is complete (and so verified: its checksums were just
computed from what is on disk).

A save that fails (disk full, a dead rank) raises ``CheckpointError`` and leaves the
previous complete checkpoint as it was. Weights that are not finite are never saved.
DeepSpeed's own ``latest`` file is not written: resume goes by the marker alone. A
checkpoint saved at another world size is resumed through DeepSpeed's universal format
(the last section).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("distill_engine")


MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or weights that must not be."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank  # every rank raises it together: rank 0 alone reports


TAG_PATTERN = re.compile(r"step\d{8}")  # not TAG.corrupt
# Every name the engine gives a folder in checkpoints/: a tag, or a tag that did not verify.
# Pruning deletes only these: a hand copy (step00000002.bak/, best_by_hand/) is the user's.
OWN_NAMES = re.compile(r"step\d{8}(\.corrupt)?")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(directory: Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if TAG_PATTERN.fullmatch(p.name) and (p / MARKER).is_file())


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(engine, directory: Path, step: int, client_state: dict[str, Any], keep: int,
         marker: dict[str, Any] | None = None) -> None:
    """Called on every rank. The marker is written after a barrier, so it only exists when
    every rank's files are on disk; ``marker`` adds fields to it (the spec fingerprint)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_of(step)
    previous = (complete_tags(directory) or ["none"])[-1]
    if not weights_are_finite(engine):
        raise CheckpointError(
            f"refusing to save checkpoint {tag}: the student's weights hold non-finite values "
            f"(NaN or inf); the newest complete checkpoint ({previous}) is kept as it was",
            every_rank=True)
    try:
        if rank == 0 and (directory / tag).exists():
            # A tag saved again (after resuming from an older one): its old marker must
            # not vouch for files that are about to be replaced.
            shutil.rmtree(directory / tag)
        _barrier()
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state,
                               save_latest=False)
        torch.save(rng_state(), directory / tag / f"rng_rank{rank}.pt")
        _barrier()
        files = _checksums(directory / tag)
        if rank == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            _write_json_atomically(directory / tag / MARKER, {
                "step": step, "world_size": world, **(marker or {}), "files": files})
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
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _my_share(names: list[str]) -> list[str]:
    """The files this rank hashes or verifies: every world_size-th, so that the ranks read
    a tag's files in parallel, each once."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return sorted(names)[rank::world]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksums(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """{file name: {bytes, sha256}} of every file of the tag, hashed a share per rank and
    gathered on every rank (collective)."""
    names = [p.name for p in tag_dir.iterdir() if p.is_file() and p.name != MARKER]
    mine = {name: {"bytes": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
            for name in _my_share(names)}
    return {name: entry for share in _gather(mine) for name, entry in share.items()}


def _gather(value: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def verify(tag_dir: Path) -> str | None:
    """Collective: None when every file listed in the tag's marker has its recorded size
    and checksum (every rank gets the same answer), else what is wrong, naming the file."""
    try:
        files = json.loads((tag_dir / MARKER).read_text()).get("files")
    except (OSError, ValueError) as err:
        files, problem = None, f"its {MARKER} marker cannot be read ({err})"
    else:
        problem = None
    if files is None and problem is None:
        return None  # a marker from before checksums were recorded: nothing to verify
    mine = []
    for name in _my_share(list(files or [])):
        path, expected = tag_dir / name, files[name]
        if not path.is_file():
            mine.append(f"{path} is missing")
        elif path.stat().st_size != expected["bytes"]:
            mine.append(f"{path} has {path.stat().st_size:,} bytes, {expected['bytes']:,} "
                        f"when it was saved")
        elif _sha256(path) != expected["sha256"]:
            mine.append(f"{path} does not match its checksum (its bytes changed since it "
                        f"was saved)")
    problems = [problem] if problem else []
    problems += [p for share in _gather(mine) for p in share]
    return "; ".join(problems) or None


def read_marker(tag_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}


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
    for path in directory.iterdir():  # saves that were cut off, tags that did not verify
        ours = OWN_NAMES.fullmatch(path.name)
        incomplete = not TAG_PATTERN.fullmatch(path.name) or not (path / MARKER).exists()
        if ours and path.is_dir() and incomplete and newest and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def newest_verified(directory: Path) -> str | None:
    """Collective: the newest complete tag whose files verify. Tags that do not are
    reported (rank 0), renamed ``TAG.corrupt`` so that nothing takes them for complete
    again, and passed over."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for tag in reversed(complete_tags(directory)):
        problem = verify(directory / tag)
        if problem is None:
            return tag
        if rank == 0:
            from .progress import console  # one unbroken line, file names whole
            console.print(f"warning: checkpoint {directory / tag} does not verify and is passed "
                          f"over: {problem}. Renamed to {tag}.corrupt (deleted once a newer "
                          f"checkpoint is complete); resuming from an older one if there is one",
                          highlight=False, soft_wrap=True, markup=False)
            shutil.rmtree(directory / f"{tag}.corrupt", ignore_errors=True)  # an earlier one
            os.replace(directory / tag, directory / f"{tag}.corrupt")
        _barrier()
    return None


def resume(engine, directory: Path, tag: str) -> dict[str, Any]:
    """Loads checkpoint ``tag`` (from ``newest_verified``) into ``engine`` and this rank's
    RNG; returns the client state (step, stream position, the world size it was saved at).
    A checkpoint of another world size goes through DeepSpeed's universal format
    (``load_universal`` below); ranks it had no RNG state for keep their fresh seed."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world = read_marker(directory / tag).get("world_size", world)
    if saved_world != world:
        client_state = load_universal(engine, directory, tag)
    else:
        _, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {directory / tag} could not be loaded")
    rng_file = directory / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    client_state["tag"] = tag
    client_state["saved_world_size"] = saved_world
    return client_state


# ---------------------------------------------------------------------------- at another world size

# Resuming at another world size (fewer or more ranks than the checkpoint was saved with).
#
# A ZeRO-3 checkpoint holds one partition of the weights and optimizer state per rank;
# DeepSpeed loads it only at the world size that wrote it. At another size we convert the
# tag once to DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``:
# one file per parameter and per optimizer state, whole) into ``<stage>/universal/TAG`` and
# load that with ``load_universal_checkpoint`` switched on for the one call. Weights, Adam's
# moments and step count, the learning-rate schedule and the step number carry over.
#
# What cannot carry over is the sample order: each rank draws its own resampled stream, so
# at another world size the ranks see other samples. The stream restarts at the same epoch,
# at the batch that covers as many samples as had been consumed (``stream_state_after``).

DONE = "CONVERTED"  # written last by rank 0: the universal copy is whole (or why it is not)
# Written instead when a signal stopped the conversion: the copy is not whole, but nothing
# is wrong with the checkpoint, so the next run converts it again.
INTERRUPTED = "INTERRUPTED"


def universal_copy(checkpoint_dir: Path, tag: str) -> Path:
    """Collective: the universal copy of ``checkpoint_dir/tag``, converted by rank 0 on
    first use. The other ranks wait on a file rather than a collective, whose timeout
    (deepspeed.timeout_s) a large conversion may outlast. A conversion that a signal stops
    (the converter runs in the job's process group, so SIGTERM reaches it too) stops the
    job as a preemption does, and is redone by the next run."""
    from . import preemption
    out = checkpoint_dir.parent / "universal" / tag
    done, interrupted = out / DONE, out / INTERRUPTED
    rank = dist.get_rank() if dist.is_initialized() else 0
    convert = rank == 0 and not done.is_file()
    if convert:
        shutil.rmtree(out, ignore_errors=True)  # a copy an earlier run left half-made
        out.mkdir(parents=True)
    _barrier()  # no rank waits before an earlier run's INTERRUPTED is gone
    if convert:
        started = time.perf_counter()
        log.info("converting checkpoint %s to a universal checkpoint in %s to resume at "
                 "another world size", checkpoint_dir / tag, out)
        converted = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(checkpoint_dir / tag), "--output_folder", str(out),
             "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True)
        if converted.returncode < 0 or (converted.returncode != 0
                                        and preemption.stop_requested_here()):
            # Killed by a signal (or stopped by the one this rank was sent): not a failure.
            interrupted.write_text(f"stopped by signal {-converted.returncode}"
                                   if converted.returncode < 0 else preemption.stop_reason())
        else:
            failure = (converted.stderr.strip().splitlines() or ["no message"])[-1]
            done.write_text("ok" if converted.returncode == 0 else f"failed: {failure}")
            log.info("converted in %.1f s", time.perf_counter() - started)
    while not done.is_file() and not interrupted.is_file():
        time.sleep(0.5)
    if not done.is_file():
        step = int(read_marker(checkpoint_dir / tag).get("step", 0))
        raise preemption.Preempted(
            f"{preemption.stop_reason()} while checkpoint {tag}, saved at another world size, "
            f"was being converted for this one (the conversion is redone next time)",
            preemption.stop_signal(), step, tag)
    if done.read_text() != "ok":
        raise CheckpointError(
            f"checkpoint {checkpoint_dir / tag} was saved at another world size and could not "
            f"be converted for this one ({done.read_text()}); resume at the world size it was "
            f"saved with", every_rank=True)
    return out


def load_universal(engine, checkpoint_dir: Path, tag: str) -> dict[str, Any] | None:
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
