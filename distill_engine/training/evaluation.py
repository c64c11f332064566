"""Evaluation on the held-out split: what a stage's student is judged by.

- A stage that trains a classifier (an objective with ``trains_classifier``, such as
  ``cross_entropy``) is judged by the top-1 accuracy of that head.
- A stage that trains none (feature distillation, relation, masked modelling) leaves the
  head as it found it (random, or an earlier stage's), so the head's accuracy says nothing.
  Such an encoder is judged by its frozen features: k-nearest-neighbour accuracy of the
  held-out split's features against the training split's (DINO's weighted kNN: cosine
  similarity, k neighbours, each voting exp(similarity / T) for its label; k=20, T=0.07
  as in DINO), which needs no training of its own.
- With ``eval.loss``, also the held-out value of each objective that needs no teacher
  (``heldout/mae``, ``heldout/mlm``, ``heldout/cross_entropy``): a pre-training stage's
  validation loss. Each held-out sample is masked by a seed derived from its key, so every
  evaluation of the stage, at any world size and batch size, masks it alike and the curve
  compares like with like: further pre-training that over-fits shows as this loss turning up
  while the training loss keeps falling.

``data.eval`` alone turns evaluation on, at the end of the stage and every
``eval.every_steps`` steps if set; ``eval: null`` turns it off. Every rank evaluates its
own exact share of each split (``EvalStream``), through the engine's root forward (ZeRO-3
gathers parameters only there), and the counts are summed across ranks. Evaluation draws
no random numbers; it also runs under a forked RNG so that it can never shift training's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_shards import EvalStream, ViewConfig, ViewsConfig
from data_shards.keys import derive_seed
from distill_engine.modeling.inputs import model_inputs, to_model
from distill_engine.objectives import MASK_SEED
from distill_engine.tensors import select_rows

from .models import StudentModel

log = logging.getLogger("distill_engine")


def student_view(views: ViewsConfig) -> ViewConfig:
    """The view the student trains on: its own, else the shared ``image``, else the first."""
    return views.views.get("student", views.views.get("image", next(iter(views.views.values()))))


def test_views(views: ViewsConfig) -> ViewsConfig:
    """The student's view without augmentation: the central square resized, no flip, no
    colour jitter, the same normalisation (what ``export.preprocessing`` records)."""
    geometry = views.geometry.model_copy(update={"crop": "center", "hflip": 0.0})
    return ViewsConfig(geometry=geometry, views={
        "image": student_view(views).model_copy(update={"color_jitter": None})})


def trains_classifier(stage) -> bool:
    return any(type(o).trains_classifier for o in stage.objectives)


def describe(stage) -> str:
    """What will be evaluated, for ``--check``."""
    if stage.data.eval is None:
        return "nothing (no data.eval)"
    if stage.eval is None:
        return "nothing (eval: null)"
    when = [f"every {stage.eval.every_steps} steps"] if stage.eval.every_steps else []
    when += ["at the end"] if stage.eval.at_end else []
    if not when:
        return "nothing (eval.at_end is false and eval.every_steps unset)"
    if trains_classifier(stage):
        what = "top-1 accuracy of the trained classifier"
    else:
        what = (f"kNN accuracy of the frozen features (k={stage.eval.knn_k}, cosine, "
                f"T={stage.eval.knn_temperature}; train split {stage.data.train} as "
                f"neighbours): no objective trains the classifier")
    if stage.eval.loss:
        what = f"held-out {', '.join(heldout_terms(stage))} loss and {what}"
    return f"{what} on {stage.data.eval}, {' and '.join(when)}"


def heldout_terms(stage) -> list[str]:
    """The objectives whose held-out value ``eval.loss`` measures: those needing no teacher."""
    return [o.label for o in stage.objectives if not o.needs_teacher]


class Evaluation:
    """The evaluation of one stage's student engine."""

    def __init__(self, stage, device: torch.device, dtype: torch.dtype,
                 num_classes: int | None = None):
        self.stage, self.device, self.dtype = stage, device, dtype
        self.num_classes = num_classes  # the head's: other labels are bad samples, not misses
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.views = test_views(stage.data.views)
        self.knn = not trains_classifier(stage)
        self.loss_terms = heldout_terms(stage) if self.enabled and stage.eval.loss else []

    @property
    def enabled(self) -> bool:
        return self.stage.data.eval is not None and self.stage.eval is not None

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to evaluate after ``step``; the end of the stage has its own call."""
        every = self.stage.eval.every_steps if self.enabled else None
        return bool(every) and step % every == 0 and step < total_steps

    def at_end(self) -> bool:
        return self.enabled and self.stage.eval.at_end

    @torch.no_grad()
    def __call__(self, engine) -> dict[str, Any]:
        """``{"accuracy": ...}`` (the head) or ``{"knn_accuracy": ...}``, and ``samples``;
        with ``eval.loss``, ``heldout/TERM`` too."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        engine.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                losses = self._heldout_loss(engine) if self.loss_terms else {}
                result = self._knn(engine) if self.knn else self._head(engine)
        finally:
            engine.train()
        if losses:
            log.info("%s: held-out loss %s", self.stage.name,
                     ", ".join(f"{k.removeprefix('heldout/')} {v:.4f}" for k, v in losses.items()))
        if result:
            name = "kNN accuracy" if self.knn else "held-out accuracy"
            value = result.get("knn_accuracy", result.get("accuracy"))
            log.info("%s: %s %.2f%% on %d samples", self.stage.name, name, 100 * value,
                     result["samples"])
        return {**losses, **result}

    def _stream(self, urls) -> EvalStream:
        return EvalStream(urls, batch_size=self.stage.eval.batch_size, rank=self.rank,
                          world_size=self.world_size, views=self.views,
                          allow_pipe=self.stage.data.allow_pipe,
                          max_image_pixels=self.stage.data.max_image_pixels,
                          num_classes=None if self.knn else self.num_classes,
                          text=self.stage.data.text)

    def _inputs(self, batch: dict[str, Any]) -> Any:
        return to_model(model_inputs(batch, "student"), self.device, self.dtype)

    def _head(self, engine) -> dict[str, Any]:
        counts = torch.zeros(2, dtype=torch.float64)
        for batch in self._stream(self.stage.data.eval):
            if "label" not in batch:
                return self._unlabelled()
            predictions = engine(StudentModel.output, self._inputs(batch)).argmax(-1).cpu()
            valid = batch["valid"]
            counts[0] += (predictions[valid] == batch["label"][valid]).sum()
            counts[1] += valid.sum()
        return self._accuracy("accuracy", self._sum(counts))

    def _heldout_loss(self, engine) -> dict[str, float]:
        """Each teacher-free objective's mean over the held-out split, padding left out. A
        batch's value weighs by its samples: the exact mean for MAE (every sample has as
        many masked patches), the sample-weighted mean of batch means for MLM."""
        sums = torch.zeros(len(self.loss_terms) + 1, dtype=torch.float64)
        for batch in self._stream(self.stage.data.eval):
            valid = batch["valid"]
            count = int(valid.sum())
            if count:  # a batch of padding alone still runs: the other ranks' gathers wait on it
                batch = select_rows(batch, valid)
            batch[MASK_SEED] = torch.tensor([derive_seed("heldout", key) for key in batch["key"]])
            batch = to_model(batch, self.device, torch.float32)
            # The mask comes from each sample's seed; the generator only names the device.
            batch = engine.module.prepare(batch, torch.Generator(self.device))
            terms = engine(StudentModel.teacherless_terms, self._inputs(batch), batch)
            if count:
                values = torch.stack([terms[name].detach().double().cpu() for name in self.loss_terms])
                sums += torch.cat([values * count, torch.tensor([float(count)], dtype=torch.float64)])
        sums = self._sum(sums)
        if not sums[-1]:
            return {}
        return {f"heldout/{name}": (sums[i] / sums[-1]).item() for i, name in enumerate(self.loss_terms)}

    def _knn(self, engine) -> dict[str, Any]:
        train = self._features(engine, self.stage.data.train)
        test = self._features(engine, self.stage.data.eval)
        if train is None or test is None:
            # Unlabelled pre-training text: the held-out loss, when asked for, is the measure.
            return {} if self.loss_terms else self._unlabelled()
        # Every rank needs every training feature as a neighbour; each classifies its own
        # share of the held-out split.
        train_features, train_labels = (self._gather(t) for t in train)
        correct, count = knn_votes(train_features, train_labels, *test,
                                   k=self.stage.eval.knn_k,
                                   temperature=self.stage.eval.knn_temperature)
        return self._accuracy("knn_accuracy", self._sum(torch.tensor(
            [correct, count], dtype=torch.float64)))

    def _features(self, engine, urls) -> tuple[torch.Tensor, torch.Tensor] | None:
        """L2-normalised features [N, D] and labels [N] (-1 on padding) of this rank's share."""
        features, labels = [], []
        for batch in self._stream(urls):
            if "label" not in batch:
                return None
            features.append(F.normalize(engine(StudentModel.features, self._inputs(batch)).float(),
                                        dim=-1).cpu())
            labels.append(torch.where(batch["valid"], batch["label"], -1))
        return torch.cat(features), torch.cat(labels)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors one after another (EvalStream gives every rank the same
        number of rows)."""
        if not dist.is_initialized() or self.world_size == 1:
            return tensor
        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).cpu()

    def _sum(self, counts: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            counts = counts.to(self.device)
            dist.all_reduce(counts)
        return counts.cpu()

    def _accuracy(self, name: str, counts: torch.Tensor) -> dict[str, Any]:
        return {name: (counts[0] / counts[1]).item() if counts[1] else float("nan"),
                "samples": int(counts[1])}

    def _unlabelled(self) -> dict[str, Any]:
        log.warning("%s: the shards carry no labels; nothing to evaluate", self.stage.name)
        return {}


def knn_votes(train_features: torch.Tensor, train_labels: torch.Tensor,
              test_features: torch.Tensor, test_labels: torch.Tensor, k: int,
              temperature: float, chunk: int = 1024) -> tuple[int, int]:
    """DINO's weighted kNN on L2-normalised features: the k most cosine-similar training
    samples each vote exp(similarity / temperature) for their label; the label with the most
    weight wins. Rows labelled -1 (padding) are neither neighbours nor counted. Returns
    (correct, counted)."""
    keep = train_labels >= 0
    train_features, train_labels = train_features[keep], train_labels[keep]
    classes = int(train_labels.max()) + 1 if len(train_labels) else 1
    k = min(k, len(train_labels))
    correct = counted = 0
    for start in range(0, len(test_features), chunk):
        features, labels = test_features[start:start + chunk], test_labels[start:start + chunk]
        valid = labels >= 0
        if not valid.any() or k == 0:
            continue
        similarity, index = (features[valid] @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(int(valid.sum()), classes).scatter_add_(
            1, train_labels[index], (similarity / temperature).exp())
        correct += int((votes.argmax(1) == labels[valid]).sum())
        counted += int(valid.sum())
    return correct, counted
