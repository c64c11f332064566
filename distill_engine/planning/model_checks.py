"""Both models of a stage built on the meta device (no memory, no weights) and traced once:
every tap resolves, every objective fits the tap shapes, weights files fit by name and
shape, and what the runtime will prune from the teacher and freeze in the student."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill_engine import weights
from distill_engine.families import InputShape, ModelFamily, ModelRecipe, arch_problem
from distill_engine.modeling import tracing
from distill_engine.modeling.taps import tap_problem
from distill_engine.objectives import ObjectiveError, TapShapes, build_objective
from distill_engine.spec.schema import STAGE_REF, StageSpec
from distill_engine.spec.size_limits import kwargs_problems, params_problem

from .job import ModelSummary, Problems, StageRefs


def build_meta(recipe: ModelRecipe, stage: StageSpec, role: str) -> nn.Module:
    """The model as the runtime will build it, on the meta device."""
    with torch.device("meta"):
        if role == "student":
            return recipe.family.create(recipe, stage.student.drop_path_rate,
                                        stage.student.drop_path_schedule)
        return recipe.family.create(recipe)


def check_models(index: int, stage: StageSpec, refs: StageRefs, shape: InputShape,
                 problems: Problems) -> ModelSummary | None:
    """None when a model cannot be built or traced, or a tap does not resolve (each problem
    is appended with its YAML path). The teacher is the live one, or the one whose recorded
    targets the stage reads (built on the meta device all the same: its tap shapes and
    modules are what the objectives fit); a recording stage has a teacher only."""
    here = f"stages[{index}]"
    built: dict[str, tuple[nn.Module, tracing.Trace]] = {}
    teacher_recipe = refs.traced_teacher
    for role, recipe, taps in (("student", refs.student, refs.student_taps),
                               ("teacher", teacher_recipe, refs.teacher_taps)):
        if recipe is None or arch_problem(recipe.arch):
            continue  # no teacher, or already reported
        if not sane_sizes(recipe, getattr(stage, role), f"{here}.{role}", problems):
            continue
        try:
            model = build_meta(recipe, stage, role)
        except Exception as err:  # timm/transformers reject bad kwargs with varied types
            problems.append((f"{here}.{role}.kwargs", f"cannot build {recipe.arch} with "
                             f"{recipe.kwargs}: {err}"))
            continue
        if problem := params_problem(_count(model)):
            problems.append((f"{here}.{role}.kwargs", problem))
            continue
        bad = {t: p for t in taps if (p := tap_problem(model, t))}
        for j, objective in enumerate(stage.objectives):
            for key, value in objective:
                if key.startswith(role) and value in bad:
                    problems.append((f"{here}.objectives[{j}].{key}", f"{role} {bad[value]}"))
        try:
            traced = tracing.trace(model, recipe.family, recipe.family.example_input(model, shape))
        except Exception as err:
            problems.append((f"{here}.{role}", f"a forward of {recipe.arch} on "
                             f"{describe(shape, model, recipe)} fails: {_first_line(err)}"))
            continue
        if not bad:
            built[role] = (model, traced)
    if "student" in built and refs.student_init is not None and refs.student_init.is_file():
        model = built["student"][0]
        family = refs.student.family
        try:
            head, ignore = family.classifier_prefixes(model), family.init_extra_modules(model)
        except Exception as err:  # a family's own failure, reported where it applies
            problems.append((f"{here}.student.init", f"{refs.student.arch}: cannot tell which "
                             f"keys of {refs.student_init} the student takes: {_first_line(err)}"))
        else:
            check_weights_file(model, refs.student_init, f"{here}.student.init", problems,
                               head=head, ignore=ignore, family=family)
    if teacher_recipe is not None and "teacher" not in built:
        return None
    if refs.student is None:  # a recording stage: the teacher alone
        return _teacher_summary(ModelSummary(TapShapes(), 0, 0), refs, *built["teacher"])
    if "student" not in built:
        return None

    student_model, student_trace = built["student"]
    teacher_model, teacher_trace = built.get("teacher", (None, None))
    summary = ModelSummary(
        tap_shapes=TapShapes(
            student={t: student_trace.shapes.get(t, ()) for t in refs.student_taps},
            teacher={t: teacher_trace.shapes.get(t, ()) for t in refs.teacher_taps}
            if teacher_trace else {},
            student_model=student_model, teacher_model=teacher_model,
            student_tokenizer=stage.data.text.for_role("student") if stage.data.text else None),
        student_params=_count(student_model), head_params=0,
        student_output=student_trace.shapes.get(tracing.OUTPUT, ()))
    if stage.student.freeze_unused:
        summary.frozen_params = tracing.unreachable_parameters(student_model, student_trace,
                                                               refs.student_taps)
        deepest = tracing.deepest_tap(student_trace, refs.student_taps)
        summary.frozen_student = [
            m for m in (tracing.modules_after(student_trace, deepest) if deepest else [])
            if any(p.startswith(m + ".") for p in summary.frozen_params)]
    if teacher_model is not None:
        _teacher_summary(summary, refs, teacher_model, teacher_trace)
    for j, objective in enumerate(stage.objectives):
        try:
            with torch.device("meta"):
                summary.head_params += _count(build_objective(objective, summary.tap_shapes))
        except ObjectiveError as err:
            field = f".{err.field}" if err.field else ""
            problems.append((f"{here}.objectives[{j}]{field}", str(err)))
        except Exception as err:  # any other failure of an objective is still its problem
            problems.append((f"{here}.objectives[{j}]", (
                f"the {objective.kind} objective cannot be built for these models: "
                f"{type(err).__name__}: {_first_line(err)}")))
    return summary


def _teacher_summary(summary: ModelSummary, refs: StageRefs, model: nn.Module,
                     trace: tracing.Trace) -> ModelSummary:
    summary.tap_shapes.teacher = {t: trace.shapes.get(t, ()) for t in refs.teacher_taps}
    summary.tap_shapes.teacher_model = model
    summary.teacher_params = _count(model)
    summary.teacher_trace = trace
    summary.pruned_teacher = tracing.prune_after(model, trace, refs.teacher_taps)
    summary.teacher_params_kept = _count(model)
    return summary


def sane_sizes(recipe: ModelRecipe, written, where: str, problems: Problems) -> bool:
    """Whether the recipe's size-like kwargs, and those of its architecture's config file
    (``hf:DIR``), are sane enough to build (``size_limits``). ``written``: the role's spec
    section; what is inherited from an earlier stage (``stage:NAME``) was reported there."""
    in_kwargs, in_file = size_problems(recipe)
    problems.extend((f"{where}.kwargs.{key}", message) for key, message in in_kwargs
                    if key in written.kwargs)
    if written.arch is not None and not written.arch.startswith(STAGE_REF):
        problems.extend((f"{where}.arch", message) for message in in_file)
    return not in_kwargs and not in_file


def size_problems(recipe: ModelRecipe) -> tuple[list[tuple[str, str]], list[str]]:
    """(key, message) for the kwargs out of their limits; messages (naming the file) for
    the values of the architecture's config file out of theirs."""
    in_file = recipe.family.file_sizes(recipe)
    return kwargs_problems(recipe.kwargs), [
        f"{in_file[0]}: {message}" for _, message in kwargs_problems(in_file[1])] if in_file else []


