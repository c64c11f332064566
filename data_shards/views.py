"""Views of one image: one geometry shared by all views, then per-view colour and normalisation.

TinyMIM-style distillation wants a teacher view and a student view of the same crop that differ
only in colour jitter; a CLIP teacher wants its own mean/std. So the crop box and the flip are
sampled once per sample, applied once, and each view then adds its own colour jitter and
normalisation. All randomness comes from a per-sample seed, so a sample's views are a pure
function of (image, config, seed); and every random decision is drawn first, as explicit
parameters (``ViewParams``), then applied, so that recorded parameters replay a view exactly.
"""

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .keys import derive_seed

Triple = tuple[float, float, float]
NORMALIZE: dict[str, tuple[Triple, Triple]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
RESERVED_BATCH_KEYS = {"key", "label", "text", "bad_samples", "valid"}
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC, "nearest": InterpolationMode.NEAREST}


class GeometryConfig(BaseModel):
    """Shared by all views of a sample."""

    model_config = ConfigDict(extra="forbid")
    size: int = 224
    crop: Literal["random_resized", "center", "resize"] = "random_resized"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    hflip: float = 0.5

    @field_validator("size")
    @classmethod
    def _positive_size(cls, size: int) -> int:
        if size <= 0:
            raise ValueError(f"size is the output side in pixels and must be positive, not {size}")
        return size

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1 (fractions of the image area), not {scale}")
        return scale

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, ratio: tuple[float, float]) -> tuple[float, float]:
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max (aspect ratios), not {ratio}")
        return ratio

    @field_validator("hflip")
    @classmethod
    def _probability(cls, hflip: float) -> float:
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability and must be within [0, 1], not {hflip}")
        return hflip


class ViewConfig(BaseModel):
    """What differs per view."""

    model_config = ConfigDict(extra="forbid")
    color_jitter: float | tuple[float, float, float] | None = None  # brightness, contrast, saturation
    normalize: Literal["imagenet", "clip", "none"] | tuple[Triple, Triple] = "imagenet"

    @field_validator("color_jitter")
    @classmethod
    def _non_negative(cls, jitter):
        values = (jitter,) * 3 if isinstance(jitter, (int, float)) else jitter or ()
        if any(value < 0 for value in values):
            raise ValueError(f"color_jitter strengths must be >= 0, not {jitter}")
        return jitter

    @field_validator("normalize")
    @classmethod
    def _positive_std(cls, normalize):
        if isinstance(normalize, tuple) and any(std <= 0 for std in normalize[1]):
            raise ValueError(f"normalize is (mean, std) and every std must be positive, not {normalize[1]}")
        return normalize


class ViewsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    geometry: GeometryConfig = GeometryConfig()
    views: dict[str, ViewConfig] = {"image": ViewConfig()}

    @model_validator(mode="after")
    def _view_names(self) -> "ViewsConfig":
        if not self.views:
            raise ValueError("views must name at least one view, e.g. {'image': {}}")
        clashes = RESERVED_BATCH_KEYS & set(self.views)
        if clashes:
            raise ValueError(f"view names {sorted(clashes)} clash with batch fields {sorted(RESERVED_BATCH_KEYS)}")
        return self


