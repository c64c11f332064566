"""Recorded teacher targets at plan time: what a recording stage will write (which taps,
stored how, how many bytes), and whether a stage that reads a recording can use it.

A student stage reads its records in the order they were recorded, replaying each sample's
recorded view, so it must stream the same data in the same order (seed, ranks, workers,
micro-batch, epoch size) with the same views; its objectives must find every teacher tap
they read recorded in a form that serves them; and it may not need more epochs than were
recorded unless it allows wrapping (epoch ``e`` then reads recorded epoch ``e mod E``). Each
way a recording does not fit is one paragraph at ``--check``, at the YAML path to change.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from data_shards import DataError, ShardIndex
from data_shards.stream import stream_order
from data_shards.targets import (TARGETS_INDEX, StreamOrder, TargetsIndex, plan_stores,
                                 record_bytes, sha256_of, store_problem)
from distill_engine.spec.schema import RecordStageSpec, StageSpec
from distill_engine.spec.units import gib

from .job import ModelSummary, Problems, RecordPlan, StagePlan, StageRefs, input_shape
from .references import batches_per_epoch, samples_per_epoch


def teacher_needs(stage) -> list[tuple[str, str, str | None, bool]]:
    """(tap, store, token, int8_ok) of every teacher tap the stage's objectives read."""
    return [(need.tap, need.store, need.token, need.int8_ok)
            for objective in stage.objectives for need in objective.teacher_needs()]


def per_sample_shapes(stage, models: ModelSummary) -> dict[str, list[int | None]]:
    """Each teacher tap's traced shape without the batch; a text stage's sequence length
    varies from batch to batch (its longest sample), so it is left open."""
    shapes = {}
    for tap, shape in models.tap_shapes.teacher.items():
        per_sample: list[int | None] = list(shape[1:])
        if stage.data.text is not None and len(per_sample) == 2 and len(shape) == 3:
            per_sample[0] = None
        shapes[tap] = per_sample
    return shapes


def plan_recording(index: int, stage: RecordStageSpec, refs: StageRefs, world_size: int,
                   models: ModelSummary, problems: Problems) -> RecordPlan | None:
    record = stage.record
    here = f"stages[{index}]"
    shapes = per_sample_shapes(stage, models)
    stores = plan_stores(teacher_needs(stage), shapes, record.dtype, record.top_k, record.int8_features)
    logit_taps = {tap for tap, store, _, _ in teacher_needs(stage) if store == "top_k"}
    for tap in sorted(logit_taps):
        classes = shapes[tap][-1] if shapes[tap] else None
        if record.top_k is not None and classes is not None and record.top_k >= classes:
            problems.append((f"{here}.record.top_k",
                             f"top_k {record.top_k} keeps every one of the {classes} classes of "
                             f"tap {tap!r}; give fewer, or null to record all logits"))
    samples, _ = samples_per_epoch(stage)
    batches = None if samples is None else batches_per_epoch(samples, stage.data.micro_batch_size, world_size)
    return RecordPlan(index, stage, refs, world_size, input_shape(stage), models, stores, batches)


# ---------------------------------------------------------------------------- size on disk

def recording_bytes(plan: RecordPlan) -> int | None:
    """What the recording will take on disk (estimated; None without an epoch size)."""
    if plan.records is None:
        return None
    return plan.records * record_bytes(plan.stores, len(plan.spec.data.views.views))


def disk_problem(plan: RecordPlan) -> str | None:
    """Why the recording does not fit on the disk it writes to, with how to shrink it."""
    needed = recording_bytes(plan)
    if needed is None:
        return None
    directory = Path(plan.targets_dir).absolute()
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    written = sum(f.stat().st_size for f in directory.glob("targets-r*.tar")) if directory.is_dir() else 0
    free = shutil.disk_usage(existing).free + written  # a resumed recording rewrites its own
    if needed <= free:
        return None
    per_epoch = needed / plan.spec.record.epochs
    record = plan.spec.record
    ways = [f"fewer epochs (record.epochs: {max(1, int(free // per_epoch))} fit, "
            f"{gib(per_epoch)} each)"]
    kinds = {store.store for store in plan.stores}
    if "tokens" in kinds and not record.int8_features and any(n[3] for n in teacher_needs(plan.spec)):
        ways.append("int8 features (record.int8_features: true, half of fp16)")
    if record.dtype == "fp32":
        ways.append("record.dtype: fp16 (half of fp32)")
    if any(store.store == "tokens" and len(store.shape) == 1 for store in plan.stores):
        ways.append("top-k logits for soft labels (record.top_k)")
    return (f"the recording would take {gib(needed)} ({plan.records:,} records of "
            f"{', '.join(store.describe() for store in plan.stores)}), more than the "
            f"{gib(free)} free on the disk of {existing}; shrink it with " + ", or ".join(ways)
            + ", or give record.dir on a larger disk")


