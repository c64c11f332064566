"""Self-distillation's two objectives (Lee et al., ICLR 2023): ``mae`` and ``hidden``, against
their formulas and against Hugging Face's ViTMAE, on a tiny ViTMAE built from a config."""

from __future__ import annotations

import pytest
import torch

from distill_engine.families import ModelRecipe
from distill_engine.modeling.inputs import model_inputs
from distill_engine.objectives import ObjectiveError, TapShapes, build_objective
from distill_engine.objectives.hidden import HiddenConfig, hidden_state_distance
from distill_engine.objectives.mae import MAEConfig, mae_loss, patchify
from distill_engine.training.models import TappedModel

# 24 px images in patches of 4: L = 36 patches, 9 visible at mask ratio 0.75.
TINY_MAE = {"image_size": 24, "patch_size": 4, "num_channels": 3, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
            "decoder_num_attention_heads": 2, "decoder_intermediate_size": 64,
            "mask_ratio": 0.75, "norm_pix_loss": True}
PATCHES = 36


def tiny_mae_dir(directory) -> str:
    from transformers import ViTMAEConfig
    ViTMAEConfig(**TINY_MAE).save_pretrained(directory)
    return f"hf:{directory}"


@pytest.fixture(scope="module")
def mae_arch(tmp_path_factory) -> str:
    return tiny_mae_dir(tmp_path_factory.mktemp("tiny_mae"))


def tapped(arch: str, task: str, taps: list[str], seed: int = 0) -> TappedModel:
    recipe = ModelRecipe(arch, {"task": task})
    torch.manual_seed(seed)
    model = TappedModel(recipe.family.create(recipe), recipe.family)
    model.attach_taps(taps)
    return model


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 24, 24, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------- the formulas

def test_mae_loss_is_the_formula_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    predicted = torch.randn(2, 5, 6, generator=generator, requires_grad=True)
    patches = torch.randn(2, 5, 6, generator=generator)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.float32)
    for norm_pix in (True, False):
        # Per patch: target normalised by its own mean and unbiased std (+1e-6 under the root).
        target = patches.clone()
        if norm_pix:
            for b in range(2):
                for i in range(5):
                    values = patches[b, i]
                    mean = values.sum() / 6
                    var = ((values - mean) ** 2).sum() / 5
                    target[b, i] = (values - mean) / torch.sqrt(var + 1e-6)
        errors = ((predicted.detach() - target) ** 2).mean(-1)
        expected = (errors * mask).sum() / mask.sum()
        loss = mae_loss(predicted, patches, mask, norm_pix=norm_pix)
        assert torch.allclose(loss, expected, atol=1e-6)
        # d loss / d pred = 2 (pred - target) / D on masked patches, over the masked count.
        grad, = torch.autograd.grad(loss, predicted)
        expected_grad = 2 * (predicted.detach() - target) / 6 * mask[..., None] / mask.sum()
        assert torch.allclose(grad, expected_grad, atol=1e-6)


def test_hidden_state_distance_is_the_formula_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 8, generator=generator, requires_grad=True)
    loss = hidden_state_distance(student, teacher)
    expected = sum(((student[i] - teacher[i]) ** 2).sum() for i in range(4)) / 4
    assert torch.allclose(loss, expected)
    grad_student, = torch.autograd.grad(loss, student)
    assert torch.allclose(grad_student, 2 * (student - teacher).detach() / 4)
    loss = hidden_state_distance(student, teacher)
    loss.backward()
    assert teacher.grad is None, "the teacher is the target: no gradient into it"


def test_patchify_lays_patches_out_as_vitmae(mae_arch):
    model = tapped(mae_arch, "mae_pretraining", []).model
    pixels = images()
    assert torch.equal(patchify(pixels, 4), model.patchify(pixels))


# ---------------------------------------------------------------------------- mae on ViTMAE

def test_a_fresh_mae_has_its_sin_cos_positions(mae_arch):
    """transformers 5.23 leaves them at zeros when building from a config; they get no
    gradient, so the family writes them (the ZeRO-3 build: tests/test_self_distillation_job)."""
    model = tapped(mae_arch, "mae_pretraining", []).model
    for table in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        assert not table.requires_grad and table[0, 1:].abs().max() > 0.5
        assert table[0, 1:].unique(dim=0).shape[0] == PATCHES, "one position per patch"


def mae_objective(model: TappedModel, mask_ratio: float = 0.75):
    config = MAEConfig(mask_ratio=mask_ratio)
    shapes = TapShapes(student={"output": (1, PATCHES, 48)}, student_model=model.model)
    return build_objective(config, shapes)


def test_mae_objective_equals_vitmaes_own_loss_on_the_mask_it_drew(mae_arch):
    student = tapped(mae_arch, "mae_pretraining", ["output"])
    objective = mae_objective(student)
    batch = objective.prepare({"image": images()}, torch.Generator().manual_seed(3))
    inputs = model_inputs(batch, "student")
    output = student.family.forward(student.model, inputs)
    taps = student.tapped_pass(inputs)
    loss = objective(taps, {}, batch)
    assert torch.allclose(loss, output.loss, atol=1e-6), (loss, output.loss)
    # The model masked exactly the patches the objective counts as masked: 27 of 36.
    assert torch.equal(output.mask, objective.mask(inputs["noise"]))
    assert output.mask.sum(1).tolist() == [27.0] * 3


def test_mae_objective_uses_its_own_mask_ratio_not_the_configs(mae_arch):
    student = tapped(mae_arch, "mae_pretraining", ["output"])
    objective = mae_objective(student, mask_ratio=0.5)
    batch = objective.prepare({"image": images()}, torch.Generator().manual_seed(3))
    output = student.family.forward(student.model, model_inputs(batch, "student"))
    assert output.mask.sum(1).tolist() == [18.0] * 3
    assert student.model.config.mask_ratio == 0.75, "the config is restored after the call"