@dataclass(frozen=True)
class Geometry:
    """The crop box (in source pixels) and the flip drawn for one sample."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_geometry(height: int, width: int, config: GeometryConfig, seed: int) -> Geometry:
    rng = random.Random(seed)  # a private RNG: no global state is read or changed
    if config.crop == "resize":
        top, left, box_h, box_w = 0, 0, height, width
    elif config.crop == "center":
        side = min(height, width)
        top, left, box_h, box_w = round((height - side) / 2), round((width - side) / 2), side, side
    else:
        top, left, box_h, box_w = random_resized_box(height, width, config.scale, config.ratio, rng)
    flip = rng.random() < config.hflip
    return Geometry(top, left, box_h, box_w, flip)


def random_resized_box(height: int, width: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng` instead of torch's global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        box_w = round(math.sqrt(target_area * aspect))
        box_h = round(math.sqrt(target_area / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            return rng.randint(0, height - box_h), rng.randint(0, width - box_w), box_h, box_w
    # Fallback to a central crop at the nearest allowed aspect ratio, as torchvision does.
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_w, box_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        box_h, box_w = height, round(height * max(ratio))
    else:
        box_w, box_h = width, height
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def apply_geometry(image: torch.Tensor, geometry: Geometry, config: GeometryConfig) -> torch.Tensor:
    out = F.resized_crop(
        image, geometry.top, geometry.left, geometry.height, geometry.width,
        size=[config.size, config.size], interpolation=_INTERPOLATION[config.interpolation], antialias=True,
    )  # fmt: skip
    return F.horizontal_flip(out) if geometry.flip else out


@dataclass(frozen=True)
class ViewParams:
    """Every random decision behind one sample's views, so that they can be replayed exactly.

    ``geometry``: the crop box and flip shared by all views. ``jitter``: per view, the colour
    adjustments in the order applied, each ``(which, factor)`` with ``which`` an index into
    (brightness, contrast, saturation); a view without jitter has none. ``mask_seed``: the seed
    a masking objective draws this sample's mask from (a pure function of the sample's seed,
    so drawing it changes nothing else).
    """

    geometry: Geometry | None  # None for text, which has no views
    jitter: dict[str, tuple[tuple[int, float], ...]]
    mask_seed: int

    def to_json(self) -> dict:
        g = self.geometry
        return {"box": None if g is None else [g.top, g.left, g.height, g.width], "flip": g is not None and g.flip,
                "jitter": {name: [[which, factor] for which, factor in steps] for name, steps in self.jitter.items()},
                "mask_seed": self.mask_seed}  # fmt: skip

    @classmethod
    def from_json(cls, raw: dict) -> "ViewParams":
        geometry = None
        if raw["box"] is not None:
            top, left, height, width = (int(v) for v in raw["box"])
            geometry = Geometry(top, left, height, width, bool(raw["flip"]))
        jitter = {name: tuple((int(which), float(factor)) for which, factor in steps) for name, steps in raw["jitter"].items()}
        return cls(geometry, jitter, int(raw["mask_seed"]))


_ADJUST = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)


def draw_jitter(strength: float | Triple | None, seed: int) -> tuple[tuple[int, float], ...]:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], in a random order (as
    torchvision's ColorJitter); an adjustment of strength 0 is left out."""
    if strength is None:
        return ()
    strengths = (strength,) * 3 if isinstance(strength, (int, float)) else strength
    rng = random.Random(seed)
    steps = []
    for which in rng.sample(range(3), 3):
        if strengths[which] > 0:
            steps.append((which, rng.uniform(max(0.0, 1 - strengths[which]), 1 + strengths[which])))
    return tuple(steps)


def text_params(seed: int) -> ViewParams:
    """A text sample has no views; its only random decision is the mask seed."""
    return ViewParams(None, {}, derive_seed(seed, "mask"))


def draw_view_params(height: int, width: int, config: ViewsConfig, seed: int) -> ViewParams:
    """The random decisions of all configured views of one image of this size: the geometry
    once (shared), each view's jitter from a seed of its own."""
    return ViewParams(
        geometry=sample_geometry(height, width, config.geometry, seed),
        jitter={name: draw_jitter(view.color_jitter, derive_seed(seed, "view", name)) for name, view in config.views.items()},
        mask_seed=derive_seed(seed, "mask"),
    )  # fmt: skip


def apply_view(image: torch.Tensor, config: ViewConfig, jitter: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """uint8 [3,H,W] -> float [3,H,W]: the drawn colour adjustments (if any), then normalisation."""
    out = F.to_dtype(image, torch.float32, scale=True)
    for which, factor in jitter:
        out = _ADJUST[which](out, factor)
    if config.normalize != "none":
        mean, std = NORMALIZE[config.normalize] if isinstance(config.normalize, str) else config.normalize
        out = F.normalize(out, list(mean), list(std))
    return out


def apply_views(image: torch.Tensor, config: ViewsConfig, params: ViewParams, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The views of one uint8 RGB image, from drawn (or recorded) parameters; ``names``: only these."""
    shared = apply_geometry(image, params.geometry, config.geometry)
    wanted = config.views if names is None else {name: config.views[name] for name in names}
    return {name: apply_view(shared, view, params.jitter[name]) for name, view in wanted.items()}


def make_views(image: torch.Tensor, config: ViewsConfig, seed: int) -> dict[str, torch.Tensor]:
    """All configured views of one uint8 RGB image; the geometry is drawn once and shared."""
    return apply_views(image, config, draw_view_params(image.shape[-2], image.shape[-1], config, seed))
