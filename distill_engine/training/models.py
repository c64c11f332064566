"""The root modules that DeepSpeed wraps: a frozen teacher that returns its taps, and the
student with the objectives' heads.

ZeRO-3 gathers a parameter only inside the forward of the module that owns it, and the
engine calls only the root module's ``forward``. So everything a model is asked for runs
inside one root ``forward``; nothing calls into a partitioned model from outside.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from distill_engine.families import ModelFamily
from distill_engine.modeling.taps import OUTPUT, Taps
from distill_engine.objectives import Objective


class TappedModel(nn.Module):
    """A root module whose taps are attached only after ``deepspeed.initialize``.

    ZeRO-3 wraps every module's output in a forward hook so that the module's parameters
    are gathered again for its backward. A tap must capture that wrapped output, so our
    hooks have to run after DeepSpeed's, i.e. be registered after the engine exists.
    """

    def __init__(self, model: nn.Module, family: ModelFamily):
        super().__init__()
        self.model = model
        self.family = family
        self.tap_hooks: Taps | None = None

    def attach_taps(self, names: list[str]) -> None:
        self.tap_hooks = Taps(self.model, names)

    def tapped_pass(self, inputs: Any) -> dict[str, Any]:
        """One forward of the model: its taps, and its output tensor as ``output``."""
        with self.tap_hooks.capture() as captured:
            output = self.family.forward(self.model, inputs)
        return {**captured, OUTPUT: self.family.output_tensor(output)}


class TeacherModel(TappedModel):
    """Frozen teacher: one forward returns the requested taps."""

    @torch.no_grad()
    def forward(self, inputs: Any) -> dict[str, Any]:
        taps = self.tapped_pass(inputs)
        if OUTPUT in self.tap_hooks.names:
            return taps
        return {k: v for k, v in taps.items() if k != OUTPUT}


class LocalTeacher(nn.Module):
    """A replicated teacher: the engine's interface (``module``, a call) without DeepSpeed,
    which has nothing to do for a frozen model that every rank holds whole."""

    def __init__(self, module: TeacherModel):
        super().__init__()
        self.module = module

    def forward(self, inputs: Any) -> dict[str, Any]:
        return self.module(inputs)


class StudentModel(TappedModel):
    """The student and the objectives (with their heads) in one root module.

    Five entry points, each a method: ``loss`` (training), ``output`` (evaluation of a
    head), ``taps`` (the probe beside an export), ``features`` (kNN evaluation),
    ``teacherless_terms`` (the held-out loss evaluation). The
    engine calls only ``forward``, so each is reached through it, named by the method
    itself: ``engine(StudentModel.loss, inputs, teacher_taps, batch)``.
    """

    ENTRY_POINTS: tuple[Callable, ...] = ()  # filled below, once the methods exist

    def __init__(self, model: nn.Module, family: ModelFamily, objectives: list[Objective]):
        super().__init__(model, family)
        self.objectives = nn.ModuleList(objectives)

    def forward(self, entry: Callable, *args: Any) -> Any:
        if entry not in self.ENTRY_POINTS:
            raise TypeError(f"{entry!r} is not an entry point of StudentModel; call the engine "
                            f"with one of {[e.__name__ for e in self.ENTRY_POINTS]}")
        return entry(self, *args)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Each objective's ``prepare`` step, in order (a mask both the forward and the
        losses see). Draws random numbers only: runs outside the engine."""
        for objective in self.objectives:
            batch = objective.prepare(batch, generator)
        return batch

    def loss(self, inputs: Any, teacher_taps: dict[str, Any], batch: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total loss and the unweighted term of each objective."""
        student_taps = self.tapped_pass(inputs)
        # Objectives may run the student again (an unmasked pass beside a masked one): still
        # inside this root forward, so ZeRO-3 gathers and releases as for the first pass.
        terms = {o.config.label: o(student_taps, teacher_taps, batch, self.tapped_pass)
                 for o in self.objectives}
        total = sum(o.config.weight * terms[o.config.label] for o in self.objectives)
        # ZeRO-3 re-gathers a module's own parameters (a ViT's cls_token, pos_embed) for the
        # backward pass only when a gradient reaches that module's output. When every
        # objective reads intermediate taps, the model's output is off the loss graph; a
        # zero-weighted term puts it back on, at the cost of a backward through the head.
        output = student_taps[OUTPUT]
        if torch.is_tensor(output) and output.requires_grad:
            total = total + 0.0 * output.float().sum()
        return total, terms

    def teacherless_terms(self, inputs: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The unweighted term of each objective that needs no teacher (mae, mlm,
        cross_entropy), from one pass: what the held-out loss evaluation measures."""
        student_taps = self.tapped_pass(inputs)
        return {o.config.label: o(student_taps, {}, batch, self.tapped_pass)
                for o in self.objectives if not o.config.needs_teacher}

    def output(self, inputs: Any) -> torch.Tensor:
        """The model's output tensor (logits for a classifier)."""
        return self.family.output_tensor(self.family.forward(self.model, inputs))

    def taps(self, inputs: Any) -> dict[str, Any]:
        """The student's taps and output on ``inputs``."""
        return self.tapped_pass(inputs)

    def features(self, inputs: Any) -> torch.Tensor:
        """The pooled representation [B, D] that a kNN evaluation compares."""
        return self.family.features(self.model, inputs)


StudentModel.ENTRY_POINTS = (StudentModel.loss, StudentModel.output, StudentModel.taps,
                             StudentModel.features, StudentModel.teacherless_terms)
