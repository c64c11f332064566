"""What a stage refers to, checked without building anything: earlier stages, files, shard
directories, batch arithmetic for the world size, and the number of steps.

Every function appends ``(yaml_path, message)`` problems instead of raising, so that one
run of ``--check`` lists every problem of a spec.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from distill_engine.families import ModelRecipe, arch_problem
from distill_engine.spec.schema import STAGE_REF, RecordStageSpec, StageSpec
from distill_engine.suggest import did_you_mean

from .job import Problems, StageRefs, StepCount, TargetsRef, global_batch

TARGETS_DIR = "targets"  # a recording stage's records, by default: RUN_DIR/STAGE/targets


def resolve_references(run_dir: Path, stages: list[StageSpec | None],
                       raw_names: list[str | None], problems: Problems,
                       restarting: str | None = None) -> list[StageRefs | None]:
    """Stage references and architectures. Stages that failed validation are None: they
    are skipped, and references to them are not reported twice. ``restarting``: the stage
    --restart-from trains again, with every stage after it (their exports are to come)."""
    refs: list[StageRefs | None] = []
    names: dict[str, int] = {}
    restart_at = raw_names.index(restarting) if restarting in raw_names else len(stages)

    def check_export(source: StageRefs, path: str) -> None:
        if names[source.name] < restart_at and (problem := lost_export(source)):
            problems.append((path, problem))
    for i, stage in enumerate(stages):
        here = f"stages[{i}]"
        if stage is None:
            if raw_names[i] is not None:
                names.setdefault(raw_names[i], i)
            refs.append(None)
            continue
        if stage.name in names:
            problems.append((f"{here}.name", f"stage name {stage.name!r} is used twice"))
        names.setdefault(stage.name, i)

        def earlier(ref: str, path: str) -> StageRefs | None:
            target = ref.split(":", 1)[1]
            if target == stage.name:
                problems.append((path, f"stage {stage.name!r} refers to itself"))
            elif target not in names or names[target] >= i:
                known = [name for name, j in names.items() if j < i]
                problems.append((path, f"{ref!r} is not an earlier stage; earlier stages: "
                                 f"{known}" + did_you_mean(target, known, "stage")))
            else:
                return refs[names[target]]  # None if that stage is itself invalid
            return None

        if isinstance(stage, RecordStageSpec):
            teacher = _live_teacher(stage, here, earlier, check_export, problems)
            taps_t = sorted({t for o in stage.objectives for t in o.teacher_taps()})
            records = stage.record.dir or run_dir / stage.name / TARGETS_DIR
            refs.append(StageRefs(stage.name, run_dir / stage.name, teacher, None, None, [],
                                  taps_t, records=records) if teacher is not None else None)
            continue

        student = None
        if stage.student.arch.startswith(STAGE_REF):
            source = earlier(stage.student.arch, f"{here}.student.arch")
            if source and _not_a_recording(source, f"{here}.student.arch", problems):
                exported = exported_student(source)
                student = ModelRecipe(exported.arch, {**exported.kwargs, **stage.student.kwargs})
        else:
            student = ModelRecipe(stage.student.arch, dict(stage.student.kwargs))
        student_init = None
        if stage.student.init.startswith(STAGE_REF):
            source = earlier(stage.student.init, f"{here}.student.init")
            if source and _not_a_recording(source, f"{here}.student.init", problems):
                student_init = source.export_dir / "model.safetensors"
                check_export(source, f"{here}.student.init")
        elif stage.student.init != "scratch":
            student_init = Path(stage.student.init)
            if not student_init.is_file():
                problems.append((f"{here}.student.init",
                                 f"weights file {student_init} does not exist (or use 'scratch' "
                                 "or 'stage:NAME')"))

        teacher = targets = None
        if stage.teacher is not None and stage.teacher.targets is not None:
            targets = _targets(stage, here, earlier, problems)
        elif stage.teacher is not None:
            teacher = _live_teacher(stage, here, earlier, check_export, problems)

        if student is not None and not stage.student.arch.startswith(STAGE_REF):
            # An architecture taken from an earlier stage was checked there.
            if problem := arch_problem(student.arch):
                problems.append((f"{here}.student.arch", problem))

        if stage.teacher is not None and teacher is None and targets is None:
            # An unresolved teacher reference (reported above): nothing to check the
            # objectives against.
            refs.append(None)
            continue
        taps_s = sorted({t for o in stage.objectives for t in o.student_taps()})
        taps_t = sorted({t for o in stage.objectives for t in o.teacher_taps()})
        refs.append(StageRefs(stage.name, run_dir / stage.name, teacher, student, student_init,
                              taps_s, taps_t, targets=targets) if student is not None else None)
    return refs


def lost_export(source: StageRefs) -> str | None:
    """Why a finished stage's export cannot be read from, or None. A finished stage is not
    trained again, so an export that lost its weights would fail a later stage reading it
    after DeepSpeed started, on every rank."""
    weights = source.export_dir / "model.safetensors"
    if not (source.export_dir / "metrics.json").is_file() or weights.is_file():
        return None  # to be trained by this run, or there
    return (f"stage {source.name!r} is finished (its export/metrics.json is there) but its "
            f"weights {weights} do not exist any more, and a finished stage is not trained "
            f"again; put the file back, or run with --restart-from {source.name} to train it "
            f"and every stage after it again (their folders are moved aside, not deleted)")


def _not_a_recording(source: StageRefs, path: str, problems: Problems) -> bool:
    if source.records is None:
        return True
    problems.append((path, f"stage {source.name!r} records teacher targets and has no student "
                           f"to take; a stage reads its records with teacher: {{targets: "
                           f"'stage:{source.name}'}}"))
    return False


def _live_teacher(stage, here: str, earlier, check_export, problems: Problems) -> ModelRecipe | None:
    """The teacher a stage runs: an earlier stage's exported student, or a model and its
    weights file. ``check_export``: reports an earlier stage's lost export."""
    spec = stage.teacher
    if spec.arch.startswith(STAGE_REF):
        source = earlier(spec.arch, f"{here}.teacher.arch")
        if source and _not_a_recording(source, f"{here}.teacher.arch", problems):
            exported = exported_student(source)
            check_export(source, f"{here}.teacher.arch")
            return ModelRecipe(exported.arch, exported.kwargs, source.export_dir / "model.safetensors")
        return None
    teacher = ModelRecipe(spec.arch, dict(spec.kwargs), spec.weights)
    if spec.weights is not None and not spec.weights.is_file():
        problems.append((f"{here}.teacher.weights", f"weights file {spec.weights} does not exist"))
    elif spec.weights is None:
        problems.append((f"{here}.teacher.weights",
                         "a teacher needs weights: a local .safetensors or torch "
                         "state-dict file (teachers are never randomly initialised)"))
    if problem := arch_problem(teacher.arch):
        problems.append((f"{here}.teacher.arch", problem))
    return teacher


