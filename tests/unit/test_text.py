"""Text through the runtime: the mlm and soft_label objectives against their formulas,
tokenised shard streams (exact resume, one tokenizer per role), Hugging Face models declared
in the spec, checkpoints of related BERT classes, and --check refusing mismatched modalities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_shards import EvalStream, ShardStream, TextConfig, pack
from distill_engine.families import ModelRecipe
from distill_engine.objectives.mlm import mlm_loss, mlm_mask
from distill_engine.objectives.soft_label import soft_label_loss

from helpers import (TINY_VIT, TINY_VIT_ARCH, check_in_process, tiny_text_jsonl, tiny_tokenizer,
                     write_spec)

# ---------------------------------------------------------------------------- objectives

def test_mlm_mask_chooses_15_percent_never_special_and_corrupts_80_10_10():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 250), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -40:] = True  # [CLS] and padding
    ids[special] = 0
    corrupted, labels = mlm_mask(ids, special, mask_token_id=4, vocab_size=1000,
                                 generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # only chosen positions change
    share = chosen.sum().item() / (~special).sum().item()
    assert abs(share - 0.15) < 0.005, share
    masked = (corrupted[chosen] == 4).float().mean().item()
    unchanged = (corrupted[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.01 and abs(unchanged - 0.1 - 0.001) < 0.01, (masked, unchanged)
    # The same generator state gives the same corruption (a resumed run redraws it).
    again = mlm_mask(ids, special, 4, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], corrupted) and torch.equal(again[1], labels)


def test_mlm_loss_is_cross_entropy_on_the_chosen_positions_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.full((3, 7), -100)
    labels[0, 2], labels[1, 5], labels[2, 0] = 4, 9, 1
    loss = mlm_loss(logits, labels)
    picked = [(0, 2, 4), (1, 5, 9), (2, 0, 1)]
    expected = -sum(torch.log_softmax(logits[b, p], -1)[c] for b, p, c in picked) / 3
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = torch.zeros_like(logits)
    for b, p, c in picked:  # d CE / d logits = (softmax - one_hot) / N, at chosen positions only
        grad[b, p] = (torch.softmax(logits[b, p].detach(), -1) - F.one_hot(torch.tensor(c), 11)) / 3
    torch.testing.assert_close(logits.grad, grad)


@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (2.5, 0.0), (4.0, 0.3)])
def test_soft_label_loss_matches_its_formula_and_gradient(temperature, hard_weight):
    torch.manual_seed(0)
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(6, 5, requires_grad=True)
    labels = torch.randint(0, 5, (6,))
    loss = soft_label_loss(student, teacher, temperature, labels, hard_weight)
    p_teacher = torch.softmax(teacher.detach() / temperature, -1)
    soft = -(p_teacher * torch.log_softmax(student.detach() / temperature, -1)).sum(-1).mean()
    hard = -torch.log_softmax(student.detach(), -1)[torch.arange(6), labels].mean()
    expected = (1 - hard_weight) * temperature ** 2 * soft + hard_weight * hard
    torch.testing.assert_close(loss, expected)
    loss.backward()
    p_student_t = torch.softmax(student.detach() / temperature, -1)
    p_student = torch.softmax(student.detach(), -1)
    grad = ((1 - hard_weight) * temperature * (p_student_t - p_teacher)
            + hard_weight * (p_student - F.one_hot(labels, 5))) / 6
    torch.testing.assert_close(student.grad, grad)
    assert teacher.grad is None  # the teacher is a target


# ---------------------------------------------------------------------------- the stream

@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    """600 labelled tiny sentences in 4 shards, a 150-sample held-out set, and two
    tokenizers whose ids differ (the second knows extra words, shifting every id)."""
    root = tmp_path_factory.mktemp("text")
    for name, count, seed in (("train", 600, 0), ("test", 150, 1)):
        tiny_text_jsonl(root / f"{name}.jsonl", count, seed)
        pack(str(root / f"{name}.jsonl"), root / name, max_samples_per_shard=150, workers=1,
             progress=False)
    tiny_tokenizer(root / "tokenizer")
    tiny_tokenizer(root / "tokenizer_b", extra_words=["aaa", "aab", "aac"])
    return root


def test_text_stream_resumes_exactly_with_per_role_tokenizers(text_shards):
    text = TextConfig(tokenizers={"teacher": text_shards / "tokenizer_b",
                                  "student": text_shards / "tokenizer"}, max_length=6)

    def make():
        return ShardStream(text_shards / "train", batch_size=16, rank=1, world_size=2,
                           num_workers=2, seed=3, text=text, samples_per_epoch=160,
                           shuffle_buffer=50)

    def take(stream, n):
        iterator = iter(stream)
        return [next(iterator) for _ in range(n)]

    uninterrupted = take(make(), 12)  # 5 batches an epoch: crosses two epoch boundaries
    first = uninterrupted[0]
    for role in ("teacher", "student"):
        ids, mask = first[role]["input_ids"], first[role]["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 16 and ids.shape[1] <= 6
        assert (ids[:, 0] == 2).all()  # [CLS]; truncated to max_length, padded per batch
    assert not torch.equal(first["teacher"]["input_ids"], first["student"]["input_ids"])
    interrupted = make()
    take(interrupted, 7)
    restored = make()
    restored.load_state_dict(interrupted.state_dict())
    for expected, actual in zip(uninterrupted[7:], take(restored, 5)):
        assert actual["key"] == expected["key"] and torch.equal(actual["label"], expected["label"])
        for role in ("teacher", "student"):
            for name in ("input_ids", "attention_mask"):
                assert torch.equal(actual[role][name], expected[role][name])


def test_eval_stream_tokenises_every_held_out_sample_once(text_shards):
    text = TextConfig(tokenizer=text_shards / "tokenizer", max_length=32)
    keys = []
    for rank in (0, 1):
        for batch in EvalStream(text_shards / "test", batch_size=32, rank=rank, world_size=2,
                                text=text):
            assert batch["tokens"]["input_ids"].shape[0] == 32
            keys += [k for k, v in zip(batch["key"], batch["valid"]) if v]
    assert len(keys) == len(set(keys)) == 150


# ---------------------------------------------------------------------------- models

def test_declared_bert_miniature_takes_the_papers_shapes():
    recipe = ModelRecipe("hf:bert", {"num_hidden_layers": 4, "hidden_size": 256,
                                     "task": "sequence_classification", "num_labels": 3})
    assert recipe.family.architecture_problem("bert") is None
    assert "did you mean 'bert'" in recipe.family.architecture_problem("berrt")
    with torch.device("meta"):
        model = recipe.family.create(recipe)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.intermediate_size, config.num_labels) == (4, 256, 4, 1024, 3)


def test_backbone_and_masked_lm_checkpoints_initialise_a_classifier(tmp_path):
    """A BertModel file (no 'bert.' prefix, a pooler) and a BertForMaskedLM file (prefix,
    an MLM head, no pooler) both fit a BertForSequenceClassification, whose head and
    (when absent) pooler start fresh, as from_pretrained would have it."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from distill_engine.weights import expected_shapes, fresh_head_keys, shape_problems
    shapes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 40}
    config = BertConfig(**shapes)
    recipe = ModelRecipe("hf:bert", {**shapes, "num_labels": 3, "task": "sequence_classification"})
    classifier = recipe.family.create(recipe)
    for source in (BertModel(config), BertForMaskedLM(config)):
        state = recipe.family.adapt_state_keys(classifier, source.state_dict())
        want = expected_shapes(classifier)
        have = {k: tuple(v.shape) for k, v in state.items()}
        fresh = fresh_head_keys(want, have, recipe.family.classifier_prefixes(classifier))
        assert shape_problems(want, have, Path("file"), fresh=fresh) is None, type(source)
        assert {k.split(".")[0] for k in fresh} <= {"classifier", "bert"}
        loaded = dict(source.state_dict())
        embeddings = loaded.get("embeddings.word_embeddings.weight",
                                loaded.get("bert.embeddings.word_embeddings.weight"))
        assert torch.equal(state["bert.embeddings.word_embeddings.weight"], embeddings)