# ---------------------------------------------------------------------------- a student on records

def order_of(stage: StageSpec | RecordStageSpec, job_seed: int, world_size: int) -> StreamOrder | None:
    """The order the stage's stream will take (None when its shards have no readable index
    and no samples_per_epoch: then the stream itself checks at run time)."""
    data = stage.data
    index = None
    if isinstance(data.train, str):
        try:
            index = ShardIndex.load(data.train)
        except DataError:
            index = None
    if index is None and data.samples_per_epoch is None:
        return None
    return stream_order(data.train, index, batch_size=data.micro_batch_size, world_size=world_size,
                        num_workers=data.num_workers, seed=job_seed + data.seed,
                        samples_per_epoch=data.samples_per_epoch)


def epochs_needed(plan: StagePlan) -> int | None:
    """Stream epochs the stage reads: its micro-batches over the batches of an epoch."""
    steps = plan.steps
    if steps.total is None or not steps.batches_per_epoch:
        return None
    micro = steps.total * plan.spec.optimisation.gradient_accumulation_steps
    return math.ceil(micro / steps.batches_per_epoch)


def check_targets(plan: StagePlan, recordings: dict[str, RecordPlan], job_seed: int,
                  problems: Problems) -> None:
    """A stage reading recorded targets against the recording: its teacher's weights, the
    taps its objectives need, its views, data order and epochs."""
    ref = plan.refs.targets
    stage, here = plan.spec, f"stages[{plan.index}]"
    recording = recordings.get(ref.stage) if ref.stage else None
    index = None
    if (Path(ref.directory) / TARGETS_INDEX).is_file():
        try:
            index = TargetsIndex.load(ref.directory)
        except DataError as err:
            problems.append((f"{here}.teacher.targets", str(err)))
            return
    if index is None and recording is None:
        return  # a recording stage that failed its own checks (reported there)
    source = f"the targets in {ref.directory}" + (" (recorded)" if index else
                                                  f" (to be recorded by stage {ref.stage!r})")
    recorded_stores = index.raw.taps if index else recording.stores
    recorded_views = index.raw.views if index else recording.spec.data.views.model_dump(mode="json")
    recorded_epochs = index.raw.epochs if index else recording.spec.record.epochs
    world_size = plan.world_size

    # The teacher: the weights the recording stage (or this stage) names, against the record.
    if index is not None:
        weights = ref.weights or (recording.teacher.weights if recording else None)
        raw = index.raw.teacher
        if recording is not None and (recording.teacher.arch, dict(recording.teacher.kwargs)) != (raw.arch, raw.kwargs):
            problems.append((f"{here}.teacher.targets",
                             f"{source} were recorded from {raw.arch} {raw.kwargs}, but stage "
                             f"{ref.stage!r} now names {recording.teacher.arch} "
                             f"{dict(recording.teacher.kwargs)}; record them again (--restart-from "
                             f"{ref.stage}) or restore the teacher they were recorded from"))
        elif weights is not None and Path(weights).is_file() and sha256_of(weights) != raw.sha256:
            where = f"{here}.teacher.weights" if ref.weights else f"{here}.teacher.targets"
            problems.append((where, f"{source} were recorded from teacher weights with sha256 "
                                    f"{raw.sha256[:16]}... ({raw.weights}), but {weights} now has "
                                    f"sha256 {sha256_of(weights)[:16]}...: other weights than the "
                                    f"records hold; record the targets again"
                                    + (f" (--restart-from {ref.stage})" if ref.stage else "")
                                    + " or name the weights they were recorded from"))

    # Taps: recorded, in a form each objective can use, of the shape this stage traces.
    recorded = {store.tap: store for store in recorded_stores}
    traced = per_sample_shapes(stage, plan.models)
    for j, objective in enumerate(stage.objectives):
        if getattr(objective, "teacher_tokens", 1.0) < 1.0:
            problems.append((f"{here}.objectives[{j}].teacher_tokens",
                             f"teacher_tokens {objective.teacher_tokens} (MaskedKD) makes a "
                             f"cheaper teacher forward, but a stage reading recorded targets runs "
                             f"no teacher: its targets are those recorded from every token; use "
                             f"teacher_tokens 1"))
        for need in objective.teacher_needs():
            store = recorded.get(need.tap)
            if store is None:
                problems.append((f"{here}.objectives[{j}]",
                                 f"{objective.label} reads teacher tap {need.tap!r}, which "
                                 f"{source} do not hold (they hold "
                                 f"{', '.join(s.tap for s in recorded_stores)}); record it "
                                 f"(list the objective in the recording stage) or read a "
                                 f"recorded tap"))
                continue
            problem = store_problem(store, need.store, need.token, need.int8_ok)
            if problem is None and traced.get(need.tap) is not None and store.shape != traced[need.tap]:
                problem = (f"tap {need.tap!r} was recorded as {store.shape} per sample, but this "
                           f"stage's teacher gives {traced[need.tap]}")
            if problem:
                problems.append((f"{here}.objectives[{j}]", f"{objective.label} cannot train "
                                 f"from {source}: {problem}"))

    # Views and data order: a student meets its records only in the recorded order.
    if stage.data.views.model_dump(mode="json") != recorded_views:
        problems.append((f"{here}.data.views",
                         f"{source} hold the teacher's taps of the views {recorded_views}; this "
                         f"stage's views are {stage.data.views.model_dump(mode='json')}. A "
                         f"recorded tap belongs to its view (a flipped crop is another target): "
                         f"use the recorded views, or record with these"))
    order = order_of(stage, job_seed, world_size)
    recorded_order = index.raw.data if index else (
        order_of(recording.spec, job_seed, world_size) if recording else None)
    if order is not None and recorded_order is not None:
        from data_shards.targets import order_problems
        differing = order_problems(recorded_order, order)
        if differing:
            problems.append((f"{here}.data",
                             f"{source} were recorded from another stream than this stage's: "
                             f"{'; '.join(differing)}. A student reads its records in the "
                             f"recorded order, so it must stream the same data with the same "
                             f"seed, ranks, workers, micro-batch and epoch size"))

    # Epochs.
    needed = epochs_needed(plan)
    if needed is not None and needed > recorded_epochs and not ref.allow_wrap:
        problems.append((f"{here}.teacher.allow_wrap",
                         f"the stage needs {needed} epochs of its stream ({plan.steps.total} "
                         f"steps of {plan.steps.batches_per_epoch} batches an epoch), but "
                         f"{source} hold {recorded_epochs}; set teacher.allow_wrap: true to read "
                         f"recorded epoch e mod {recorded_epochs} (the same crops again), record "
                         f"more epochs, or train fewer steps"))


def describe_targets(plan: StagePlan) -> str:
    """The --check line for a stage reading recorded targets (and whether it wraps)."""
    ref = plan.refs.targets
    if (Path(ref.directory) / TARGETS_INDEX).is_file():
        raw = TargetsIndex.load(ref.directory).raw
        epochs, what = raw.epochs, f"{raw.samples:,} records, {gib(raw.bytes)}"
        stores = raw.taps
    else:
        epochs, what, stores = None, f"to be recorded by stage {ref.stage!r}", []
    needed = epochs_needed(plan)
    wraps = ""
    if needed is not None and epochs is not None and needed > epochs:
        wraps = f"; needs {needed} epochs, so it wraps: epoch e reads recorded epoch e mod {epochs}"
    taps = f"; {'; '.join(s.describe() for s in stores)}" if stores else ""
    recorded = f"{epochs} epochs, " if epochs else ""
    return (f"recorded targets of {ref.teacher.arch} in {ref.directory} ({recorded}{what}){taps}"
            f"{wraps}; no teacher engine is built")
