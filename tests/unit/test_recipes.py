"""The paper recipes in jobs/ pass --check at the world size they are written for.

Their weights cannot exist on these machines, so each check points the teacher at a
safetensors file with the genuine header of the architecture and no data (see
helpers.sparse_safetensors), and the data at an empty shard directory."""

from pathlib import Path

import pytest

from helpers import ROOT, check_in_process, sparse_safetensors


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("imagenet")
    (directory / "index.json").write_text("{}")
    return directory


def check(spec: str, shards: Path, weights: Path, world_size: int = 64) -> str:
    code, out, err = check_in_process(ROOT / "jobs" / spec, "--set", f"data.train={shards}",
                                      "--set", f"stages.0.teacher.weights={weights}",
                                      world_size=world_size)
    assert code == 0, err
    # The table wraps long cells across lines; compare its text on single spaces.
    return " ".join(out.replace("│", " ").split())


def _activation(arch: str) -> str:
    import timm
    import torch
    with torch.device("meta"):
        return type(timm.create_model(arch).blocks[0].mlp.act).__name__


def test_fd_clip_vitb(tmp_path, shards):
    # OpenAI's CLIP towers use QuickGELU; timm's vit_base_patch16_clip_224 is the GELU
    # variant, which computes a different function with the same weights.
    weights = sparse_safetensors(tmp_path / "clip.safetensors", "vit_base_patch16_clip_quickgelu_224")
    out = check("fd_clip_vitb.yaml", shards, weights)
    assert "timm:vit_base_patch16_clip_quickgelu_224" in out
    assert _activation("vit_base_patch16_clip_quickgelu_224") == "QuickGELU"
    assert "32 per rank x 64 ranks x 1 accumulation = 2048" in out
    assert "lr 0.0012" in out                       # 3e-4 x 2048 / 512
    assert "beit_base_patch16_224" in out and "feature x 1.0" in out


def test_fd_vitl_takes_a_real_clip_vit_l14_file(tmp_path, shards):
    """The paper's teacher is OpenAI CLIP ViT-L/14: QuickGELU, and a pre-norm (norm_pre)
    whose keys a plain ViT-L layout would refuse."""
    arch = "vit_large_patch14_clip_quickgelu_224"
    weights = sparse_safetensors(tmp_path / "clip_l14.safetensors", arch)
    import json
    import struct
    with open(weights, "rb") as f:
        keys = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert "norm_pre.weight" in keys
    out = check("fd_vitl.yaml", shards, weights, world_size=8)
    assert f"timm:{arch}" in out and _activation(arch) == "QuickGELU"
    assert "student timm:vit_large_patch14_224" in out  # the same 16 x 16 token grid


def test_tinymim_vitb_from_mae_vitl_prunes_the_teacher_after_block_18(tmp_path, shards):
    weights = sparse_safetensors(tmp_path / "mae_l.safetensors", "vit_large_patch16_224",
                                 num_classes=0)
    out = check("tinymim_vitb_from_mae_vitl.yaml", shards, weights)
    assert "lr 0.0024" in out                       # 1.5e-4 x 4096 / 256
    assert "blocks.17.attn.qkv" in out
    assert "blocks.{18..23}" in out                  # removed from the teacher
    # Kept: embeddings, blocks 0-16 whole, and block 17 up to its qkv projection.
    import timm
    import torch
    with torch.device("meta"):
        vit_l = timm.create_model("vit_large_patch16_224", num_classes=0)
    total = sum(p.numel() for p in vit_l.parameters())
    block_17 = vit_l.blocks[17]
    kept = total - sum(p.numel() for b in vit_l.blocks[18:] for p in b.parameters()) \
        - sum(p.numel() for m in (block_17.attn.proj, block_17.norm2, block_17.mlp, vit_l.norm)
              for p in m.parameters())
    assert f"({total / 1e6:.2f} M params, {kept / 1e6:.2f} M kept after pruning)" in out


def test_tinymim_chain_hands_each_student_to_the_next_stage(tmp_path, shards):
    weights = sparse_safetensors(tmp_path / "mae_b.safetensors", "vit_base_patch16_224",
                                 num_classes=0)
    out = check("tinymim_chain.yaml", shards, weights)
    assert "stage 1: vit_small" in out and "stage 2: vit_tiny" in out
    assert "runs/tinymim-chain/vit_small/export/model.safetensors" in out
    assert "64 per rank x 64 ranks x 1 accumulation = 4096" in out


def test_recipes_refuse_the_wrong_world_size(tmp_path, shards):
    weights = sparse_safetensors(tmp_path / "mae_b.safetensors", "vit_base_patch16_224",
                                 num_classes=0)
    code, _, err = check_in_process(ROOT / "jobs" / "tinymim_chain.yaml", "--set",
                                    f"data.train={shards}", "--set",
                                    f"stages.0.teacher.weights={weights}", world_size=8)
    assert code == 2 and "global_batch_size" in err


def test_self_distillation_mae_vitb(tmp_path, shards):
    """MAE ViT-B (Hugging Face ViTMAEForPreTraining, encoder + decoder) from a checkpoint
    with its in-memory names; the paper's optimiser, steps and batch."""
    import torch
    from transformers import AutoConfig, ViTMAEForPreTraining

    from helpers import sparse_safetensors_of
    config = AutoConfig.from_pretrained(ROOT / "jobs" / "configs" / "vit_mae_base")
    with torch.device("meta"):
        mae = ViTMAEForPreTraining(config)
    weights = sparse_safetensors_of(tmp_path / "mae_b.safetensors", mae)
    code, out, err = check_in_process(
        ROOT / "jobs" / "self_distillation_mae_vitb.yaml", "--set", f"data.train={shards}",
        "--set", f"stages.0.student.init={weights}", "--set", f"stages.1.student.init={weights}",
        world_size=8)
    assert code == 0, err
    out = " ".join(out.replace("│", " ").split())
    assert "8 per rank x 8 ranks x 1 accumulation = 64" in out
    assert "lr 0.00015 (linear, 0 steps warm-up), 20000 steps, wd 0.01" in out
    assert "mae x 1.0; hidden x 1.0" in out
    assert "teacher pruned decoder" in out            # the teacher is the encoder alone