# ---------------------------------------------------------------------------- --check

def test_check_refuses_mismatched_modalities_and_untokenised_text(
        tmp_path, text_shards, digits_shards):
    tokenizer = text_shards / "tokenizer"
    common = {"objectives": [{"kind": "cross_entropy"}],
              "optimisation": {"lr": 1e-3, "steps": 2}}
    cases = {
        "text_to_vit": ({"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT},
                        {"train": str(text_shards / "train"), "micro_batch_size": 4,
                         "views": {"geometry": {"size": 32}},
                         "text": {"tokenizer": str(tokenizer)}}, "reads images"),
        "images_to_bert": ({"arch": "hf:bert", "kwargs": {
            "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 50,
            "task": "sequence_classification", "num_labels": 10}},
            {"train": str(digits_shards / "train"), "micro_batch_size": 4}, "reads token ids"),
        "text_without_tokenizer": ({"arch": "hf:bert", "kwargs": {
            "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 50,
            "task": "sequence_classification", "num_labels": 3}},
            {"train": str(text_shards / "train"), "micro_batch_size": 4}, "data.text.tokenizer"),
    }
    for name, (student, data, says) in cases.items():
        spec = write_spec(tmp_path / f"{name}.yaml", {
            "name": name, "run_dir": str(tmp_path / name),
            "stages": [{"name": "s", "student": student, "data": data, **common}]})
        code, out, err = check_in_process(spec)
        assert code == 2, out
        assert says in err and "Traceback" not in err, err
        assert "modality" in err or name == "text_without_tokenizer", err


def test_check_reports_the_tokenizer_vocabulary_and_sequence_length(tmp_path, text_shards):
    student = {"arch": "hf:bert", "kwargs": {"hidden_size": 64, "num_hidden_layers": 1,
                                             "vocab_size": 10, "task": "masked_lm"}}
    stage = {"name": "mlm", "student": student, "objectives": [{"kind": "mlm"}],
             "data": {"train": str(text_shards / "train"), "micro_batch_size": 4,
                      "text": {"tokenizer": str(text_shards / "tokenizer"), "max_length": 1000}},
             "optimisation": {"lr": 1e-3, "steps": 2}}
    spec = write_spec(tmp_path / "mlm.yaml", {"name": "t", "run_dir": str(tmp_path / "run"),
                                              "stages": [stage]})
    code, _, err = check_in_process(spec)
    assert code == 2
    assert "vocab_size: 41" in err and "max_position_embeddings=512" in err, err
    stage["student"]["kwargs"]["vocab_size"] = 41
    stage["data"]["text"]["max_length"] = 16
    write_spec(spec, {"name": "t", "run_dir": str(tmp_path / "run"), "stages": [stage]})
    code, out, err = check_in_process(spec)
    assert code == 0, err
    flat = " ".join(out.replace("│", " ").split())
    assert "(vocabulary 41)" in flat and "at most 16 tokens" in flat, flat