def _targets(stage: StageSpec, here: str, earlier, problems: Problems) -> TargetsRef | None:
    """Recorded targets: those of an earlier recording stage (recorded by the time this
    stage runs), or a directory holding a complete recording."""
    spec = stage.teacher
    where = f"{here}.teacher.targets"
    if spec.weights is not None and not spec.weights.is_file():
        problems.append((f"{here}.teacher.weights", f"weights file {spec.weights} does not exist"))
    if spec.targets.startswith(STAGE_REF):
        source = earlier(spec.targets, where)
        if source is None:
            return None
        if source.records is None:
            problems.append((where, f"stage {source.name!r} is not a recording stage (it has no "
                                    f"'record' section), so it has no teacher targets; use "
                                    f"teacher: {{arch: 'stage:{source.name}'}} to run its "
                                    f"student as a live teacher"))
            return None
        return TargetsRef(source.records, source.teacher, source.name, spec.allow_wrap, spec.weights)
    from data_shards import DataError
    from data_shards.targets import TargetsIndex
    try:
        index = TargetsIndex.load(spec.targets)
    except DataError as err:
        problems.append((where, str(err)))
        return None
    recorded = index.raw.teacher
    teacher = ModelRecipe(recorded.arch, dict(recorded.kwargs), None)
    if problem := arch_problem(teacher.arch):
        problems.append((where, f"the targets were recorded from {recorded.arch}, which cannot "
                                f"be built here ({problem})"))
        return None
    return TargetsRef(index.directory, teacher, None, spec.allow_wrap, spec.weights)


