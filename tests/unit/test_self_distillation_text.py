"""The text variant of self-distillation (jobs/self_distillation_text.yaml) in one process:
how a BERT encoder that ships without a masked-LM head gets one (scripts/initial_mlm_model.py),
and ``hidden`` beside ``mlm``: the hidden-state term sees the sentence unmasked, whatever the
order of the two objectives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distill_engine import weights
from distill_engine.families import ModelRecipe
from distill_engine.modeling.inputs import model_inputs
from distill_engine.objectives import TapShapes, build_objective
from distill_engine.objectives.hidden import UNMASKED_STUDENT, HiddenConfig, hidden_state_distance
from distill_engine.objectives.mlm import LABELS, MLMConfig
from distill_engine.training.models import TappedModel

from helpers import TINY_BERT, bert_encoder_dir, script_module, tiny_tokenizer

def test_the_initial_model_ties_its_decoder_and_starts_only_the_transform_and_bias_fresh(tmp_path):
    encoder = load_file(str(bert_encoder_dir(tmp_path / "encoder", 50) / "model.safetensors"))
    out = tmp_path / "initial"
    script_module("initial_mlm_model").initial_mlm_model(tmp_path / "encoder", out, seed=0)
    saved = load_file(str(out / "model.safetensors"))
    # The encoder comes over unchanged; its pooler does not (a masked-LM model has none).
    assert not any("pooler" in key for key in saved)
    for key, value in encoder.items():
        if "pooler" not in key and "position_ids" not in key:
            assert torch.equal(saved[f"bert.{key}"], value), key
    # The fresh head: transform dense N(0, 0.02) and bias 0, LayerNorm (1, 0), output bias 0.
    assert saved["cls.predictions.transform.dense.weight"].std().item() == pytest.approx(0.02, rel=0.3)
    assert not saved["cls.predictions.transform.dense.bias"].any()
    assert torch.equal(saved["cls.predictions.transform.LayerNorm.weight"], torch.ones(32))
    assert not saved["cls.predictions.transform.LayerNorm.bias"].any()
    assert not saved["cls.predictions.bias"].any()
    # The decoder is the word embedding matrix (stored once), in transformers' model and in
    # the engine's: a masked-LM student built from the file predicts with MiniLM's embeddings.
    from transformers import BertForMaskedLM
    model = BertForMaskedLM.from_pretrained(out)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    recipe = ModelRecipe(f"hf:{out}", {"task": "masked_lm"})
    engine_model = recipe.family.create(recipe)
    state = recipe.family.adapt_state_keys(engine_model, saved)
    missing, unexpected = engine_model.load_state_dict(state, strict=False)
    assert set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert not unexpected
    assert torch.equal(engine_model.cls.predictions.decoder.weight,
                       encoder["embeddings.word_embeddings.weight"])


def test_every_finetuning_starts_its_classifier_and_pooler_fresh(tmp_path):
    """The three fine-tunings of the job start from masked-LM files (the initial model, the
    further pre-trained and the self-distilled one): none holds a pooler, so each starts
    the pooler fresh with the classifier, and the baselines differ only in the encoder."""
    script_module("initial_mlm_model").initial_mlm_model(
        bert_encoder_dir(tmp_path / "encoder", 50), tmp_path / "initial")
    recipe = ModelRecipe(f"hf:{tmp_path / 'initial'}",
                         {"task": "sequence_classification", "num_labels": 3})
    model = recipe.family.create(recipe)
    state = recipe.family.adapt_state_keys(model, load_file(str(tmp_path / "initial" / "model.safetensors")))
    fresh = weights.fresh_head_keys(weights.expected_shapes(model),
                                    {k: tuple(v.shape) for k, v in state.items()},
                                    recipe.family.classifier_prefixes(model))
    assert fresh == {"classifier.weight", "classifier.bias",
                     "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def test_an_encoder_whose_embeddings_are_not_tied_is_refused(tmp_path):
    bert_encoder_dir(tmp_path / "encoder", 50, tie_word_embeddings=False)
    with pytest.raises(SystemExit, match="not tied"):
        script_module("initial_mlm_model").initial_mlm_model(tmp_path / "encoder",
                                                             tmp_path / "initial")
    assert not (tmp_path / "initial").exists()


@pytest.mark.parametrize("order", [("hidden", "mlm"), ("mlm", "hidden")])
def test_hidden_sees_the_unmasked_sentence_beside_mlm_in_either_order(tmp_path, order):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    from transformers import BertConfig
    BertConfig(vocab_size=64, **TINY_BERT).save_pretrained(tmp_path / "bert")
    recipe = ModelRecipe(f"hf:{tmp_path / 'bert'}", {"task": "masked_lm"})
    models = {}
    for role, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        models[role] = TappedModel(recipe.family.create(recipe), recipe.family)
        models[role].attach_taps(["bert.encoder"])
    shapes = TapShapes(student={"bert.encoder": (1, 12, 32), "output": (1, 12, 64)},
                       teacher={"bert.encoder": (1, 12, 32)},
                       student_model=models["student"].model,
                       teacher_model=models["teacher"].model, student_tokenizer=tokenizer)
    configs = {"hidden": HiddenConfig(student_tap="bert.encoder", teacher_tap="bert.encoder"),
               "mlm": MLMConfig(probability=0.5)}
    objectives = {kind: build_objective(configs[kind], shapes) for kind in order}
    ids = torch.randint(5, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch, generator = {"tokens": tokens}, torch.Generator().manual_seed(5)
    for kind in order:  # as StudentModel.prepare does
        batch = objectives[kind].prepare(batch, generator)

    masked = model_inputs(batch, "student")["input_ids"]
    assert (batch[LABELS] != -100).any() and not torch.equal(masked, ids)
    assert torch.equal(batch[UNMASKED_STUDENT]["input_ids"], ids)
    assert torch.equal(model_inputs(batch, "teacher")["input_ids"], ids)

    student_taps = models["student"].tapped_pass(model_inputs(batch, "student"))  # the masked pass
    teacher_taps = models["teacher"].tapped_pass(model_inputs(batch, "teacher"))
    loss = objectives["hidden"](student_taps, teacher_taps, batch, models["student"].tapped_pass)
    expected = hidden_state_distance(models["student"].tapped_pass(tokens)["bert.encoder"][:, 0],
                                     models["teacher"].tapped_pass(tokens)["bert.encoder"][:, 0])
    assert torch.allclose(loss, expected)
    # ... and not the distance from the masked pass.
    assert not torch.allclose(loss, hidden_state_distance(student_taps["bert.encoder"][:, 0],
                                                          teacher_taps["bert.encoder"][:, 0]))
