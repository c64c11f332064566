"""A recording stage: the teacher, once, over E epochs of the stage's stream; its taps and
the views that produced them written as teacher targets (``data_shards.targets``).

    stream (views drawn as parameters) ──> batch ──> teacher ──> taps ──> stored forms ──> this rank's shards

Every rank streams its own share, as a training stage would, and writes its own shards. A
checkpoint closes the open shards and writes the rank's progress (its shards and the stream
state) atomically, every ``checkpointing.every_steps`` batches: a killed recording resumes
from there, rewriting only what came after. Preemption (SIGTERM, SIGINT, a launcher gone)
saves a checkpoint on every rank and stops, as in training. Once every rank has finished,
rank 0 writes ``targets.json``, which marks the recording complete.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from data_shards import DataError, ShardStream
from data_shards.targets import (TARGETS_INDEX, TargetsHeader, TargetsIndex, TargetWriter,
                                 TeacherRecord, encode_batch, finish_recording, sha256_of)
from distill_engine.accelerator import device
from distill_engine.modeling.inputs import model_inputs, to_model
from distill_engine.planning.job import JobPlan, RecordPlan

from . import fingerprint, preemption
from .progress import RecordingProgress
from .engines import build_teacher

log = logging.getLogger("distill_engine")


def teacher_inputs(plan: RecordPlan, batch: dict[str, Any]) -> Any:
    """What the live teacher would get from this batch in a student stage: its view, as the
    objectives prepare it (hidden-state matching shows a masking teacher the whole input)."""
    inputs = model_inputs(batch, "teacher")
    teacher_model = plan.models.tap_shapes.teacher_model
    for objective in plan.spec.objectives:
        inputs = objective.live_teacher_input(inputs, teacher_model)
    return inputs


class RecordingStage:
    def __init__(self, job: JobPlan, plan: RecordPlan):
        self.job, self.plan, self.spec = job, plan, plan.spec
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = device()

    def summary(self, index: TargetsIndex, seconds: float | None = None) -> dict[str, Any]:
        raw = index.raw
        return {"stage": self.spec.name, "teacher": raw.teacher.arch, "teacher_weights": raw.teacher.weights,
                "student": None, "steps": raw.epochs * raw.data.batches_per_epoch,
                "records": raw.samples, "bytes": raw.bytes, "targets": str(index.directory),
                "seconds": seconds, "first_loss": None, "last_loss": None, "accuracy": None,
                "knn_accuracy": None}  # fmt: skip

    def open_stream(self) -> ShardStream:
        data = self.spec.data
        return ShardStream(
            data.train, batch_size=data.micro_batch_size, rank=self.rank,
            world_size=self.world_size, num_workers=data.num_workers,
            seed=self.job.spec.seed + data.seed, views=data.views, text=data.text,
            samples_per_epoch=data.samples_per_epoch, max_bad_samples=data.max_bad_samples,
            allow_pipe=data.allow_pipe, max_image_pixels=data.max_image_pixels,
            record_views=True)

    def header(self, stream: ShardStream) -> TargetsHeader:
        recipe, record = self.plan.teacher, self.spec.record
        return TargetsHeader(
            teacher=TeacherRecord(arch=recipe.arch, kwargs=json.loads(json.dumps(recipe.kwargs, default=str)),
                                  weights=str(recipe.weights), sha256=sha256_of(recipe.weights),
                                  weights_bytes=recipe.weights.stat().st_size),
            taps=self.plan.stores, views=self.spec.data.views.model_dump(mode="json"),
            epochs=record.epochs, dtype=record.dtype, int8_features=record.int8_features,
            data=stream.order())

    def record(self, stop_after: int | None = None) -> dict[str, Any] | None:
        """Records to the end, or at most ``stop_after`` batches in this run (checkpointed
        there; None is returned and the next run resumes)."""
        directory = self.plan.targets_dir
        if (directory / TARGETS_INDEX).is_file():
            log.info("%s: already recorded (%s); skipping", self.spec.name, directory / TARGETS_INDEX)
            return self.summary(TargetsIndex.load(directory))
        if self.rank == 0:
            fingerprint.record(self.plan)
        started = time.perf_counter()
        self.stream = stream = self.open_stream()
        if self.plan.batches_per_epoch is not None and stream.batches_per_epoch != self.plan.batches_per_epoch:
            raise DataError(f"stage {self.spec.name!r}: the plan counted {self.plan.batches_per_epoch} batches an "
                            f"epoch from {self.spec.data.train}, the stream counts {stream.batches_per_epoch}: the "
                            f"shards' index changed after the job was planned; run the command again")
        writer = TargetWriter(directory, self.rank, self.header(stream), self.spec.record.records_per_shard)
        state = writer.resume() if self.spec.checkpointing.resume else None
        if state is not None:
            stream.load_state_dict(state)
        per_epoch = stream.batches_per_epoch
        total = self.spec.record.epochs * per_epoch
        done = stream.epoch * per_epoch + stream.batch
        if state is not None:
            log.info("%s: resumed the recording at batch %d of %d", self.spec.name, done, total)
        stop_at = total if stop_after is None else min(total, done + stop_after)
        self.check_disk()
        if done < total:
            self.teacher, dtype = build_teacher(self.plan, self.job.spec.seed, self.plan.placement.teacher)
        every_save = self.spec.checkpointing.every_steps
        batches = iter(stream)
        progress = RecordingProgress(self.spec.name, total, done, stream.batch_size * self.world_size,
                                     self.spec.logging.every_steps, enabled=self.rank == 0)
        try:
            while done < stop_at:
                if preemption.stop_requested_everywhere():
                    writer.checkpoint(stream.state_dict())
                    raise preemption.Preempted(preemption.stop_reason(), preemption.stop_signal(),
                                               done, f"recording batch {done}")
                batch = next(batches)
                taps = self.teacher(to_model(teacher_inputs(self.plan, batch), self.device, dtype))
                writer.write_batch(batch, encode_batch(taps, self.plan.stores))
                done += 1
                if done % every_save == 0 or done == stop_at:
                    writer.checkpoint(stream.state_dict(), finished=done == total)
                progress.advance(done, (done - 1) // per_epoch)
        finally:
            progress.close()
        if done < total:
            log.info("%s: stopped after recording batch %d of %d as asked; run the same command "
                     "again to resume", self.spec.name, done, total)
            return None
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            finish_recording(directory, self.world_size)
        if dist.is_initialized():
            dist.barrier()
        index = TargetsIndex.load(directory)
        summary = self.summary(index, round(time.perf_counter() - started, 2))
        if self.rank == 0:
            self.plan.export_dir.mkdir(parents=True, exist_ok=True)
            (self.plan.export_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
            log.info("%s: %d records, %.1f MB in %s", self.spec.name, index.raw.samples,
                     index.raw.bytes / 1e6, directory)
        return summary

    def check_disk(self) -> None:
        """Every rank, before the teacher is built: a recording the disk cannot hold stops
        here, on every rank alike, rather than when the disk is full."""
        from distill_engine.planning.targets import disk_problem
        problem = disk_problem(self.plan)
        flag = torch.tensor([1 if problem else 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise DataError(f"stage {self.spec.name!r}: {problem or 'another rank finds the disk too small'}")

    def close(self) -> None:
        for name in ("teacher", "stream"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
