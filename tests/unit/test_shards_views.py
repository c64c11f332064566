"""Views: one crop box and flip per sample shared by every view; views differ only where configured."""

import pytest
import torch
from pydantic import ValidationError

from data_shards import GeometryConfig, ViewConfig, ViewsConfig
from data_shards.views import NORMALIZE, make_views, sample_geometry


def coordinate_image(height: int = 60, width: int = 80) -> torch.Tensor:
    """Red encodes x and green encodes y (both < 128), so a view's pixels reveal its crop box and flip."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs + 20, ys + 20, torch.full_like(xs, 60)]).to(torch.uint8)


def unnormalize(view: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZE[name])
    return view * std + mean


def recovered_box(view01: torch.Tensor) -> tuple[int, int, int, int]:
    xs, ys = (view01[0] * 255).round() - 20, (view01[1] * 255).round() - 20
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


GEOMETRY = GeometryConfig(size=64, scale=(0.2, 0.6), interpolation="nearest", hflip=0.5)  # upsampling keeps every source pixel


@pytest.mark.parametrize("seed", range(6))
def test_teacher_and_student_share_crop_and_flip_and_differ_only_in_colour(seed):
    config = ViewsConfig(
        geometry=GEOMETRY,
        views={"teacher": ViewConfig(normalize="clip"), "student": ViewConfig(color_jitter=(0.4, 0.0, 0.0), normalize="none")},
    )
    views = make_views(coordinate_image(), config, seed)
    teacher = unnormalize(views["teacher"], "clip")
    student = views["student"]
    geometry = sample_geometry(60, 80, GEOMETRY, seed)
    top, left, bottom, right = recovered_box(teacher)
    # The teacher view shows the sampled box (nearest interpolation keeps the corner pixels).
    assert (top, left) == (geometry.top, geometry.left)
    assert (bottom, right) == (geometry.top + geometry.height - 1, geometry.left + geometry.width - 1)
    flipped = bool(teacher[0, 0, 0] > teacher[0, 0, -1])
    assert flipped == geometry.flip
    # Brightness only: the student is the same crop scaled by one factor, pixel for pixel.
    ratio = student / teacher
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), atol=1e-4)


def test_views_without_differences_are_identical_and_seeds_change_geometry():
    config = ViewsConfig(geometry=GEOMETRY, views={"a": ViewConfig(), "b": ViewConfig()})
    views = make_views(coordinate_image(), config, seed=3)
    assert torch.equal(views["a"], views["b"])
    boxes = {sample_geometry(60, 80, GEOMETRY, seed) for seed in range(20)}
    assert len(boxes) > 15
    assert torch.equal(make_views(coordinate_image(), config, seed=3)["a"], views["a"])  # pure function of the seed


def test_center_and_resize_geometry_are_deterministic():
    assert sample_geometry(60, 80, GeometryConfig(crop="center", hflip=0), 1) == sample_geometry(60, 80, GeometryConfig(crop="center", hflip=0), 2)
    center = sample_geometry(60, 80, GeometryConfig(crop="center", hflip=0), 1)
    assert (center.top, center.left, center.height, center.width, center.flip) == (0, 10, 60, 60, False)
    resize = sample_geometry(60, 80, GeometryConfig(crop="resize", hflip=0), 1)
    assert (resize.height, resize.width) == (60, 80)


def test_colour_jitter_on_all_three_channels_changes_only_the_jittered_view():
    config = ViewsConfig(geometry=GEOMETRY, views={"plain": ViewConfig(normalize="none"), "jittered": ViewConfig(color_jitter=0.4, normalize="none")})
    differing = 0
    for seed in range(4):
        views = make_views(coordinate_image(), config, seed)
        assert views["plain"].shape == views["jittered"].shape == (3, 64, 64)
        differing += not torch.allclose(views["plain"], views["jittered"])
    assert differing == 4


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"geometry": {"scale": (0.5, 0.2)}}, "scale"),
        ({"geometry": {"scale": (0.0, 1.0)}}, "scale"),
        ({"geometry": {"ratio": (2.0, 1.0)}}, "ratio"),
        ({"geometry": {"hflip": 1.5}}, "hflip"),
        ({"geometry": {"size": 0}}, "size"),
        ({"geometry": {"sise": 3}}, "sise"),
        ({"views": {"label": {}}}, "clash"),
        ({"views": {"s": {"normalize": "cifar"}}}, "normalize"),
        ({"views": {"s": {"color_jitter": -0.1}}}, "color_jitter"),
    ],
)
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        ViewsConfig.model_validate(bad)
