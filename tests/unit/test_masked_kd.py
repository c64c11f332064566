"""MaskedKD (``teacher_tokens`` of soft_label / hidden): the teacher sees a seeded random
subset of its patch tokens, with positions and the class token kept, and a teacher that
cannot drop tokens is refused when the spec is checked."""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from distill_engine.families import FAMILIES, token_subset
from helpers import TINY_VIT, check_in_process, write_spec


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()  # 16 patches + CLS


def _run(model, images, fraction=None, seed=0):
    """Logits, and the number of tokens the first block received."""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    inputs = images if fraction is None else token_subset.with_subset(
        images, fraction, torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            return FAMILIES["timm"].forward(model, inputs), seen[0]
    finally:
        hook.remove()


def test_teacher_sees_a_seeded_subset_of_its_patch_tokens():
    model, images = _vit(), torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    full, tokens = _run(model, images)
    assert tokens == 17
    half, tokens = _run(model, images, 0.5, seed=0)
    assert tokens == 1 + 8  # the class token and half the patches
    again, _ = _run(model, images, 0.5, seed=0)
    other, _ = _run(model, images, 0.5, seed=1)
    assert torch.equal(half, again)  # the same step's generator draws the same subset
    assert not torch.allclose(half, other) and not torch.allclose(half, full)
    everything, tokens = _run(model, images, 1.0)
    assert tokens == 17 and torch.allclose(everything, full, atol=1e-6)


def test_subset_keeps_the_prefix_and_the_order_of_positions():
    tokens = torch.arange(2 * 9, dtype=torch.float).reshape(2, 9, 1)  # 1 prefix + 8 patches
    kept = token_subset.keep(tokens, 1, token_subset.TokenSubset(0.5, torch.Generator().manual_seed(3)))
    assert kept.shape == (2, 5, 1)
    assert torch.equal(kept[:, 0], tokens[:, 0])
    assert all(torch.all(row[1:, 0].diff() > 0) for row in kept)  # positions in order


def _spec(tmp_path: Path, teacher_arch: str, teacher_kwargs: dict, teacher_tokens: float) -> Path:
    weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model(teacher_arch.split(":")[1], **teacher_kwargs).state_dict(), str(weights))
    for split in ("train", "holdout"):
        (tmp_path / "shards" / split).mkdir(parents=True, exist_ok=True)
        (tmp_path / "shards" / split / "index.json").write_text("{}")
    return write_spec(tmp_path / "job.yaml", {
        "name": "masked_kd", "run_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "shards" / "train"), "micro_batch_size": 4,
                 "views": {"geometry": {"size": 32}}},
        "optimisation": {"lr": 1.0e-3, "steps": 10},
        "stages": [{"name": "kd",
                    "teacher": {"arch": teacher_arch, "kwargs": teacher_kwargs, "weights": str(weights)},
                    "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": TINY_VIT},
                    "objectives": [{"kind": "soft_label", "teacher_tokens": teacher_tokens}]}]})


def test_a_vit_teacher_may_see_half_its_tokens(tmp_path):
    code, _, err = check_in_process(_spec(tmp_path, "timm:vit_tiny_patch16_224", TINY_VIT, 0.5),
                                    world_size=1)
    assert code == 0, err


@pytest.mark.parametrize("teacher_tokens, says", [
    (0.5, "needs a ViT teacher"),  # a convnet has no patch tokens to drop
    (0.0, "teacher_tokens"), (1.5, "teacher_tokens")])
def test_teacher_tokens_a_teacher_cannot_take_is_a_spec_error(tmp_path, teacher_tokens, says):
    spec = _spec(tmp_path, "timm:test_convnext", {"num_classes": 10}, teacher_tokens)
    code, _, err = check_in_process(spec, world_size=1)
    assert code == 2
    assert "objectives[0]" in err and says in err and "Traceback" not in err
