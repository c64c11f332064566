"""One path into the models: what a model receives for its role, in training, evaluation
and the probe alike.

A batch holds one entry per input a model can take: a view per role (``teacher``,
``student``) or the shared ``image``; token ids per role or the shared ``tokens``. An
objective's ``prepare`` step may replace the student's entry (a masked copy) before the
forward, so that the model and the loss see the same mask.
"""

from __future__ import annotations

from typing import Any

import torch

# Entries shared by every role, looked up when a batch has no entry of the role's own.
SHARED_INPUTS = ("image", "tokens")
# Where an objective that replaces the student's entry (masked language modelling) keeps the
# entry it replaced, so that an objective needing the whole input (hidden-state matching)
# finds it whatever the order of the objectives.
ORIGINAL_STUDENT = "student/original"


def model_inputs(batch: dict[str, Any], role: str) -> Any:
    """The entry named after ``role``, else the shared one."""
    if role in batch:
        return batch[role]
    for shared in SHARED_INPUTS:
        if shared in batch:
            return batch[shared]
    raise KeyError(f"the batch has no input for the {role}: it holds {sorted(batch)}, "
                   f"expected {role!r} or one of {list(SHARED_INPUTS)}")


def original_student_inputs(batch: dict[str, Any]) -> Any:
    """The student's input before any objective's ``prepare`` replaced it."""
    return batch[ORIGINAL_STUDENT] if ORIGINAL_STUDENT in batch else model_inputs(batch, "student")


def to_model(inputs: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """Moves inputs to the model's device; floating tensors (pixels) take the model's dtype,
    integer ones (token ids, masks) keep theirs."""
    if isinstance(inputs, dict):
        return {k: to_model(v, device, dtype) for k, v in inputs.items()}
    if torch.is_tensor(inputs):
        return inputs.to(device, dtype if inputs.is_floating_point() else inputs.dtype,
                         non_blocking=True)
    return inputs
