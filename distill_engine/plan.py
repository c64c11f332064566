"""From YAML to a checked plan: every problem found before any weight or sample is touched.

``load_plan`` reads the YAML safely, applies ``--set`` overrides, validates the spec with
pydantic, then checks what pydantic cannot see: files, stage references, batch arithmetic
for the world size, and (on a meta-device build of both models, which costs no memory)
that every tap resolves and every objective fits the tap shapes. All problems are collected
and raised together as one ``SpecError``, each with its YAML path.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from . import models
from .models import ModelRecipe
from .objectives import ObjectiveError, TapShapes, build_objective
from .spec import JobHeader, JobSpec, StageSpec, with_stage_defaults
from .taps import tap_problem

EXPORT_DIR = "export"


class SpecError(Exception):
    """Every problem of a job spec, each with its YAML path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.problems)
        lines = [f"job spec {self.source} has {count} problem{'s' * (count != 1)}:"]
        lines += [f"  - {path}: {message}" if path else f"  - {message}"
                  for path, message in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- reading

MAX_SPEC_NODES = 100_000


def expanded_size(value: Any, memo: dict[int, int] | None = None) -> int:
    """How many values the YAML holds once its aliases are expanded (copying or validating
    expands them), counted without expanding: shared nodes are counted once per use."""
    memo = {} if memo is None else memo
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) not in memo:
        children = value.values() if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(expanded_size(child, memo) for child in children)
    return memo[id(value)]


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(str(path), [("", "the file does not exist")])
    try:
        raw = yaml.safe_load(path.read_text())  # data only: no tags that build objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(str(path), [("", f"not valid YAML ({where}{problem}); job specs are "
                                     "plain YAML data, without tags such as !!python")]) from None
    if not isinstance(raw, dict):
        raise SpecError(str(path), [("", "the top level must be a mapping with 'name', "
                                     "'run_dir' and 'stages'")])
    if expanded_size(raw) > MAX_SPEC_NODES:
        # A few nested aliases ("billion laughs") expand to gigabytes once copied.
        raise SpecError(str(path), [("", f"its aliases (*name) expand to more than "
                                     f"{MAX_SPEC_NODES:,} values; write the spec out or use "
                                     "the top-level defaults that stages inherit")])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``a.b.0.c=value``: the value is parsed as YAML (so 3e-4, true, [1, 2] work)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((f"--set {item}", "expected KEY=VALUE, e.g. stages.0.optimisation.lr=1e-3"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = raw
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append((key, f"--set cannot reach this path in {source}"))
    if problems:
        raise SpecError(source, problems)
    return raw


def yaml_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif i > 0 and loc[i - 1] is not None and isinstance(loc[i - 1], int) and \
                i >= 2 and loc[i - 2] == "objectives":
            continue  # the discriminator tag pydantic inserts ("feature") is not a YAML key
        else:
            text += f".{part}" if text else str(part)
    return text


def _pydantic_problems(err: ValidationError, prefix: tuple = ()) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and its section)"
        elif e["type"] == "missing":
            message = "required, but missing"
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            message += f" (got {reprlib.repr(e['input'])})"  # bounded, however big the input
        problems.append((yaml_path(prefix + tuple(e["loc"])), message.removeprefix("Value error, ")))
    return problems


# ---------------------------------------------------------------------------- the plan

@dataclass
class StagePlan:
    """One stage, resolved: concrete model recipes and the facts the runtime needs."""

    index: int
    spec: StageSpec
    dir: Path
    teacher: ModelRecipe | None
    student: ModelRecipe
    student_init: Path | None              # weights to start from (None: random init)
    student_taps: list[str]
    teacher_taps: list[str]
    world_size: int
    teacher_params: int = 0
    teacher_params_kept: int = 0
    student_params: int = 0
    head_params: int = 0
    frozen_student: list[str] = field(default_factory=list)   # modules, for display
    frozen_params: list[str] = field(default_factory=list)    # what is actually frozen
    pruned_teacher: list[str] = field(default_factory=list)
    tap_shapes: TapShapes | None = None
    teacher_trace: models.Trace | None = None   # module order, to prune the real teacher

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def export_dir(self) -> Path:
        return self.dir / EXPORT_DIR

    @property
    def global_batch(self) -> int:
        d, o = self.spec.data, self.spec.optimisation
        return d.micro_batch_size * self.world_size * o.gradient_accumulation_steps

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


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and "{" not in url


def _index_of(url: str) -> dict[str, Any] | None:
    path = Path(url)
    index = path / "index.json" if path.is_dir() else path
    if index.suffix == ".json" and index.is_file():
        try:
            return json.loads(index.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _resolve(run_dir: Path, stages: list[StageSpec | None], raw_names: list[str | None],
             problems: list[tuple[str, str]], world_size: int) -> list[StagePlan | None]:
    """Stage references, files and batch arithmetic. Stages that failed pydantic validation
    are None: they are skipped, and references to them are not reported twice."""
    plans: list[StagePlan | None] = []
    names: dict[str, int] = {}
    for i, stage in enumerate(stages):
        here = f"stages[{i}]"
        if stage is None:
            if raw_names[i] is not None:
                names.setdefault(raw_names[i], i)
            plans.append(None)
            continue
        if stage.name in names:
            problems.append((f"{here}.name", f"stage name {stage.name!r} is used twice"))
        names.setdefault(stage.name, i)

        def earlier(ref: str, path: str) -> StagePlan | None:
            target = ref.split(":", 1)[1]
            if target == stage.name:
                problems.append((path, f"stage {stage.name!r} refers to itself"))
            elif target not in names or names[target] >= i:
                known = [p.name for p in plans if p is not None]
                problems.append((path, f"{ref!r} is not an earlier stage; earlier stages: {known}"))
            else:
                return plans[names[target]]  # None if that stage is itself invalid
            return None

        # student architecture and initialisation
        student = None
        if stage.student.arch.startswith("stage:"):
            source = earlier(stage.student.arch, f"{here}.student.arch")
            if source:
                student = ModelRecipe(source.student.arch,
                                      {**source.student.kwargs, **stage.student.kwargs})
        else:
            student = ModelRecipe(stage.student.arch, dict(stage.student.kwargs))
        student_init = None
        if stage.student.init.startswith("stage:"):
            source = earlier(stage.student.init, f"{here}.student.init")
            if source:
                student_init = source.export_dir / "model.safetensors"
        elif stage.student.init != "scratch":
            student_init = Path(stage.student.init)
            if not student_init.is_file():
                problems.append((f"{here}.student.init",
                                 f"weights file {student_init} does not exist (or use 'scratch' "
                                 "or 'stage:NAME')"))

        # teacher
        teacher = None
        if stage.teacher is not None:
            if stage.teacher.arch.startswith("stage:"):
                source = earlier(stage.teacher.arch, f"{here}.teacher.arch")
                if source:
                    teacher = ModelRecipe(source.student.arch, source.student.kwargs,
                                          source.export_dir / "model.safetensors")
            else:
                teacher = ModelRecipe(stage.teacher.arch, dict(stage.teacher.kwargs),
                                      stage.teacher.weights)
                if stage.teacher.weights is not None and not stage.teacher.weights.is_file():
                    problems.append((f"{here}.teacher.weights",
                                     f"weights file {stage.teacher.weights} does not exist"))
                elif stage.teacher.weights is None:
                    problems.append((f"{here}.teacher.weights",
                                     "a teacher needs weights: a local .safetensors or torch "
                                     "state-dict file (teachers are never randomly initialised)"))

        for role, recipe in (("student", student), ("teacher", teacher)):
            if recipe is None:
                continue
            if recipe.family == "timm" and not models.timm_architecture_exists(recipe.name):
                problems.append((f"{here}.{role}.arch", f"timm has no architecture {recipe.name!r}"))
            if recipe.family == "hf" and not (Path(recipe.name) / "config.json").is_file():
                problems.append((f"{here}.{role}.arch",
                                 f"{recipe.name} is not a Hugging Face model directory "
                                 "(no config.json)"))

        # files the runtime will read
        for key in ("teacher_config", "student_config"):
            path = getattr(stage.deepspeed, key)
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
        if stage.eval is not None and data.eval is None:
            problems.append((f"{here}.eval", "evaluation needs held-out shards in data.eval"))

        # batch arithmetic
        opt = stage.optimisation
        global_batch = data.micro_batch_size * world_size * opt.gradient_accumulation_steps
        if data.global_batch_size is not None and data.global_batch_size != global_batch:
            problems.append((f"{here}.data.global_batch_size",
                             f"{data.global_batch_size} != micro_batch_size {data.micro_batch_size} "
                             f"x {world_size} ranks x gradient_accumulation_steps "
                             f"{opt.gradient_accumulation_steps} = {global_batch}; change one of them"))

        taps_s = sorted({t for o in stage.objectives for t in o.student_taps()})
        taps_t = sorted({t for o in stage.objectives for t in o.teacher_taps()})
        plans.append(StagePlan(i, stage, run_dir / stage.name, teacher, student, student_init,
                               taps_s, taps_t, world_size) if student is not None else None)
    return plans


def _check_models(plan: StagePlan, problems: list[tuple[str, str]]) -> None:
    """Meta-device build and forward of both models: taps, shapes, objective fit."""
    here = f"stages[{plan.index}]"
    stage = plan.spec
    size = stage.data.views.geometry.size
    built: dict[str, tuple[torch.nn.Module, models.Trace]] = {}
    for role, recipe, taps in (("student", plan.student, plan.student_taps),
                               ("teacher", plan.teacher, plan.teacher_taps)):
        if recipe is None or (recipe.family == "timm" and
                              not models.timm_architecture_exists(recipe.name)):
            continue  # already reported
        try:
            with torch.device("meta"):
                model = (models.create_student(recipe, stage.student.drop_path_rate,
                                               stage.student.drop_path_schedule)
                         if role == "student" else models.create_model(recipe))
        except Exception as err:  # timm/transformers reject bad kwargs with varied types
            problems.append((f"{here}.{role}.kwargs", f"cannot build {recipe.arch} with "
                             f"{recipe.kwargs}: {err}"))
            continue
        bad = {t: p for t in taps if (p := tap_problem(model, t))}
        for j, objective in enumerate(stage.objectives):
            for key, value in objective:
                if key.startswith(role) and value in bad:
                    problems.append((f"{here}.objectives[{j}].{key}", f"{role} {bad[value]}"))
        try:
            traced = models.trace(model, models.example_input(model, recipe, size))
        except Exception as err:
            problems.append((f"{here}.{role}", f"a forward of {recipe.arch} on "
                             f"{size}x{size} inputs (data.views.geometry.size) fails: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"))
            continue
        if bad:
            continue
        built[role] = (model, traced)
        count = sum(p.numel() for p in model.parameters())
        if role == "student":
            plan.student_params = count
            if stage.student.freeze_unused:
                plan.frozen_params = models.unreachable_parameters(model, traced, taps)
                deepest = models.deepest_tap(traced, taps)
                plan.frozen_student = [
                    m for m in (models.modules_after(traced, deepest) if deepest else [])
                    if any(p.startswith(m + ".") for p in plan.frozen_params)]
        else:
            plan.teacher_params = count
            plan.teacher_trace = traced
            removed = models.prune_after(model, traced, taps)
            plan.pruned_teacher = removed
            plan.teacher_params_kept = sum(p.numel() for p in model.parameters())
        if role == "student" and plan.student_init is not None and plan.student_init.is_file():
            _check_weights(model, plan.student_init, f"{here}.student.init", problems,
                           head=models.classifier_prefixes(model))

    if "student" not in built:
        return
    if plan.teacher is not None and "teacher" not in built:
        return
    teacher_model, teacher_trace = built.get("teacher", (None, None))
    student_model, student_trace = built["student"]
    plan.tap_shapes = TapShapes(
        student={t: student_trace.shapes.get(t, ()) for t in plan.student_taps},
        teacher={t: teacher_trace.shapes.get(t, ()) for t in plan.teacher_taps} if teacher_trace else {},
        student_model=student_model, teacher_model=teacher_model)
    heads = 0
    for j, objective in enumerate(stage.objectives):
        try:
            with torch.device("meta"):
                module = build_objective(objective, plan.tap_shapes)
            heads += sum(p.numel() for p in module.parameters())
        except ObjectiveError as err:
            problems.append((f"{here}.objectives[{j}]", str(err)))
    plan.head_params = heads


def _check_weights(model: torch.nn.Module, path: Path, where: str,
                   problems: list[tuple[str, str]], head: tuple[str, ...] = ()) -> None:
    """Compares key names and shapes from the file header, without reading tensors.
    ``head``: classifier prefixes that may start fresh (initialising a student)."""
    shapes = models.weight_shapes(path)
    if isinstance(shapes, str):
        problems.append((where, shapes))
        return
    want = models.expected_shapes(model)
    problem = models.shape_problems(want, shapes, path,
                                    fresh=models.fresh_head_keys(want, shapes, head))
    if problem:
        problems.append((where, problem))


def _is_missing_input(problem: tuple[str, str]) -> bool:
    """A weights file or shard directory that is not here (yet)."""
    path, message = problem
    return (path.endswith((".teacher.weights", ".student.init", ".data.train", ".data.eval"))
            and ("does not exist" in message or "a teacher needs weights" in message))


def load_plan(path: Path, overrides: list[str] | None = None, world_size: int = 1,
              check_models: bool = True, missing_inputs_ok: bool = False) -> JobPlan:
    """``missing_inputs_ok`` (memory planning) turns missing weights files and shard
    directories into warnings: a memory plan needs shapes only, and paper-scale specs name
    weights and data that live on the cluster."""
    source = str(path)
    raw = with_stage_defaults(apply_overrides(read_yaml(path), list(overrides or []), source))
    problems: list[tuple[str, str]] = []
    try:
        header = JobHeader.model_validate(raw)
    except ValidationError as err:
        problems += _pydantic_problems(err)
        header = None
    # Each stage on its own, so that one broken stage does not hide the others' problems.
    stages: list[StageSpec | None] = []
    for i, stage_raw in enumerate(raw.get("stages") or [] if isinstance(raw.get("stages"), list) else []):
        try:
            stages.append(StageSpec.model_validate(stage_raw))
        except ValidationError as err:
            problems += _pydantic_problems(err, ("stages", i))
            stages.append(None)
    run_dir = header.run_dir if header else Path(".")
    raw_names = [s.get("name") if isinstance(s, dict) and isinstance(s.get("name"), str) else None
                 for s in raw.get("stages") or []] if isinstance(raw.get("stages"), list) else []
    plans = _resolve(run_dir, stages, raw_names, problems, world_size)
    if check_models:
        for plan in plans:
            if plan is not None:
                _check_models(plan, problems)
                _check_teacher_weights(plan, problems)
    warnings = [p for p in problems if missing_inputs_ok and _is_missing_input(p)]
    problems = [p for p in problems if p not in warnings]
    if problems or header is None:
        raise SpecError(source, _unique(problems))
    spec = JobSpec.model_construct(**{**header.model_dump(), "stages": stages})
    return JobPlan(spec, source, plans, _unique(warnings))


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(problems))


def _check_teacher_weights(plan: StagePlan, problems: list[tuple[str, str]]) -> None:
    recipe = plan.teacher
    if recipe is None or recipe.weights is None or not recipe.weights.is_file():
        return
    if recipe.family == "timm" and not models.timm_architecture_exists(recipe.name):
        return
    try:
        with torch.device("meta"):
            model = models.create_model(recipe)
    except Exception:  # bad kwargs: _check_models has reported them already
        return
    _check_weights(model, recipe.weights, f"stages[{plan.index}].teacher.weights", problems)


def steps_of(plan: StagePlan, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps in the stage, warm-up steps), from steps or epochs."""
    opt = plan.spec.optimisation
    steps_per_epoch = batches_per_epoch / opt.gradient_accumulation_steps
    total = opt.steps if opt.steps is not None else max(1, math.ceil(opt.epochs * steps_per_epoch))
    warmup = (opt.warmup_steps if opt.warmup_epochs is None
              else math.ceil(opt.warmup_epochs * steps_per_epoch))
    return total, min(warmup, max(total - 1, 0))
