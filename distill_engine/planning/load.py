"""From YAML to a checked plan: every problem found before any weight or sample is touched.

``load_plan`` reads the spec (``spec.yaml_io``), validates it with pydantic stage by stage,
then checks what pydantic cannot see (``references``: stage references, files, batch
arithmetic, steps; ``model_checks``: meta-device builds of both models, taps, objective
fit, weights headers; the label and text checks), and builds each stage's plan complete,
in one place: the placement and the memory estimate too (``placement``, ``memory``), so
that training reads them and computes nothing twice. All problems are raised together as
one ``SpecError``, each with its YAML path.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import ValidationError

from distill_engine.spec.problem_paths import where_written
from distill_engine.spec.schema import (STAGE_DEFAULTS, JobHeader, JobSpec, RecordStageSpec,
                                        StageSpec, is_recording, with_stage_defaults)
from distill_engine.spec.units import gib
from distill_engine.spec.yaml_io import SpecError, apply_overrides, pydantic_problems, read_yaml

from .job import JobPlan, RecordPlan, StagePlan, input_shape
from .label_checks import check_labels
from .memory import stage_facts
from .model_checks import check_models, check_teacher_weights
from .placement import place, place_recording
from .references import (check_batch, check_batch_against_data, check_files, count_steps,
                         resolve_references, run_dir_problem)
from .targets import check_targets, plan_recording
from .text_checks import check_inputs

# More memory per rank than any accelerator (or host of CPU ranks) has: a spec whose plan
# needs this is a typo (micro_batch_size: 1000000000000), refused at --check.
MAX_RANK_MEMORY = 1024 ** 4


def _is_missing_input(problem: tuple[str, str]) -> bool:
    """A weights file, shard directory or tokenizer directory that is not here (yet)."""
    path, message = problem
    inputs = (".teacher.weights", ".student.init", ".data.train", ".data.eval",
              ".data.text.tokenizer", ".data.text.tokenizers.teacher",
              ".data.text.tokenizers.student", ".student.arch", ".teacher.arch")
    # A run_dir on the cluster's disks, planned from a laptop, is not there either.
    return (path.endswith(inputs) and ("does not exist" in message
                                       or "a teacher needs weights" in message)
            or path == "run_dir")


def load_plan(path: Path, overrides: list[str] | None = None, world_size: int = 1,
              missing_inputs_ok: bool = False, accelerator_bf16: bool | None = None,
              restart_from: str | None = None) -> JobPlan:
    """``missing_inputs_ok`` (memory planning) turns missing weights files and shard
    directories into warnings: a memory plan needs shapes only, and paper-scale specs name
    weights and data that live on the cluster. ``accelerator_bf16``: whether ``auto``
    dtypes are bf16 when placing the models (None: ask this machine's accelerator).
    ``restart_from``: the stage --restart-from trains again (it and the stages after it
    are planned as if they had not run)."""
    source = str(path)
    written = apply_overrides(read_yaml(path), list(overrides or []), source)
    raw = with_stage_defaults(written)
    problems: list[tuple[str, str]] = []
    try:
        header = JobHeader.model_validate(raw)
    except ValidationError as err:
        problems += pydantic_problems(err, model=JobHeader, extra_keys=STAGE_DEFAULTS)
        header = None
    # Each stage on its own, so that one broken stage does not hide the others' problems.
    raw_stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    stages: list[StageSpec | RecordStageSpec | None] = []
    for i, stage_raw in enumerate(raw_stages):
        model = RecordStageSpec if is_recording(stage_raw) else StageSpec
        try:
            stages.append(model.model_validate(stage_raw))
        except ValidationError as err:
            problems += pydantic_problems(err, ("stages", i), model=model)
            stages.append(None)
    raw_names = [s.get("name") if isinstance(s, dict) and isinstance(s.get("name"), str) else None
                 for s in raw_stages]
    run_dir = header.run_dir if header else Path(".")
    if header and (problem := run_dir_problem(run_dir)):
        problems.append(("run_dir", problem))

    plans: list[StagePlan | RecordPlan] = []
    all_refs = resolve_references(run_dir, stages, raw_names, problems, restart_from)
    for i, (stage, refs) in enumerate(zip(stages, all_refs)):
        if stage is None or refs is None:
            continue
        here = f"stages[{i}]"
        if isinstance(stage, RecordStageSpec):
            check_files(stage, here, problems)
            models = check_models(i, stage, refs, input_shape(stage), problems)
            check_teacher_weights(i, stage, refs, problems)
            if models is not None:
                check_inputs(i, stage, {"teacher": (refs.teacher, models.tap_shapes.teacher_model)},
                             problems)
                if (recording := plan_recording(i, stage, refs, world_size, models, problems)):
                    plans.append(recording)
            continue
        check_files(stage, here, problems)
        check_batch(stage, here, world_size, problems)
        check_batch_against_data(stage, here, world_size, problems)
        shape = input_shape(stage)
        models = check_models(i, stage, refs, shape, problems)
        if models is not None:
            check_labels(stage, here, models, problems)
        check_teacher_weights(i, stage, refs, problems)
        if models is not None:
            check_inputs(i, stage, {role: (recipe, model) for role, recipe, model in (
                ("student", refs.student, models.tap_shapes.student_model),
                ("teacher", refs.traced_teacher, models.tap_shapes.teacher_model)) if model is not None},
                problems)
        if models is not None:
            plans.append(StagePlan(i, stage, refs, world_size, shape, models,
                                   count_steps(stage, world_size)))

    # Stages reading recorded targets, against the recording (made earlier in this job, or
    # found in a directory).
    recordings = {plan.name: plan for plan in plans if isinstance(plan, RecordPlan)}
    for plan in plans:
        if isinstance(plan, StagePlan) and plan.refs.targets is not None:
            check_targets(plan, recordings, header.seed if header else 0, problems)

    # Placement and memory, once everything they read (DeepSpeed configs, models) is known
    # to be sound. Sizes the data allows but no machine holds are refused, one report per
    # place the micro-batch is written (stages inheriting a top-level value would each say
    # the same).
    sound = not [p for p in problems if not (missing_inputs_ok and _is_missing_input(p))]
    seen: set[str] = set()
    for plan in plans if sound else []:
        plan.facts = stage_facts(plan)
        if isinstance(plan, RecordPlan):
            plan.placement = place_recording(plan, world_size, accelerator_bf16=accelerator_bf16)
            continue
        plan.placement = place(plan, world_size, accelerator_bf16=accelerator_bf16)
        path = f"stages[{plan.index}].data.micro_batch_size"
        written_at = where_written([(path, "")], written)[0][0]
        if written_at not in seen and (problem := _memory_problem(plan)):
            problems.append((path, problem))
            seen.add(written_at)

    warnings = [p for p in problems if missing_inputs_ok and _is_missing_input(p)]
    problems = [p for p in problems if p not in warnings]
    if warnings:
        planned = {plan.index for plan in plans}
        warnings += [(f"stages[{i}]", f"stage {stage.name!r} is not planned: its models cannot "
                      f"be built until the inputs above are there")
                     for i, stage in enumerate(stages) if stage is not None and i not in planned]
    problems = where_written(_not_misspelt(problems, written), written)
    if problems or header is None:
        raise SpecError(source, problems)
    spec = JobSpec.model_construct(**{**header.model_dump(), "stages": stages})
    return JobPlan(spec, source, plans, where_written(warnings, written))


def _memory_problem(plan: StagePlan) -> str | None:
    """Why the stage cannot fit on any machine, from its memory plan, or None."""
    memory = plan.placement.memory
    if memory.total <= MAX_RANK_MEMORY:
        return None
    return (f"stage {plan.name!r} needs {gib(memory.total)} per rank by its memory plan at "
            f"micro_batch_size "
            f"{plan.spec.data.micro_batch_size:,}, more than any accelerator or host has "
            f"({gib(MAX_RANK_MEMORY)}); 'launch/run.py --plan --gpu-memory 80GB' says what fits")


def _not_misspelt(problems: list[tuple[str, str]], written: dict) -> list[tuple[str, str]]:
    """Drops "stages[i].optimisation: required" when the top level has a misspelt key
    (``optimization``) that stands for it: its "unknown key; did you mean" says it all."""
    known = set(JobHeader.model_fields) | set(STAGE_DEFAULTS)
    meant = {near for key in written if isinstance(key, str) and key not in known
             for near in difflib.get_close_matches(key, STAGE_DEFAULTS, n=1, cutoff=0.6)}
    return [(path, message) for path, message in problems
            if not (message == "required, but missing"
                    and path.split(".", 1)[-1] in meant and path.startswith("stages["))]