def test_the_mask_is_a_function_of_the_steps_generator(mae_arch):
    """The trainer seeds the generator from (seed, stage, step, micro-batch, rank): a resumed
    run, at the same step, draws the same mask; another step draws another."""
    objective = mae_objective(tapped(mae_arch, "mae_pretraining", ["output"]))
    from data_shards.keys import derive_seed

    def noise(step):
        generator = torch.Generator().manual_seed(derive_seed(0, 0, step, 0, 0))
        return objective.prepare({"image": images()}, generator)["student"]["noise"]
    assert torch.equal(noise(5), noise(5))
    assert not torch.equal(noise(5), noise(6))
    assert noise(5).dtype == torch.int64, "integer noise: no cast can tie two patches"


def test_mae_refuses_a_model_that_does_not_mask(tmp_path):
    from transformers import ViTConfig
    ViTConfig(image_size=24, patch_size=4, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    vit = tapped(f"hf:{tmp_path}", "base", [])
    with pytest.raises(ObjectiveError, match="ViTMAE"):
        build_objective(MAEConfig(), TapShapes(student={"output": (1, 37, 32)},
                                               student_model=vit.model))


# ---------------------------------------------------------------------------- the unmasked passes

def test_unmasked_passes_of_student_and_teacher_see_every_patch(mae_arch, tmp_path):
    """The student's second pass and the teacher's pass both hold CLS + all L patches, in
    patch order: the teacher built as ViTMAE gives the same tokens as the same weights
    loaded into a plain ViT, which never masks."""
    student = tapped(mae_arch, "mae_pretraining", ["output", "vit.layernorm"], seed=0)
    teacher = tapped(mae_arch, "mae_pretraining", ["vit.layernorm"], seed=1)
    objectives = [mae_objective(student),
                  build_objective(HiddenConfig(), TapShapes(
                      student={"vit.layernorm": (1, 10, 32)},
                      teacher={"vit.layernorm": (1, 10, 32)},
                      student_model=student.model, teacher_model=teacher.model))]
    batch = {"image": images()}
    for objective in objectives:
        batch = objective.prepare(batch, torch.Generator().manual_seed(4))

    teacher_taps = teacher.tapped_pass(model_inputs(batch, "teacher"))
    assert teacher_taps["vit.layernorm"].shape == (3, PATCHES + 1, 32)
    student_taps = student.tapped_pass(model_inputs(batch, "student"))
    assert student_taps["vit.layernorm"].shape == (3, 9 + 1, 32)  # the masked pass

    seen = []

    def second_pass(inputs):
        taps = student.tapped_pass(inputs)
        seen.append(taps["vit.layernorm"].shape)
        return taps
    mae, hidden = objectives
    loss = mae(student_taps, teacher_taps, batch) + hidden(student_taps, teacher_taps, batch,
                                                           second_pass)
    assert seen == [(3, PATCHES + 1, 32)]
    loss.backward()
    assert student.model.vit.embeddings.cls_token.grad.abs().sum() > 0
    assert student.model.decoder.decoder_pred.weight.grad.abs().sum() > 0

    # The same weights as a plain ViT (what fine-tuning builds) give the same CLS token.
    vit = tapped(mae_arch, "image_classification", ["vit.layernorm"])
    missing, unexpected = vit.model.load_state_dict(teacher.model.state_dict(), strict=False)
    assert set(missing) == {"classifier.weight", "classifier.bias"}
    assert all(k.startswith("decoder.") for k in unexpected)
    vit_tokens = vit.tapped_pass(model_inputs(batch, "teacher"))["vit.layernorm"]
    assert torch.allclose(vit_tokens, teacher_taps["vit.layernorm"], atol=1e-5)


def test_hidden_refuses_models_of_different_widths():
    with pytest.raises(ObjectiveError, match="same width"):
        build_objective(HiddenConfig(), TapShapes(student={"vit.layernorm": (1, 10, 32)},
                                                  teacher={"vit.layernorm": (1, 10, 64)}))


def test_hidden_works_on_a_bert_encoder_tap(tmp_path):
    """Any tap giving [B, N, D] tokens: BERT's encoder (its output record stands for the last
    hidden state). BERT never masks inside, so its token ids pass through unchanged."""
    from transformers import BertConfig
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               vocab_size=50, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0).save_pretrained(tmp_path)
    student = tapped(f"hf:{tmp_path}", "masked_lm", ["bert.encoder"], seed=0)
    teacher = tapped(f"hf:{tmp_path}", "masked_lm", ["bert.encoder"], seed=1)
    tokens = {"input_ids": torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    hidden = build_objective(HiddenConfig(student_tap="bert.encoder", teacher_tap="bert.encoder"), TapShapes(
        student={"bert.encoder": (1, 12, 32)}, teacher={"bert.encoder": (1, 12, 32)},
        student_model=student.model, teacher_model=teacher.model))
    batch = hidden.prepare({"tokens": tokens}, torch.Generator().manual_seed(0))
    assert model_inputs(batch, "teacher") is tokens
    teacher_taps = teacher.tapped_pass(model_inputs(batch, "teacher"))
    loss = hidden(student.tapped_pass(tokens), teacher_taps, batch, student.tapped_pass)
    expected = hidden_state_distance(student.tapped_pass(tokens)["bert.encoder"][:, 0],
                                     teacher_taps["bert.encoder"][:, 0])
    assert torch.allclose(loss, expected)
