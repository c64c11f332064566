"""Attention diagnostics on a tiny ViT whose attention is made by hand, so that the
distances and head similarities are known in closed form.

The ViT sees a 2 x 2 grid of 4 px patches. Its tokens are made input-independent (zero patch
embedding) and orthogonal (one-hot position embeddings), and its blocks change nothing
(zero value, projection and MLP output), so every block sees the same tokens. A head whose
query and key weights are zero attends uniformly; a head whose query and key weights are a
large multiple of the identity attends only to its own token.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from distill_engine.diagnostics.__main__ import main as diagnostics_main
from distill_engine.diagnostics.attention import attention_statistics

KWARGS = {"img_size": 8, "patch_size": 4, "embed_dim": 10, "depth": 2, "num_heads": 2,
          "num_classes": 0}
HEAD_DIM, TOKENS = 5, 5  # 4 patches + the class token
# Uniform attention over a 2 x 2 grid: 4 pairs at distance 0, 8 at 1, 4 at sqrt(2).
UNIFORM_DISTANCE = (8 * 1 + 4 * math.sqrt(2)) / 16
# Cosine between a uniform map (all 1/4) and the identity map over 4 patches: 4 * (1/4) /
# (1 * 2) = 1/2.
UNIFORM_VS_SELF = 0.5


def hand_made_vit(self_attending: dict[int, list[int]]):
    """``self_attending[layer]`` lists the heads that attend to themselves; the others
    attend uniformly."""
    import timm
    model = timm.create_model("vit_tiny_patch16_224", **KWARGS).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in [model.norm] + [m for b in model.blocks for m in (b.norm1, b.norm2)]:
            norm.weight.fill_(1.0)
        for token in range(TOKENS):  # token i: one-hot at dim i of every head
            model.pos_embed[0, token, token] = 1.0
            model.pos_embed[0, token, HEAD_DIM + token] = 1.0
        for layer, heads in self_attending.items():
            qkv = model.blocks[layer].attn.qkv.weight  # rows: q (10), k (10), v (10)
            for head in heads:
                dims = range(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                for d in dims:
                    qkv[d, d] = 10.0                 # query
                    qkv[KWARGS["embed_dim"] + d, d] = 10.0  # key
    return model


def test_uniform_and_self_attention_give_the_known_distances_and_similarities():
    model = hand_made_vit({1: [1]})
    stats = attention_statistics(model, [torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8)])
    assert stats["samples"] == 5 and stats["grid"] == [2, 2] and stats["patch_size_px"] == 4
    assert stats["uniform_distance_px"] == pytest.approx(4 * UNIFORM_DISTANCE)
    first, second = stats["layers"]
    # Layer 0: both heads uniform; identical maps.
    assert first["mean_distance_patches"] == pytest.approx([UNIFORM_DISTANCE] * 2, abs=1e-5)
    assert first["mean_distance_px"] == pytest.approx([4 * UNIFORM_DISTANCE] * 2, abs=1e-5)
    assert first["head_similarity"] == pytest.approx(1.0, abs=1e-5)
    # Layer 1: head 0 uniform, head 1 attends to itself (distance 0).
    assert second["mean_distance_patches"] == pytest.approx([UNIFORM_DISTANCE, 0.0], abs=1e-5)
    assert second["head_similarity"] == pytest.approx(UNIFORM_VS_SELF, abs=1e-5)
    # The model's fused attention is restored afterwards.
    assert all(block.attn.fused_attn == model.blocks[0].attn.fused_attn for block in model.blocks)


def test_command_writes_json_and_png_for_a_timm_model_with_weights(tmp_path, digits_shards):
    model = hand_made_vit({0: [0, 1], 1: [1]})
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    code = diagnostics_main([
        "attention", "--model", "timm:vit_tiny_patch16_224", "--kwargs", json.dumps(KWARGS),
        "--weights", str(tmp_path / "vit.safetensors"), "--label", "hand-made",
        "--shards", str(digits_shards / "holdout"), "--samples", "40", "--batch-size", "16",
        "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "attention.json").read_text())["hand-made"]
    assert result["samples"] == 40
    assert result["layers"][0]["mean_distance_px"] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert result["layers"][1]["mean_distance_px"] == pytest.approx(
        [4 * UNIFORM_DISTANCE, 0.0], abs=1e-5)
    assert (tmp_path / "out" / "attention.png").stat().st_size > 5000


def test_a_model_that_is_not_a_vit_is_refused_with_exit_2(tmp_path, digits_shards, capsys):
    code = diagnostics_main(["attention", "--model", "timm:resnet18", "--kwargs",
                             '{"num_classes": 0}', "--shards", str(digits_shards / "holdout"),
                             "--samples", "2", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "need a timm vision transformer" in capsys.readouterr().err