def check_teacher_weights(index: int, stage: StageSpec, refs: StageRefs, problems: Problems) -> None:
    """The teacher's weights file against its whole (unpruned) architecture."""
    recipe = refs.teacher
    if recipe is None or recipe.weights is None or not recipe.weights.is_file():
        return
    if arch_problem(recipe.arch) or any(size_problems(recipe)):
        return  # reported by check_models
    try:
        model = build_meta(recipe, stage, "teacher")
    except Exception:  # bad kwargs: check_models has reported them already
        return
    check_weights_file(model, recipe.weights, f"stages[{index}].teacher.weights", problems,
                       family=recipe.family)


def check_weights_file(model: nn.Module, path: Path, where: str, problems: Problems,
                       head: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
                       family: ModelFamily | None = None) -> None:
    """Compares key names and shapes from the file header, without reading tensors.
    ``head``: classifier prefixes that may start fresh (initialising a student);
    ``ignore``: modules the file may hold beyond the model's own;
    ``family``: renames the file's keys as the runtime will (``adapt_state_keys``)."""
    shapes = weights.weight_shapes(path)
    if isinstance(shapes, str):
        problems.append((where, shapes))
        return
    if family is not None:
        try:
            shapes = family.adapt_state_keys(model, shapes)
        except Exception as err:  # a family's own failure, reported where it applies
            problems.append((where, f"the {family.prefix} family cannot match the keys of "
                             f"{path} to the model: {_first_line(err)}"))
            return
    want = weights.expected_shapes(model)
    problem = weights.shape_problems(want, shapes, path, ignore=ignore,
                                     fresh=weights.fresh_head_keys(want, shapes, head))
    if problem:
        problems.append((where, problem))


def describe(shape: InputShape, model: nn.Module, recipe: ModelRecipe) -> str:
    try:
        inputs = recipe.family.example_input(model, shape)
    except Exception:  # the forward's failure is the one reported
        return "its example input"
    if isinstance(inputs, dict) and "input_ids" in inputs:
        return f"sequences of {shape.seq_len} tokens"
    return f"{shape.image_size}x{shape.image_size} inputs (data.views.geometry.size)"


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
