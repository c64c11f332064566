"""What a stage is evaluated by, decided from its spec (``--check`` says it), and the kNN
vote that judges a stage which trains no classifier. (The real evaluation, on 2 ranks, is
in test_engine_distributed.py.)"""

from __future__ import annotations

import re

import torch
from test_spec import good_spec  # noqa: F401  (the fixture)

from distill_engine.spec.schema import JobSpec, with_stage_defaults
from distill_engine.training.evaluation import describe, knn_votes

from helpers import TINY_VIT, check_in_process, write_spec


def job(eval_section=..., data_eval="shards/holdout") -> JobSpec:
    raw = {
        "name": "eval-test", "run_dir": "run",
        "data": {"train": "shards/train", "eval": data_eval, "micro_batch_size": 4},
        "optimisation": {"lr": 1e-3, "steps": 4},
        "stages": [
            {"name": "fd", "teacher": {"arch": "timm:vit_tiny_patch16_224", "kwargs": TINY_VIT},
             "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": TINY_VIT},
             "objectives": [{"kind": "feature"}]},
            {"name": "finetune", "student": {"arch": "stage:fd", "init": "stage:fd"},
             "objectives": [{"kind": "cross_entropy"}]},
        ],
    }
    if eval_section is not ...:
        raw["eval"] = eval_section
    return JobSpec.model_validate(with_stage_defaults(raw))


def test_data_eval_alone_turns_evaluation_on():
    fd, finetune = job().stages
    assert describe(fd).startswith("kNN accuracy of the frozen features (k=20")
    assert "no objective trains the classifier" in describe(fd)
    assert describe(finetune) == ("top-1 accuracy of the trained classifier on shards/holdout, "
                                  "at the end")


def test_periodic_evaluation_and_the_ways_to_turn_it_off():
    fd, _ = job({"every_steps": 2}).stages
    assert describe(fd).endswith("every 2 steps and at the end")
    assert all(describe(s) == "nothing (eval: null)" for s in job(None).stages)
    assert all(describe(s) == "nothing (no data.eval)" for s in job(data_eval=None).stages)


def test_check_prints_what_each_stage_is_evaluated_by(tmp_path, good_spec):
    # good_spec: an FD stage and a fine-tuning stage, data.eval given, no eval section
    # at the top level.
    code, out, err = check_in_process(write_spec(tmp_path / "job.yaml", good_spec))
    assert code == 0, err
    text = " ".join(re.sub(r"[│┃║|]", " ", out).split())
    assert "evaluation kNN accuracy of the frozen features (k=20" in text
    assert "evaluation top-1 accuracy of the trained classifier on" in text


def test_weighted_votes_let_a_close_neighbour_outvote_two_far_ones():
    # Training features: one of class 0 close to the query, two of class 1 farther away.
    train = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.05], [0.6, 0.8], [0.6, -0.8], [0.0, 0.0]]), dim=-1)
    labels = torch.tensor([0, 1, 1, -1])  # the last row is padding: never a neighbour
    query = torch.tensor([[1.0, 0.0]])
    assert knn_votes(train, labels, query, torch.tensor([0]), k=3, temperature=0.07) == (1, 1)
    # A high temperature makes the votes nearly equal: the majority (class 1) wins.
    assert knn_votes(train, labels, query, torch.tensor([0]), k=3, temperature=100.0) == (0, 1)
    # Padding queries are not counted.
    assert knn_votes(train, labels, torch.cat([query, query]), torch.tensor([0, -1]), k=3,
                     temperature=0.07) == (1, 1)


def test_knn_of_separable_clusters_is_exact():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4)
    train_labels = torch.arange(4).repeat(25)
    test_labels = torch.arange(4).repeat(10)
    noise = lambda n: 0.05 * torch.randn(n, 4, generator=generator)  # noqa: E731
    train = torch.nn.functional.normalize(centres[train_labels] + noise(100), dim=-1)
    test = torch.nn.functional.normalize(centres[test_labels] + noise(40), dim=-1)
    assert knn_votes(train, train_labels, test, test_labels, k=20, temperature=0.07,
                     chunk=7) == (40, 40)


def test_evaluation_leaves_the_training_random_state_as_it_was(digits_shards):
    """Training's dropout and drop path draw from torch's global generator; an evaluation
    between two steps must not shift what they draw (the quickstart's accuracies stay the
    same with periodic evaluation)."""
    from data_shards import ShardIndex
    from distill_engine.training.evaluation import Evaluation

    class DrawingEncoder(torch.nn.Module):  # a model that draws random numbers as it runs
        def forward(self, entry, inputs):  # called as the engine is: with an entry point
            pixels = torch.nn.functional.adaptive_avg_pool2d(inputs, 8).flatten(1)
            return pixels + 0.01 * torch.rand(pixels.shape)

    stage = job(data_eval=str(digits_shards / "holdout")).stages[0].model_copy(update={
        "data": job(data_eval=str(digits_shards / "holdout")).stages[0].data.model_copy(
            update={"train": str(digits_shards / "train")})})
    torch.manual_seed(5)
    before = torch.get_rng_state()
    result = Evaluation(stage, torch.device("cpu"), torch.float32)(DrawingEncoder())
    assert torch.equal(torch.get_rng_state(), before)
    assert result["samples"] == ShardIndex.load(digits_shards / "holdout").total
    assert 0.5 < result["knn_accuracy"] <= 1.0  # raw pixels of digits are good neighbours
