"""Every registered objective, built for a tiny timm model and (where it applies) a tiny
Hugging Face model: a finite scalar loss, gradients on the student and on the objective's own
heads, none on the teacher (whose taps are computed with gradients enabled, so that an
objective that forgot to detach its target would be caught)."""

from __future__ import annotations

import pytest
import torch

from distill_engine.families import FAMILIES, InputShape, ModelRecipe
from distill_engine.modeling.inputs import model_inputs
from distill_engine.modeling.taps import OUTPUT, Taps
from distill_engine.objectives import OBJECTIVES, TapShapes, build_objective

from helpers import TINY_VIT, TINY_VIT_ARCH, tiny_tokenizer


def bert_dir(tmp_path_factory, width: int, heads: int, task: str) -> ModelRecipe:
    from transformers import BertConfig
    directory = tmp_path_factory.mktemp(f"bert{width}")
    BertConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
               intermediate_size=2 * width, vocab_size=50, num_labels=3).save_pretrained(directory)
    return ModelRecipe(f"hf:{directory}", {"task": task})


LAYER = "encoder.layer.1.attention.self"
# Per objective kind and family: (objective config, student recipe changes, teacher needed).
EXAMPLES = {
    "feature": {
        "timm": {"kind": "feature", "student_tap": "norm", "teacher_tap": "norm"},
        "hf": {"kind": "feature", "student_tap": "encoder", "teacher_tap": "encoder"},
    },
    "relation": {
        "timm": {"kind": "relation", "student_qkv": "blocks.1.attn.qkv",
                 "teacher_qkv": "blocks.1.attn.qkv"},
        "hf": {"kind": "relation", **{f"{side}_{p}": f"{LAYER}.{proj}" for side in ("student", "teacher")
                                      for p, proj in (("q", "query"), ("k", "key"), ("v", "value"))}},
    },
    "cross_entropy": {
        "timm": {"kind": "cross_entropy"},
        "hf": {"kind": "cross_entropy"},
    },
    "soft_label": {
        "timm": {"kind": "soft_label", "temperature": 2.0},
        "hf": {"kind": "soft_label", "hard_weight": 0.5},
    },
    "mlm": {
        "hf": {"kind": "mlm"},
    },
    # hf: on a tiny ViTMAE (encoder + decoder) pair, as self-distillation runs them.
    "mae": {
        "hf": {"kind": "mae"},
    },
    "hidden": {
        "timm": {"kind": "hidden", "student_tap": "norm", "teacher_tap": "norm"},
        "hf": {"kind": "hidden"},
    },
}
# Objectives whose student and teacher are one architecture (self-distillation).
SAME_ARCHITECTURE = {"mae", "hidden"}
# The Hugging Face head each kind reads.
HF_TASKS = {"cross_entropy": "sequence_classification", "soft_label": "sequence_classification",
            "mlm": "masked_lm"}


def test_every_registered_objective_has_an_example_here():
    assert set(OBJECTIVES) <= set(EXAMPLES), f"add examples for {set(OBJECTIVES) - set(EXAMPLES)}"


def mae_dir(tmp_path_factory) -> ModelRecipe:
    from transformers import ViTMAEConfig
    directory = tmp_path_factory.mktemp("vit_mae")
    ViTMAEConfig(image_size=TINY_VIT["img_size"], patch_size=8, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 decoder_hidden_size=32, decoder_num_hidden_layers=1,
                 decoder_num_attention_heads=2, decoder_intermediate_size=64,
                 norm_pix_loss=True).save_pretrained(directory)
    return ModelRecipe(f"hf:{directory}", {"task": "mae_pretraining"})


def models_for(family: str, tmp_path_factory, task: str, kind: str = ""):
    if kind in SAME_ARCHITECTURE:
        student = ModelRecipe(TINY_VIT_ARCH, TINY_VIT) if family == "timm" else \
            mae_dir(tmp_path_factory)
        return student, student
    if family == "timm":
        student = ModelRecipe(TINY_VIT_ARCH, TINY_VIT)
        teacher = ModelRecipe(TINY_VIT_ARCH, {**TINY_VIT, "embed_dim": 48, "num_heads": 2})
    else:
        student = bert_dir(tmp_path_factory, 32, 2, task)
        teacher = bert_dir(tmp_path_factory, 64, 2, task)
    return student, teacher


def run(recipe: ModelRecipe, model, taps: list[str], inputs):
    tapped = Taps(model, taps)
    with tapped.capture() as captured:
        output = recipe.family.forward(model, inputs)
    tapped.remove()
    return {**captured, OUTPUT: recipe.family.output_tensor(output)}


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_objective_gives_a_finite_loss_and_gradients_only_where_they_belong(kind, family,
                                                                           tmp_path_factory):
    example = EXAMPLES.get(kind, {}).get(family)
    if example is None:
        pytest.skip(f"{kind} does not apply to {family} models")
    config = OBJECTIVES[kind].Config.model_validate(example)
    task = HF_TASKS.get(kind, "base")
    student_recipe, teacher_recipe = models_for(family, tmp_path_factory, task, kind)
    torch.manual_seed(0)
    student = student_recipe.family.create(student_recipe)
    teacher = teacher_recipe.family.create(teacher_recipe)
    shape = InputShape(image_size=TINY_VIT["img_size"], seq_len=12)
    inputs = student_recipe.family.example_input(student, shape, batch=3, device="cpu",
                                                 generator=torch.Generator().manual_seed(1))
    batch = {"student": inputs, "teacher": inputs, "label": torch.tensor([0, 1, 2])}
    teacher_taps = run(teacher_recipe, teacher, config.teacher_taps(), inputs)  # with grad
    student_taps = run(student_recipe, student, config.student_taps(), inputs)
    shapes = TapShapes(student={t: tuple(student_taps[t].shape) for t in config.student_taps()},
                       teacher={t: tuple(teacher_taps[t].shape) for t in config.teacher_taps()},
                       student_model=student, teacher_model=teacher,
                       student_tokenizer=tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    objective = build_objective(config, shapes)
    # As the runtime: prepare (a mask, unmasked entries) before either model runs.
    batch = objective.prepare(batch, torch.Generator().manual_seed(2))
    teacher_taps = run(teacher_recipe, teacher, config.teacher_taps(),
                       model_inputs(batch, "teacher"))
    student_taps = run(student_recipe, student, config.student_taps(),
                       model_inputs(batch, "student"))

    def student_pass(other_inputs):
        return run(student_recipe, student, config.student_taps(), other_inputs)

    loss = objective(student_taps, teacher_taps, batch, student_pass)
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in objective.parameters()), "a head got no gradient"
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    per_sample, how = objective.memory_per_sample()
    assert per_sample > 0 and how
