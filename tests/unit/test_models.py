"""Model surgery on meta-device builds: which student parameters are frozen, what the teacher
loses to pruning, and how a tap error reads."""

import pytest
import timm
import torch

from distill_engine.families import FAMILIES, ModelRecipe
from distill_engine.modeling import tracing as models
from distill_engine.modeling.taps import TapError, Taps

from helpers import TINY_VIT, check_in_process

TIMM = FAMILIES["timm"]


def meta(arch: str, **kwargs):
    with torch.device("meta"):
        model = timm.create_model(arch, **kwargs)
    return model, models.trace(model, TIMM, torch.zeros(1, 3, kwargs.get("img_size", 224),
                                                        kwargs.get("img_size", 224), device="meta"))


# The tiny ViT, a block deeper (freezing and pruning need a middle block), without a head.
SMALL = {**TINY_VIT, "embed_dim": 48, "depth": 3, "num_heads": 3}
SMALL.pop("num_classes")


def test_tinymim_student_freezes_everything_after_its_last_qkv():
    model, trace = meta("vit_tiny_patch16_224", **SMALL, num_classes=10)
    frozen = set(models.unreachable_parameters(model, trace, ["blocks.2.attn.qkv"]))
    for name in ("blocks.2.attn.proj.weight", "blocks.2.mlp.fc1.weight", "blocks.2.norm2.weight",
                 "norm.weight", "head.weight"):
        assert name in frozen
    for name in ("blocks.2.attn.qkv.weight", "blocks.2.norm1.weight", "blocks.1.mlp.fc2.bias",
                 "cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert name not in frozen


def test_beit_qkv_used_functionally_is_not_frozen():
    # BEiT calls F.linear(x, self.qkv.weight, ...): the qkv module never runs, its weight does.
    model, trace = meta("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                        num_heads=3, num_classes=0, global_pool="token")
    frozen = models.unreachable_parameters(model, trace, ["norm"])
    assert not any("qkv" in name for name in frozen)


def test_tied_weights_stay_trainable():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.body = torch.nn.Linear(4, 4)
            self.decoder = torch.nn.Linear(4, 10, bias=True)
            self.decoder.weight = self.embed.weight

        def forward(self, ids):
            return self.decoder(self.body(self.embed(ids)))

    model = Tied()
    trace = models.trace(model, TIMM, torch.zeros(1, 3, dtype=torch.long))
    assert models.unreachable_parameters(model, trace, ["body"]) == ["decoder.bias"]


def test_pruning_cuts_blocks_and_head_and_keeps_the_tap_output():
    model, trace = meta("vit_tiny_patch16_224", **SMALL, num_classes=10)
    reference = timm.create_model("vit_tiny_patch16_224", **SMALL, num_classes=10).eval()
    pruned = timm.create_model("vit_tiny_patch16_224", **SMALL, num_classes=10).eval()
    pruned.load_state_dict(reference.state_dict())
    removed = models.prune_after(pruned, trace, ["blocks.1"])
    assert "blocks.2" in removed and "norm" in removed and "head" in removed
    assert len(pruned.blocks) == 2
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for name, model_ in (("ref", reference), ("pruned", pruned)):
        taps = Taps(model_, ["blocks.1"])
        with taps.capture() as captured, torch.no_grad():
            model_(x)
        outputs[name] = captured["blocks.1"]
    torch.testing.assert_close(outputs["pruned"], outputs["ref"])


def test_wrong_tap_lists_nearest_names():
    model, _ = meta("vit_tiny_patch16_224", **SMALL)
    with pytest.raises(TapError, match="blocks.1.attn.qkv"):
        Taps(model, ["blocks.1.atn.qkv"])


def test_constant_drop_path_spares_the_last_block():
    recipe = ModelRecipe("timm:vit_tiny_patch16_224", SMALL)
    model = TIMM.create(recipe, 0.1, "constant")
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == [0.1, 0.1, 0.0]
    linear = TIMM.create(recipe, 0.1, "linear")
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for b in linear.blocks] == pytest.approx([0.0, 0.05, 0.1])


def test_hugging_face_models_from_local_directories_plan_with_separate_qkv_taps(tmp_path):
    """hf:DIR architectures: built from a local config (no hub), pruned and frozen like timm's."""
    import yaml
    from safetensors.torch import save_file
    from transformers import AutoModel, BertConfig

    
    for name, (width, heads) in {"teacher": (64, 4), "student": (32, 2)}.items():
        BertConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
                   intermediate_size=4 * width, vocab_size=100).save_pretrained(tmp_path / name)
    teacher = AutoModel.from_config(BertConfig.from_pretrained(tmp_path / "teacher"))
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()},
              str(tmp_path / "teacher.safetensors"))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text("{}")
    attention = "encoder.layer.1.attention.self"
    taps = {f"{side}_{p}": f"{attention}.{proj}" for side in ("teacher", "student")
            for p, proj in (("q", "query"), ("k", "key"), ("v", "value"))}
    spec = {"name": "hf", "run_dir": str(tmp_path / "run"),
            "data": {"train": str(tmp_path / "shards"), "micro_batch_size": 4},
            "optimisation": {"lr": 1e-4, "steps": 3},
            "stages": [{"name": "relation",
                        "teacher": {"arch": f"hf:{tmp_path / 'teacher'}",
                                    "weights": str(tmp_path / "teacher.safetensors")},
                        "student": {"arch": f"hf:{tmp_path / 'student'}"},
                        "objectives": [{"kind": "relation", **taps}]}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = check_in_process(tmp_path / "job.yaml")
    assert code == 0, err
    text = " ".join(out.replace("│", " ").split())
    assert "teacher pruned encoder.layer.1.attention.output, encoder.layer.1.intermediate" in text
    assert "student frozen encoder.layer.1.attention.output" in text


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_schedules_with_and_without_warmup(schedule, warmup):
    """DeepSpeed's own schedulers, as our config asks for them and driven as the engine
    drives them (the optimizer steps at the current lr, then the scheduler steps): the
    warm-up starts at step 1 (lr 0, then lr/3, 2lr/3, the peak at step 4), a cosine or
    constant stage without warm-up starts at the peak; then the schedule's shape."""
    from types import SimpleNamespace

    from deepspeed.runtime import lr_schedules

    from distill_engine.spec.schema import OptimisationSpec
    from distill_engine.training.engines import begin_schedule, scheduler_config

    opt = OptimisationSpec(lr=1e-3, steps=20, schedule=schedule, warmup_steps=warmup)
    plan = SimpleNamespace(spec=SimpleNamespace(optimisation=opt), lr=1e-3)
    config = scheduler_config(plan, 20, warmup)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = getattr(lr_schedules, config["type"])(optimizer, **config["params"])
    begin_schedule(scheduler)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])  # what this optimizer step uses
        scheduler.step()
    if warmup:
        assert lrs[:warmup] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3], abs=1e-12)
        assert lrs[warmup] == pytest.approx(1e-3, rel=0.06)  # linear decay has begun
    elif schedule != "linear":
        assert lrs[0] == pytest.approx(1e-3)  # no warm-up: the first step learns at the peak
    else:  # WarmupDecayLR keeps DeepSpeed's shortest warm-up, 2 steps, from its minimum 0
        assert lrs[:2] == pytest.approx([0.0, 5e-4]) and lrs[2] == pytest.approx(1e-3, rel=0.06)
    assert max(lrs) == pytest.approx(1e-3, rel=0.05)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1e-3)
    else:
        assert lrs[-1] < 0.1 * 1e-3
