"""Masked LM scores only the positions it chose: the student's output projection (hidden x
vocabulary) runs on the gathered hidden states of those positions, and the loss and every
gradient are what scoring every position gave."""

from __future__ import annotations

import pytest
import torch

from distill_engine.training.models import TappedModel
from distill_engine.families import ModelRecipe
from distill_engine.families.hf import PREDICT_AT
from distill_engine.modeling.inputs import model_inputs
from distill_engine.objectives import TapShapes, build_objective
from distill_engine.objectives.mlm import IGNORE, LABELS, MLMConfig, mlm_loss
from helpers import tiny_tokenizer

VOCAB, LENGTH = 1000, 12
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": VOCAB, "task": "masked_lm",
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def student_and_objective(tmp_path, probability=0.3):
    recipe = ModelRecipe("hf:bert", TINY_BERT)
    torch.manual_seed(0)
    student = TappedModel(recipe.family.create(recipe), recipe.family)
    student.attach_taps([])
    shapes = TapShapes(student={"output": (1, LENGTH, VOCAB)}, student_model=student.model,
                       student_tokenizer=tiny_tokenizer(tmp_path / "tokenizer"))
    return student, build_objective(MLMConfig(probability=probability), shapes)


def sentences(batch=6):
    ids = torch.randint(5, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2                                   # [CLS]
    mask = torch.ones_like(ids)
    mask[1, 8:] = mask[4, 5:] = 0                   # padded rows: never chosen
    ids[mask == 0] = 0
    return {"tokens": {"input_ids": ids, "attention_mask": mask}}


def decoder_rows(student):
    """Records the shape of every input the output projection receives."""
    seen = []
    student.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape)))
    return seen


def loss_and_gradients(student, objective, inputs, batch):
    student.model.zero_grad(set_to_none=True)
    taps = student.tapped_pass(inputs)
    loss = objective(taps, {}, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None}
    return loss.detach(), taps["output"].detach(), grads


def test_mlm_scores_the_chosen_positions_only_with_todays_loss_and_gradients(tmp_path):
    student, objective = student_and_objective(tmp_path)
    assert objective.gather_before_decoder
    batch = objective.prepare(sentences(), torch.Generator().manual_seed(1))
    chosen = batch[LABELS] != IGNORE
    inputs = model_inputs(batch, "student")
    assert torch.equal(inputs[PREDICT_AT], chosen) and 0 < int(chosen.sum()) < chosen.numel() // 2
    seen = decoder_rows(student)

    loss, logits, grads = loss_and_gradients(student, objective, inputs, batch)
    assert seen == [(int(chosen.sum()), 32)]       # the projection saw the chosen rows alone
    assert logits.shape == (int(chosen.sum()), VOCAB)

    # Today's path: the same corrupted ids, every position scored, the loss read at the chosen.
    every = {k: v for k, v in inputs.items() if k != PREDICT_AT}
    full_loss, full_logits, full_grads = loss_and_gradients(student, objective, every, batch)
    assert seen[-1] == (6, LENGTH, 32) and full_logits.shape == (6, LENGTH, VOCAB)
    assert abs(loss.item() - full_loss.item()) <= 1e-6, (loss.item(), full_loss.item())
    assert abs(loss.item() - mlm_loss(full_logits, batch[LABELS]).item()) <= 1e-6
    torch.testing.assert_close(logits, full_logits[chosen], atol=1e-6, rtol=0)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)

    # The gather lives for that call only: the next plain forward (evaluation, the probe, a
    # second pass of another objective) scores every position again.
    assert student.tapped_pass(every)["output"].shape == (6, LENGTH, VOCAB)


def test_a_batch_with_no_chosen_position_gives_zero_with_a_gradient_path(tmp_path):
    student, objective = student_and_objective(tmp_path, probability=1e-9)
    batch = objective.prepare(sentences(), torch.Generator().manual_seed(1))
    assert not (batch[LABELS] != IGNORE).any()
    loss, logits, _ = loss_and_gradients(student, objective, model_inputs(batch, "student"), batch)
    assert loss.item() == 0.0 and logits.shape == (0, VOCAB)


def test_scores_that_do_not_match_the_chosen_positions_are_refused():
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1] = labels[1, 3] = 7
    with pytest.raises(ValueError, match="3 scored positions for 2 chosen"):
        mlm_loss(torch.randn(3, 11), labels)
