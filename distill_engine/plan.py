"""From YAML to a checked plan: every problem found before any weight or sample is touched.

``load_plan`` reads the spec (``spec_io``), validates it with pydantic stage by stage, then
checks what pydantic cannot see (``resolve``: stage references, files, batch arithmetic,
steps; ``model_checks``: meta-device builds of both models, taps, objective fit, weights
headers) and builds each stage's plan complete, in one place. All problems are raised
together as one ``SpecError``, each with its YAML path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from .families import InputShape, ModelRecipe
from .label_checks import check_labels
from .model_checks import ModelSummary, check_models, check_teacher_weights
from .resolve import (StageRefs, StepCount, check_batch, check_batch_against_data, check_files,
                      count_steps, global_batch, resolve_references)
from .problem_paths import where_written
from .spec import STAGE_DEFAULTS, JobHeader, JobSpec, StageSpec, with_stage_defaults
from .spec_io import SpecError, apply_overrides, pydantic_problems, read_yaml
from .text_checks import check_inputs

__all__ = ["JobPlan", "SpecError", "StagePlan", "load_plan"]


@dataclass
class StagePlan:
    """One stage, resolved: concrete model recipes and every fact the runtime needs."""

    index: int
    spec: StageSpec
    refs: StageRefs
    world_size: int
    input_shape: InputShape
    models: ModelSummary
    steps: StepCount

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dir(self) -> Path:
        return self.refs.dir

    @property
    def export_dir(self) -> Path:
        return self.refs.export_dir

    @property
    def teacher(self) -> ModelRecipe | None:
        return self.refs.teacher

    @property
    def student(self) -> ModelRecipe:
        return self.refs.student

    @property
    def student_init(self) -> Path | None:
        return self.refs.student_init

    @property
    def student_taps(self) -> list[str]:
        return self.refs.student_taps

    @property
    def teacher_taps(self) -> list[str]:
        return self.refs.teacher_taps

    @property
    def global_batch(self) -> int:
        return global_batch(self.spec, self.world_size)

    @property
    def lr(self) -> float:
        o = self.spec.optimisation
        return o.lr * self.global_batch / o.lr_base_batch if o.lr_base_batch else o.lr


@dataclass
class JobPlan:
    spec: JobSpec
    source: str
    stages: list[StagePlan]
    warnings: list[tuple[str, str]] = field(default_factory=list)


def input_shape(stage: StageSpec) -> InputShape:
    """What the models are traced on: the image side of the views, or the longest token
    sequence (memory is planned for full-length batches)."""
    text = stage.data.text
    return InputShape(image_size=stage.data.views.geometry.size,
                      **({"seq_len": text.max_length} if text is not None else {}))


def _is_missing_input(problem: tuple[str, str]) -> bool:
    """A weights file or shard directory that is not here (yet)."""
    path, message = problem
    return (path.endswith((".teacher.weights", ".student.init", ".data.train", ".data.eval"))
            and ("does not exist" in message or "a teacher needs weights" in message))


def load_plan(path: Path, overrides: list[str] | None = None, world_size: int = 1,
              missing_inputs_ok: bool = False) -> JobPlan:
    """``missing_inputs_ok`` (memory planning) turns missing weights files and shard
    directories into warnings: a memory plan needs shapes only, and paper-scale specs name
    weights and data that live on the cluster."""
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
    stages: list[StageSpec | None] = []
    for i, stage_raw in enumerate(raw_stages):
        try:
            stages.append(StageSpec.model_validate(stage_raw))
        except ValidationError as err:
            problems += pydantic_problems(err, ("stages", i), model=StageSpec)
            stages.append(None)
    raw_names = [s.get("name") if isinstance(s, dict) and isinstance(s.get("name"), str) else None
                 for s in raw_stages]
    run_dir = header.run_dir if header else Path(".")

    plans: list[StagePlan] = []
    all_refs = resolve_references(run_dir, stages, raw_names, problems)
    for i, (stage, refs) in enumerate(zip(stages, all_refs)):
        if stage is None or refs is None:
            continue
        here = f"stages[{i}]"
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
                ("teacher", refs.teacher, models.tap_shapes.teacher_model)) if model is not None},
                problems)
        if models is not None:
            plans.append(StagePlan(i, stage, refs, world_size, shape, models,
                                   count_steps(stage, world_size)))

    # Sizes the data allows but no machine holds, once everything the memory plan reads
    # (DeepSpeed configs, models) is known to be sound. One report per place the
    # micro-batch is written (stages inheriting a top-level value would each say the same).
    from .memory_plan import memory_problem  # it plans StagePlans: imported here, not above
    sound = not [p for p in problems if not (missing_inputs_ok and _is_missing_input(p))]
    seen: set[str] = set()
    for plan in plans if sound else []:
        path = f"stages[{plan.index}].data.micro_batch_size"
        written_at = where_written([(path, "")], written)[0][0]
        if written_at not in seen and (problem := memory_problem(plan)):
            problems.append((path, problem))
            seen.add(written_at)

    warnings = [p for p in problems if missing_inputs_ok and _is_missing_input(p)]
    problems = [p for p in problems if p not in warnings]
    problems = where_written(_not_misspelt(problems, written), written)
    if problems or header is None:
        raise SpecError(source, problems)
    spec = JobSpec.model_construct(**{**header.model_dump(), "stages": stages})
    return JobPlan(spec, source, plans, where_written(warnings, written))


def _not_misspelt(problems: list[tuple[str, str]], written: dict) -> list[tuple[str, str]]:
    """Drops "stages[i].optimisation: required" when the top level has a misspelt key
    (``optimization``) that stands for it: its "unknown key; did you mean" says it all."""
    import difflib
    known = set(JobHeader.model_fields) | set(STAGE_DEFAULTS)
    meant = {near for key in written if isinstance(key, str) and key not in known
             for near in difflib.get_close_matches(key, STAGE_DEFAULTS, n=1, cutoff=0.6)}
    return [(path, message) for path, message in problems
            if not (message == "required, but missing"
                    and path.split(".", 1)[-1] in meant and path.startswith("stages["))]

