"""Masked-language-model pre-training (BERT's recipe, as the compact students of "Well-Read
Students Learn Better" are pre-trained): corrupt 15 % of the tokens, predict the originals.

Only the chosen positions are scored: the student's output projection (hidden size x the
vocabulary, 30,522 for BERT) runs on their hidden states alone, gathered before it
(``families.hf.PREDICT_AT``), instead of on every position of which 85 % are thrown away.
The loss is the same cross-entropy over the same positions."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from distill_engine.families.hf import PREDICT_AT, output_projection
from distill_engine.modeling.inputs import ORIGINAL_STUDENT, model_inputs
from distill_engine.modeling.taps import OUTPUT

from .base import Objective, ObjectiveConfig, ObjectiveError, TapShapes, register, sample_generators

IGNORE = -100  # the label of a position that is not predicted (cross_entropy's ignore_index)
LABELS = "mlm_labels"  # where prepare leaves the labels in the batch


def mlm_mask(input_ids: torch.Tensor, special_tokens_mask: torch.Tensor, mask_token_id: int,
             vocab_size: int, generator: torch.Generator,
             probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: returns ``(corrupted ids, labels)``.

    Each position is chosen with ``probability``, never where ``special_tokens_mask`` is true
    (special tokens and padding). ``labels`` holds the original id where a position was chosen
    and -100 elsewhere. Of the chosen positions, 80 % become ``mask_token_id``, 10 % a token
    drawn uniformly from ``[0, vocab_size)``, and 10 % stay unchanged. Every draw comes from
    ``generator``, so the same generator state gives the same corruption.
    """
    device = input_ids.device

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)

    chosen = (uniform() < probability) & ~special_tokens_mask.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    kind = uniform()  # one draw per position decides mask (< 0.8), random (< 0.9) or keep
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=device,
                               dtype=input_ids.dtype)
    corrupted = torch.where(chosen & (kind < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, corrupted)
    return corrupted, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the chosen positions only (labels [B, L], != -100), averaged over
    them; 0 (with a gradient path) when a batch happens to have none.

    ``logits`` are the scores at every position [B, L, vocab], or at the chosen positions
    alone [K, vocab] in row-major order (``labels[labels != -100]``'s order), which is what
    the student gives when its output projection ran on those only."""
    chosen = labels != IGNORE
    scored = logits[chosen] if logits.dim() == labels.dim() + 1 else logits
    if scored.shape[0] != int(chosen.sum()):
        raise ValueError(f"mlm: {scored.shape[0]} scored positions for "
                         f"{int(chosen.sum())} chosen ones")
    if not chosen.any():
        return scored.float().sum() * 0.0
    return F.cross_entropy(scored.float(), labels[chosen])


class MLMConfig(ObjectiveConfig):
    kind: Literal["mlm"] = "mlm"
    probability: float = Field(0.15, gt=0.0, lt=1.0, description="share of tokens chosen")
    student_tap: str = Field("output", description="the token logits [B, L, vocab]")
    needs_teacher: ClassVar[bool] = False

    def student_taps(self) -> list[str]:
        return [self.student_tap]


@register("mlm")
class MaskedLM(Objective):
    """``prepare`` corrupts the student's token ids with the step's generator (a resumed run
    draws the same mask) and keeps the labels in the batch; the loss reads the student's
    logits."""

    Config = MLMConfig

    def __init__(self, config: MLMConfig, shapes: TapShapes):
        super().__init__(config, shapes)
        shape = shapes.student[config.student_tap]
        if len(shape) != 3:
            raise ObjectiveError(
                f"mlm needs token logits [B, L, vocab] at student tap {config.student_tap!r}, "
                f"which gives {list(shape)}; give the student kwargs task: masked_lm")
        if shapes.student_tokenizer is None:
            raise ObjectiveError("mlm needs the student's tokenizer (its mask token and special "
                                 "tokens): set data.text.tokenizer (or tokenizers.student)")
        self.vocab_size = int(shape[-1])
        self.tokenizer_dir = shapes.student_tokenizer
        self.mask_token_id: int | None = None
        self.special_ids: list[int] = []
        from data_shards import DataError, load_tokenizer
        try:
            tokenizer = load_tokenizer(shapes.student_tokenizer)
        except DataError:
            # Not there (yet) or broken: the text checks report it at data.text (for --plan
            # of a recipe whose data is still to come, as a warning). Shapes and memory do
            # not depend on it, and no stage trains with a tokenizer that does not load.
            return
        if tokenizer.mask_token_id is None:
            raise ObjectiveError(f"the tokenizer in {shapes.student_tokenizer} has no mask token")
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self.vocab_size = int(shape[-1])
        # Score the chosen positions alone when the logits are the model's own output, made
        # by a projection we can gather before (a benchmark turns it off to compare).
        self.gather_before_decoder = (config.student_tap == OUTPUT and
                                      output_projection(shapes.student_model) is not None)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        if self.mask_token_id is None:  # the check refuses such a stage; said, not an AttributeError
            raise ObjectiveError(f"mlm: the tokenizer in {self.tokenizer_dir} did not load")
        inputs = model_inputs(batch, "student")
        ids = inputs["input_ids"]
        special = torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        if "attention_mask" in inputs:
            special |= inputs["attention_mask"] == 0
        per_sample = sample_generators(batch, generator)
        if per_sample is None:
            corrupted, labels = mlm_mask(ids, special, self.mask_token_id, self.vocab_size,
                                         generator, self.config.probability)
        else:  # replayed targets: each sample's recorded mask seed, row by row
            rows = [mlm_mask(ids[i:i + 1], special[i:i + 1], self.mask_token_id, self.vocab_size,
                             g, self.config.probability) for i, g in enumerate(per_sample)]
            corrupted, labels = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        # The student's own entry: a teacher reading the shared "tokens" still sees the text,
        # and the entry replaced stays in the batch for objectives that need it (hidden).
        student = {**inputs, "input_ids": corrupted}
        if self.gather_before_decoder:
            student[PREDICT_AT] = labels != IGNORE
        return {**batch, ORIGINAL_STUDENT: batch.get(ORIGINAL_STUDENT, inputs),
                "student": student, LABELS: labels}

    def forward(self, student_taps, teacher_taps, batch, student=None):
        return mlm_loss(student_taps[self.config.student_tap], batch[LABELS])
