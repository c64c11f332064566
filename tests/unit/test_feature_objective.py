"""Feature Distillation's loss, against the formula written out independently."""

import torch

from distill_engine.objectives import TapShapes, build_objective
from distill_engine.objectives.feature import FeatureConfig, feature_distillation_loss


def reference_fd_loss(student, weight, bias, teacher, beta=2.0, eps=1e-5):
    """methods.md §1, element by element: whiten the teacher, project the student, SmoothL1."""
    mean = teacher.mean(-1, keepdim=True)
    var = ((teacher - mean) ** 2).mean(-1, keepdim=True)
    target = (teacher - mean) / torch.sqrt(var + eps)
    projected = torch.einsum("bnc,dc->bnd", student, weight) + bias
    error = (projected - target).abs()
    per_element = torch.where(error < beta, 0.5 * error ** 2 / beta, error - 0.5 * beta)
    return per_element.sum() / per_element.numel()


def test_fd_loss_equals_the_formula_on_random_inputs():
    torch.manual_seed(0)
    shapes = TapShapes(student={"norm": (4, 17, 48)}, teacher={"norm": (4, 17, 96)})
    objective = build_objective(FeatureConfig(), shapes)
    student = torch.randn(4, 17, 48) * 3
    teacher = torch.randn(4, 17, 96) * 5 + 2
    got = objective({"norm": student}, {"norm": teacher}, {})
    want = reference_fd_loss(student, objective.projection.weight, objective.projection.bias, teacher)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Both branches of SmoothL1 were exercised, so the comparison means something.
    error = (objective.projection(student) - torch.nn.functional.layer_norm(teacher, (96,))).abs()
    assert (error < 2.0).any() and (error >= 2.0).any()


def test_fd_beta_changes_the_loss():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 8) * 4, torch.randn(2, 5, 8)
    assert not torch.isclose(feature_distillation_loss(s, t, beta=2.0),
                             feature_distillation_loss(s, t, beta=0.5))


def test_fd_projection_maps_student_width_to_teacher_width():
    shapes = TapShapes(student={"blocks.3": (1, 65, 64)}, teacher={"norm": (1, 65, 192)})
    objective = build_objective(FeatureConfig(student_tap="blocks.3"), shapes)
    assert objective.projection.weight.shape == (192, 64)
    assert objective.projection.bias is not None


def test_fd_on_a_swin_token_grid_equals_fd_on_the_flattened_tokens():
    torch.manual_seed(2)
    grid = build_objective(FeatureConfig(), TapShapes(student={"norm": (2, 3, 3, 8)},
                                                      teacher={"norm": (2, 3, 3, 16)}))
    student, teacher = torch.randn(2, 3, 3, 8) * 3, torch.randn(2, 3, 3, 16)
    got = grid({"norm": student}, {"norm": teacher}, {})
    want = reference_fd_loss(student.flatten(1, 2), grid.projection.weight, grid.projection.bias,
                             teacher.flatten(1, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_gradient_reaches_the_teacher():
    """The target is a constant: a caller outside the engine, whose teacher tensor requires
    grad, must not push gradients into the teacher."""
    teacher = torch.randn(2, 5, 8, requires_grad=True)
    student = torch.randn(2, 5, 8, requires_grad=True)
    feature_distillation_loss(student, teacher * 3).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0