def exported_student(source: StageRefs) -> ModelRecipe:
    """The student an earlier stage exported, as its ``model.json`` says once the stage is
    complete (the spec may have changed since; the weights are of that architecture), else
    as the spec says (the stage has yet to run)."""
    if (source.export_dir / "metrics.json").is_file():
        try:
            card = json.loads((source.export_dir / "model.json").read_text())
            return ModelRecipe(card["arch"], dict(card["kwargs"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an export without a readable card: the spec's recipe (and a clear
            # shape-mismatch report from the weights check if they differ)
    return source.student


# ---------------------------------------------------------------------------- files

def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and "{" not in url


def read_index(url: str) -> dict[str, Any] | None:
    """The shard index of a local shard directory or index file, if there is a readable one."""
    path = Path(url)
    index = path / "index.json" if path.is_dir() else path
    if index.suffix == ".json" and index.is_file():
        try:
            raw = json.loads(index.read_text())
            return raw if isinstance(raw, dict) else None
        except (OSError, json.JSONDecodeError):
            return None
    return None


def run_dir_problem(run_dir: Path) -> str | None:
    """Why the job could not make or write ``run_dir``, as far as can be told without
    writing (a path through a file, a folder this user cannot write, a read-only mount),
    or None."""
    run_dir = Path(run_dir)
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == run_dir and not run_dir.is_dir():
        return (f"{run_dir} is a file, not a folder; run_dir names the folder everything "
                f"the job writes goes under")
    if not existing.is_dir():
        return (f"{run_dir} cannot be created: {existing} is a file, not a folder; name a "
                f"run_dir whose parents are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"{run_dir} cannot be {'written' if existing == run_dir else 'created'}: "
                f"{existing} is not writable by this user (a read-only mount, or another "
                f"user's folder); name a run_dir on a disk the job can write")
    return None


def check_files(stage: StageSpec, here: str, problems: Problems) -> None:
    """DeepSpeed configs and shard locations the runtime will read."""
    for key in ("teacher_config", "student_config"):
        path = getattr(stage.deepspeed, key)
        if path == "auto":
            continue
        if not path.is_file():
            problems.append((f"{here}.deepspeed.{key}", f"DeepSpeed config {path} does not exist"))
        else:
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as err:
                problems.append((f"{here}.deepspeed.{key}", f"{path} is not valid JSON: {err}"))
    data = stage.data
    for key in ("train", "eval"):
        urls = getattr(data, key)
        for url in [urls] if isinstance(urls, str) else (urls or []):
            if url.startswith("pipe:") and not data.allow_pipe:
                problems.append((f"{here}.data.{key}",
                                 f"{url!r} runs a shell command; set data.allow_pipe: true "
                                 "to permit 'pipe:' urls"))
            elif _is_local(url) and not Path(url).exists():
                problems.append((f"{here}.data.{key}",
                                 f"{url} does not exist (pack shards with "
                                 "'python -m data_shards pack SOURCE --out DIR')"))
    # Evaluation is on by default wherever data.eval is given; an eval section written
    # without held-out shards would do nothing, so it is refused.
    if "eval" in stage.model_fields_set and stage.eval is not None and data.eval is None:
        problems.append((f"{here}.eval", "evaluation needs held-out shards in data.eval"))


# ---------------------------------------------------------------------------- batches and steps

def check_batch(stage: StageSpec, here: str, world_size: int, problems: Problems) -> None:
    data, opt = stage.data, stage.optimisation
    total = global_batch(stage, world_size)
    if data.global_batch_size is not None and data.global_batch_size != total:
        problems.append((f"{here}.data.global_batch_size",
                         f"{data.global_batch_size} != micro_batch_size {data.micro_batch_size} "
                         f"x {world_size} ranks x gradient_accumulation_steps "
                         f"{opt.gradient_accumulation_steps} = {total}; change one of them"))


def samples_per_epoch(stage: StageSpec) -> tuple[int | None, str]:
    """The samples of an epoch (``data.samples_per_epoch``, else the training shards'
    index) and where that number comes from; None when no index is readable."""
    data = stage.data
    if data.samples_per_epoch is not None:
        return data.samples_per_epoch, "data.samples_per_epoch"
    if isinstance(data.train, str):
        total = (read_index(data.train) or {}).get("total")
        if isinstance(total, int) and total > 0:
            return total, f"the index of {data.train}"
    return None, ""


def check_batch_against_data(stage: StageSpec, here: str, world_size: int,
                             problems: Problems) -> None:
    """A step must not need more samples than an epoch has: the stream would repeat
    samples within one batch, and a batch of 10^12 samples never arrives while memory grows."""
    samples, source = samples_per_epoch(stage)
    total = global_batch(stage, world_size)
    if samples is not None and total > samples:
        data, opt = stage.data, stage.optimisation
        problems.append((f"{here}.data.micro_batch_size",
                         f"one optimizer step takes micro_batch_size {data.micro_batch_size:,} "
                         f"x {world_size} ranks x gradient_accumulation_steps "
                         f"{opt.gradient_accumulation_steps} = {total:,} samples, but an epoch "
                         f"has {samples:,} ({source}); use a micro-batch of at most "
                         f"{max(1, samples // (world_size * opt.gradient_accumulation_steps)):,}"))


def batches_per_epoch(samples_per_epoch: int, micro_batch: int, world_size: int) -> int:
    """The stream's own arithmetic: every rank gives the same number of batches an epoch."""
    return math.ceil(samples_per_epoch / (micro_batch * world_size))


def count_steps(stage: StageSpec, world_size: int, batches: int | None = None) -> StepCount:
    """(optimizer steps, warm-up steps) from steps or epochs. ``batches``: batches per epoch
    (the stream's); by default from ``samples_per_epoch`` or the training shards' index."""
    data, opt = stage.data, stage.optimisation
    if batches is None:
        samples, _ = samples_per_epoch(stage)
        if samples is not None:
            batches = batches_per_epoch(samples, data.micro_batch_size, world_size)
    if batches is None:
        warmup = opt.warmup_steps if opt.warmup_epochs is None else None
        if opt.steps is not None and warmup is not None:
            warmup = min(warmup, max(opt.steps - 1, 0))
        return StepCount(opt.steps, warmup, None)
    steps_per_epoch = batches / opt.gradient_accumulation_steps
    total = opt.steps if opt.steps is not None else max(1, math.ceil(opt.epochs * steps_per_epoch))
    warmup = (opt.warmup_steps if opt.warmup_epochs is None
              else math.ceil(opt.warmup_epochs * steps_per_epoch))
    return StepCount(total, min(warmup, max(total - 1, 0)), batches)
