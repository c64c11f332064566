"""TinyMIM relation distillation (Ren et al., "TinyMIM: An Empirical Study of Distilling MIM
Pre-trained Models", CVPR 2023).

Relations come from one transformer block's qkv projection output
(``qkv = W_qkv LN1(x) + b``), split into Q, K, V of width C and each into h heads of width
d = C / h, CLS token included:

    R_QK = softmax_rows(Q K^T / sqrt(d)),   R_VV = softmax_rows(V V^T / sqrt(d)),  [B, h, N, N]

Teacher: an intermediate block (ViT-L: block 18 of 24, timm ``blocks.17.attn.qkv``).
Student: its last block. Heads are compared one for one, so the student's Q, K, V are split
into the *teacher's* head count (d_s = C_s / h_t, and the student's scale uses d_s).

Loss, teacher as target, per query row i: KL(T || S) = sum_j T_ij (log T_ij - log S_ij),
averaged over batch, heads and rows:

    L = qk_weight * KL(R_QK^T || R_QK^S) + vv_weight * KL(R_VV^T || R_VV^S)

computed in float32. With ``chunk_rows`` the loss is computed over blocks of query rows, each
under activation checkpointing, so neither forward nor backward ever holds more than one
block's [B, h, rows, N] tensors; the value and gradients equal the unchunked ones.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Objective, ObjectiveConfig, ObjectiveError, TapShapes, register

# ----------------------------------------------------------------------------- the math

def split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, heads, N, C // heads]; head i owns channels [i*d, (i+1)*d)."""
    batch, num_tokens, width = tokens.shape
    return tokens.reshape(batch, num_tokens, heads, width // heads).transpose(1, 2)


def split_fused_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv projection output [B, N, 3C] -> Q, K, V, each [B, N, C] (timm's layout)."""
    return qkv.chunk(3, dim=-1)


def _kl_of_rows(student_q_rows: torch.Tensor, student_k: torch.Tensor,
                teacher_q_rows: torch.Tensor, teacher_k: torch.Tensor,
                student_scale: float, teacher_scale: float) -> torch.Tensor:
    """Sum over the given query rows of KL(T_row || S_row); inputs [B, h, rows|N, d]."""
    # Scaling the [rows, d] queries rather than the [rows, N] products saves an N-wide pass.
    # No names for the logits: they are freed as soon as log_softmax has read them.
    student_log = torch.log_softmax(
        (student_q_rows * student_scale) @ student_k.transpose(-2, -1), dim=-1)
    teacher_log = torch.log_softmax(
        (teacher_q_rows * teacher_scale) @ teacher_k.transpose(-2, -1), dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum()


def relation_kl(student_q: torch.Tensor, student_k: torch.Tensor,
                teacher_q: torch.Tensor, teacher_k: torch.Tensor,
                heads: int, chunk_rows: int | None = None) -> torch.Tensor:
    """KL(softmax(Q_t K_t^T / sqrt(d_t)) || softmax(Q_s K_s^T / sqrt(d_s))), mean over B, h, rows.

    All inputs are token maps [B, N, C] (C may differ between student and teacher); both
    sides are split into ``heads`` heads, d = C / heads on each side. For the V-V relation
    pass V as both ``q`` and ``k``. The teacher is the target: no gradient flows into it.

    ``chunk_rows``: compute over blocks of that many query rows, each checkpointed, so peak
    memory is O(B h chunk_rows N) in forward and backward instead of O(B h N^2).
    """
    batch, num_tokens, _ = student_q.shape

    def heads_of(tokens):  # contiguous once here (O(B N C)), not a copy in every chunk's matmul
        return split_heads(tokens.float(), heads).contiguous()

    # The V-V relation passes one tensor as q and k: split it once.
    same_student, same_teacher = student_k is student_q, teacher_k is teacher_q
    student_q, teacher_q = heads_of(student_q), heads_of(teacher_q.detach())
    student_k = student_q if same_student else heads_of(student_k)
    teacher_k = teacher_q if same_teacher else heads_of(teacher_k.detach())
    student_scale = student_q.shape[-1] ** -0.5
    teacher_scale = teacher_q.shape[-1] ** -0.5

    if chunk_rows is None or chunk_rows >= num_tokens:
        total = _kl_of_rows(student_q, student_k, teacher_q, teacher_k,
                            student_scale, teacher_scale)
    else:
        # Checkpointing keeps only the (cheap) inputs of each block for backward and recomputes
        # the block's [B, h, rows, N] tensors there, one block at a time.
        needs_checkpoint = torch.is_grad_enabled() and (student_q.requires_grad
                                                        or student_k.requires_grad)
        total = student_q.new_zeros(())
        for start in range(0, num_tokens, chunk_rows):
            rows = slice(start, start + chunk_rows)
            args = (student_q[:, :, rows], student_k, teacher_q[:, :, rows], teacher_k,
                    student_scale, teacher_scale)
            if needs_checkpoint:
                total = total + checkpoint(_kl_of_rows, *args, use_reentrant=False)
            else:
                total = total + _kl_of_rows(*args)
    return total / (batch * heads * num_tokens)


def tinymim_relation_loss(student_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                          teacher_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                          heads: int, qk_weight: float = 1.0, vv_weight: float = 1.0,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """qk_weight * KL(R_QK^T || R_QK^S) + vv_weight * KL(R_VV^T || R_VV^S).

    ``student_qkv`` / ``teacher_qkv``: (Q, K, V), each [B, N, C] (C may differ between models).
    """
    student_q, student_k, student_v = student_qkv
    teacher_q, teacher_k, teacher_v = teacher_qkv
    loss = student_q.new_zeros((), dtype=torch.float32)
    if qk_weight:
        loss = loss + qk_weight * relation_kl(student_q, student_k, teacher_q, teacher_k,
                                              heads, chunk_rows)
    if vv_weight:
        loss = loss + vv_weight * relation_kl(student_v, student_v, teacher_v, teacher_v,
                                              heads, chunk_rows)
    return loss


# ----------------------------------------------------------------------------- the config

class RelationConfig(ObjectiveConfig):
    """Taps are either one fused qkv projection per model (timm: ``blocks.11.attn.qkv``) or
    three separate projections (Hugging Face BERT-style:
    ``encoder.layer.5.attention.self.query`` / ``.key`` / ``.value``)."""

    kind: Literal["relation"] = "relation"
    student_qkv: str | None = Field(None, description="student's fused qkv projection, "
                                    "e.g. its last block's blocks.11.attn.qkv")
    student_q: str | None = None
    student_k: str | None = None
    student_v: str | None = None
    teacher_qkv: str | None = Field(None, description="teacher's fused qkv projection, "
                                    "e.g. blocks.17.attn.qkv")
    teacher_q: str | None = None
    teacher_k: str | None = None
    teacher_v: str | None = None
    heads: int | None = Field(None, ge=1, description="relation heads; default: the teacher "
                              "attention module's num_heads / num_attention_heads")
    qk_weight: float = Field(1.0, ge=0.0)
    vv_weight: float = Field(1.0, ge=0.0)
    chunk_rows: int | None = Field(None, ge=1, description="query rows per checkpointed chunk; "
                                   "None computes all rows at once")

    @model_validator(mode="after")
    def _one_tap_style_per_model(self):
        for side in ("student", "teacher"):
            fused = getattr(self, f"{side}_qkv")
            separate = [getattr(self, f"{side}_{p}") for p in "qkv"]
            if fused is not None and any(s is not None for s in separate):
                raise ValueError(f"give either {side}_qkv or {side}_q/{side}_k/{side}_v, not both")
            if fused is None and not all(s is not None for s in separate):
                raise ValueError(f"give {side}_qkv (a fused qkv projection) or all three of "
                                 f"{side}_q, {side}_k, {side}_v (separate projections)")
        if self.qk_weight == 0 and self.vv_weight == 0:
            raise ValueError("qk_weight and vv_weight are both 0: the relation loss would be 0")
        return self

    def _taps(self, side: str) -> list[str]:
        fused = getattr(self, f"{side}_qkv")
        return [fused] if fused is not None else [getattr(self, f"{side}_{p}") for p in "qkv"]

    def student_taps(self) -> list[str]:
        return self._taps("student")

    def teacher_taps(self) -> list[str]:
        return self._taps("teacher")


# ----------------------------------------------------------------------------- the objective

def _parent_module(model: nn.Module | None, tap: str) -> nn.Module | None:
    """The module owning a projection tap (the attention module), or None if unknown."""
    if model is None or "." not in tap:
        return None
    try:
        return model.get_submodule(tap.rsplit(".", 1)[0])
    except AttributeError:
        return None


def _is_window_attention(attention: nn.Module | None) -> bool:
    """Swin / SwinV2 window attention (timm ``WindowAttention``, ``WindowMultiHeadAttention``).

    Not just "has ``window_size``": BEiT's global attention stores its patch grid under that
    name for the relative position bias.
    """
    return attention is not None and "Window" in type(attention).__name__


def _heads_of(attention: nn.Module | None) -> int | None:
    """timm attention: ``num_heads``; Hugging Face: ``num_attention_heads`` (or its config)."""
    if attention is None:
        return None
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attention, name, None), int):
            return getattr(attention, name)
    return getattr(getattr(attention, "config", None), "num_attention_heads", None)


@register("relation")
class RelationDistillation(Objective):
    Config = RelationConfig

    def __init__(self, config: RelationConfig, shapes: TapShapes):
        super().__init__(config, shapes)
        student_taps, teacher_taps = config.student_taps(), config.teacher_taps()
        student_shapes = [tuple(shapes.student[t]) for t in student_taps]
        teacher_shapes = [tuple(shapes.teacher[t]) for t in teacher_taps]
        described = (f"student taps {student_taps} give {[list(s) for s in student_shapes]}, "
                     f"teacher taps {teacher_taps} give {[list(s) for s in teacher_shapes]}")

        for shape in student_shapes + teacher_shapes:
            if len(shape) != 3:
                raise ObjectiveError(
                    f"relation distillation needs qkv projection outputs [B, N, C]; {described}. "
                    f"Tap the linear layer(s) that compute q, k, v inside one attention block")

        teacher_attention = _parent_module(shapes.teacher_model, teacher_taps[0])
        student_attention = _parent_module(shapes.student_model, student_taps[0])
        # Window attention runs on [B * windows, Nw, C]: a larger batch dimension gives it away
        # even when the owning module is unknown.
        teacher_windowed = (_is_window_attention(teacher_attention)
                            or teacher_shapes[0][0] > student_shapes[0][0])
        student_windowed = (_is_window_attention(student_attention)
                            or student_shapes[0][0] > teacher_shapes[0][0])
        if teacher_windowed or student_windowed:
            windowed, windowed_taps, windowed_shape = (
                ("teacher", teacher_taps, teacher_shapes[0]) if teacher_windowed
                else ("student", student_taps, student_shapes[0]))
            other, other_taps, other_shape = (
                ("student", student_taps, student_shapes[0]) if teacher_windowed
                else ("teacher", teacher_taps, teacher_shapes[0]))
            raise ObjectiveError(
                f"the {windowed}'s attention at {windowed_taps} runs per local window "
                f"(Swin-style: its qkv output {list(windowed_shape)} is [batch x windows, "
                f"tokens per window, 3C]), while the {other}'s at {other_taps} "
                f"({list(other_shape)}) attends globally over all tokens of each image. A "
                f"windowed model's relations [B*windows, h, Nw, Nw] only relate tokens within "
                f"each window, so they cannot be matched row for row against a global ViT's "
                f"[B, h, N, N] token layout. Use global-attention models (plain ViTs) on both "
                f"sides of relation distillation, or distill from a windowed teacher with the "
                f"feature objective instead")

        if student_shapes[0][1] != teacher_shapes[0][1]:
            raise ObjectiveError(
                f"relations are compared token for token, but the student has "
                f"{student_shapes[0][1]} tokens and the teacher {teacher_shapes[0][1]}; "
                f"{described}. Give both models the same patch grid (image size / patch size) "
                f"and the same prefix tokens (CLS, registers)")

        heads = config.heads if config.heads is not None else _heads_of(teacher_attention)
        if heads is None:
            raise ObjectiveError(
                f"cannot tell the teacher's head count: the module owning {teacher_taps[0]!r} "
                f"has no num_heads / num_attention_heads; set 'heads' in the relation config")
        self.heads = heads

        for side, taps, shapes_ in (("student", student_taps, student_shapes),
                                    ("teacher", teacher_taps, teacher_shapes)):
            if len(taps) == 1 and shapes_[0][-1] % 3:
                raise ObjectiveError(
                    f"{side} tap {taps[0]!r} gives width {shapes_[0][-1]}, which is not 3 x C; "
                    f"a fused qkv tap must be the projection computing q, k and v together")
            if len(taps) == 3 and shapes_[0][-1] != shapes_[1][-1]:
                raise ObjectiveError(
                    f"{side} query tap {taps[0]!r} has width {shapes_[0][-1]} but key tap "
                    f"{taps[1]!r} has {shapes_[1][-1]}; Q K^T needs equal widths. {described}")
            widths = [shapes_[0][-1] // 3] if len(taps) == 1 else [s[-1] for s in shapes_]
            for width in widths:
                if width % heads:
                    raise ObjectiveError(
                        f"{side} q/k/v width {width} (taps {taps}) is not divisible by {heads} "
                        f"relation heads (the teacher's head count unless 'heads' is set); heads "
                        f"are compared one for one, so each {side} width must split into "
                        f"{heads} equal heads. {described}")

    def _qkv(self, taps: dict, names: list[str]):
        if len(names) == 1:
            return split_fused_qkv(taps[names[0]])
        return tuple(taps[name] for name in names)

    def memory_per_sample(self) -> tuple[float, str]:
        """The [h, rows, N] fp32 relation maps: per relation, the student's logits and
        log-softmax, the teacher's log-softmax and probabilities. Unchunked, both relations'
        maps are alive together (kept for the backward); chunked, one block of rows at a
        time (each block is recomputed in the backward)."""
        cfg = self.config
        tokens = self.shapes["teacher"][cfg.teacher_taps()[0]][1]
        relations = (cfg.qk_weight > 0) + (cfg.vv_weight > 0)
        rows = min(cfg.chunk_rows or tokens, tokens)
        maps = 4 * self.heads * rows * tokens * (relations if rows == tokens else 1)
        widths = sum(math.prod(shape[1:]) for side in self.shapes.values() for shape in side.values())
        how = (f"{relations} relation(s) x 4 maps [h={self.heads}, N={tokens}, N] fp32"
               if rows == tokens else f"4 maps [h={self.heads}, {rows} rows, N={tokens}] fp32 "
               f"(chunk_rows {cfg.chunk_rows})")
        return 4 * (maps + widths), how + " + fp32 q/k/v split into heads"

    def forward(self, student_taps, teacher_taps, batch, student=None):
        cfg = self.config
        return tinymim_relation_loss(self._qkv(student_taps, cfg.student_taps()),
                                     self._qkv(teacher_taps, cfg.teacher_taps()),
                                     heads=self.heads, qk_weight=cfg.qk_weight,
                                     vv_weight=cfg.vv_weight, chunk_rows=cfg.chunk_rows)
