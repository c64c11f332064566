"""Every objective on recorded teacher taps gives the loss it gives on the live teacher's,
within the recorded precision; masks replayed from recorded seeds depend on the sample only.

The teacher and student are tiny timm ViTs; a recording's forms are the ones
``data_shards.targets.plan_stores`` picks from the objectives' ``teacher_needs``.
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load

from data_shards.targets import decode_batch, encode_batch, plan_stores
from distill_engine.objectives import MASK_SEED, RECORDED_TAPS, TapShapes, build_objective
from distill_engine.objectives.feature import FeatureConfig
from distill_engine.objectives.hidden import HiddenConfig
from distill_engine.objectives.relation import RelationConfig
from distill_engine.objectives.soft_label import SoftLabelConfig

CONFIGS = {
    "feature": FeatureConfig(student_tap="norm", teacher_tap="norm"),
    "relation": RelationConfig(student_qkv="blocks.1.attn.qkv", teacher_qkv="blocks.2.attn.qkv"),
    "soft_label": SoftLabelConfig(temperature=2.0),
    "hidden": HiddenConfig(student_tap="norm", teacher_tap="norm", token="mean"),
}


def vit(embed_dim: int, heads: int, depth: int, seed: int):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=embed_dim,
                             num_heads=heads, depth=depth, num_classes=10).eval()


def taps_of(model, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    captured = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out))
             for n in names if n != "output"]
    output = model(images)
    for hook in hooks:
        hook.remove()
    return {**captured, "output": output}


def recorded(live: dict[str, torch.Tensor], config, **options) -> dict[str, torch.Tensor]:
    """The live taps through a record: stored per sample, read back as a batch."""
    needs = [(n.tap, n.store, n.token, n.int8_ok) for n in config.teacher_needs()]
    stores = plan_stores(needs, {tap: list(live[tap].shape[1:]) for tap, *_ in needs}, **options)
    return decode_batch([load(blob) for blob in encode_batch(live, stores)], stores)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_each_objective_on_recorded_taps_equals_it_on_the_live_teacher(kind, dtype):
    config = CONFIGS[kind]
    # hidden compares states without a projection: a student as wide as the teacher
    student = vit(96, 6, 2, seed=1) if kind == "hidden" else vit(48, 3, 2, seed=1)
    teacher = vit(96, 6, 4, seed=2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        live = taps_of(teacher, config.teacher_taps(), images)
    student_taps = taps_of(student, config.student_taps(), images)
    shapes = TapShapes({t: tuple(v.shape) for t, v in student_taps.items()}, {t: tuple(v.shape) for t, v in live.items()},
                       student, teacher)
    objective = build_objective(config, shapes)

    def student_pass(inputs):
        return taps_of(student, config.student_taps(), inputs)

    batch = {"image": images}
    live_loss = objective(student_taps, live, objective.prepare(batch, torch.Generator()), student_pass)
    replayed = recorded(live, config, dtype=dtype, top_k=5)
    replay_batch = objective.prepare({**batch, RECORDED_TAPS: replayed}, torch.Generator())
    replayed_loss = objective(student_taps, replayed, replay_batch, student_pass)
    tolerance = {"fp16": 1e-3, "bf16": 8e-3}[dtype]  # 11 and 8 significant bits
    if kind == "soft_label":  # top-5 of 10 classes: the tail is filled, not recorded
        full = recorded(live, config, dtype=dtype, top_k=None)  # all logits
        assert torch.allclose(objective(student_taps, full, batch), live_loss, rtol=tolerance)
        assert torch.allclose(replayed_loss, live_loss, rtol=0.05)
    else:
        assert torch.allclose(replayed_loss, live_loss, rtol=tolerance), (replayed_loss, live_loss)
    replayed_loss.backward()  # the student learns from the records as from the teacher


def test_int8_features_give_the_fd_loss_within_its_rounding():
    config = CONFIGS["feature"]
    student, teacher = vit(48, 3, 2, seed=1), vit(96, 6, 4, seed=2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        live = taps_of(teacher, ["norm"], images)
    student_taps = taps_of(student, ["norm"], images)
    objective = build_objective(config, TapShapes({"norm": tuple(student_taps["norm"].shape)}, {"norm": tuple(live["norm"].shape)}))
    replayed = recorded(live, config, dtype="fp16", int8_features=True)
    assert torch.allclose(objective(student_taps, replayed, {}), objective(student_taps, live, {}), rtol=1e-2)


def test_a_recorded_single_token_serves_hidden_and_all_tokens_serve_it_too():
    config = CONFIGS["hidden"]
    needs = [(n.tap, n.store, n.token, n.int8_ok) for n in config.teacher_needs()]
    assert [s.store for s in plan_stores(needs, {"norm": [5, 96]}, "fp16")] == ["token"]
    # a feature objective on the same tap makes the recording keep every token, which serves both
    both = needs + [(n.tap, n.store, n.token, n.int8_ok) for n in CONFIGS["feature"].teacher_needs()]
    assert [s.store for s in plan_stores(both, {"norm": [5, 96]}, "fp16", int8_features=True)] == ["tokens"]
    assert [s.dtype for s in plan_stores(both, {"norm": [5, 96]}, "fp16", int8_features=True)] == ["fp16"]


def test_masks_from_recorded_seeds_belong_to_the_sample_not_the_batch(tmp_path):
    """A student from records draws each sample's mask from its recorded seed: the same
    sample gets the same mask in whatever batch, step or epoch it comes."""
    from test_self_distillation import images, mae_objective, tapped, tiny_mae_dir
    objective = mae_objective(tapped(tiny_mae_dir(tmp_path), "mae_pretraining", ["output"]))
    pixels = images(3)

    def noise(seeds, step):
        batch = {"image": pixels[:len(seeds)], MASK_SEED: torch.tensor(seeds), RECORDED_TAPS: {}}
        return objective.prepare(batch, torch.Generator().manual_seed(step))["student"]["noise"]
    assert torch.equal(noise([11, 22, 33], step=1)[1], noise([22, 44], step=9)[0])
    assert not torch.equal(noise([11, 22, 33], step=1)[0], noise([11, 22, 33], step=1)[1])
    # without recorded seeds the step's generator decides, as before
    live = objective.prepare({"image": pixels}, torch.Generator().manual_seed(1))["student"]["noise"]
    assert torch.equal(live, objective.prepare({"image": pixels}, torch.Generator().manual_seed(1))["student"]["noise"])
