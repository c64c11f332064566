"""TinyMIM relation distillation: the math against a loop-per-head reference, chunking, and the
objective wired to real timm / Hugging Face models through forward hooks."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
from pydantic import ValidationError
from transformers import BertConfig, BertModel

from distill_engine.objectives import OBJECTIVES, ObjectiveError, TapShapes, build_objective
from distill_engine.objectives.relation import (RelationConfig, RelationDistillation, relation_kl,
                                                tinymim_relation_loss)


# ----------------------------------------------------------------------------- reference

# The objective computes in fp32, the reference in fp64. A KL of two nearly equal attention
# maps is small (4e-4 for the untrained BERTs below) against log-probabilities of order
# log(tokens) ~ 2.4, whose fp32 rounding (~1e-7) stays in it: a relative bound alone failed
# on one CPU by 5e-9. A formula error moves the value by orders of magnitude more.
FP32_KL = {"rel": 1e-5, "abs": 1e-7}


def reference_relation_kl(student_q, student_k, teacher_q, teacher_k, heads):
    """The formula written out: per sample, per teacher head, channels [h*d, (h+1)*d) on each
    side, softmax rows, KL(T || S) summed over keys, averaged over samples, heads and rows."""
    student_q, student_k, teacher_q, teacher_k = (
        t.detach().double() for t in (student_q, student_k, teacher_q, teacher_k))
    batch, tokens, student_width = student_q.shape
    d_s, d_t = student_width // heads, teacher_q.shape[-1] // heads
    total = 0.0
    for b in range(batch):
        for h in range(heads):
            s_cols, t_cols = slice(h * d_s, (h + 1) * d_s), slice(h * d_t, (h + 1) * d_t)
            student = torch.softmax(student_q[b, :, s_cols] @ student_k[b, :, s_cols].T
                                    / math.sqrt(d_s), dim=-1)
            teacher = torch.softmax(teacher_q[b, :, t_cols] @ teacher_k[b, :, t_cols].T
                                    / math.sqrt(d_t), dim=-1)
            total += (teacher * (teacher.log() - student.log())).sum().item()
    return total / (batch * heads * tokens)


def reference_loss_from_fused(student_qkv, teacher_qkv, heads, qk_weight=1.0, vv_weight=1.0):
    c_s, c_t = student_qkv.shape[-1] // 3, teacher_qkv.shape[-1] // 3
    sq, sk, sv = (student_qkv[..., i * c_s:(i + 1) * c_s] for i in range(3))
    tq, tk, tv = (teacher_qkv[..., i * c_t:(i + 1) * c_t] for i in range(3))
    return (qk_weight * reference_relation_kl(sq, sk, tq, tk, heads)
            + vv_weight * reference_relation_kl(sv, sv, tv, tv, heads))


# ----------------------------------------------------------------------------- the math

def test_relation_kl_matches_reference_with_head_regrouping():
    # ViT-S student (6 heads of 64 over 384) against a ViT-B teacher (12 heads of 64 over 768):
    # the student is split into the teacher's 12 heads of 32.
    torch.manual_seed(0)
    batch, tokens = 2, 17
    student_q, student_k = torch.randn(2, batch, tokens, 384).unbind(0)
    teacher_q, teacher_k = (2 * torch.randn(2, batch, tokens, 768)).unbind(0)
    value = relation_kl(student_q, student_k, teacher_q, teacher_k, heads=12)
    expected = reference_relation_kl(student_q, student_k, teacher_q, teacher_k, heads=12)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, **FP32_KL)
    # Splitting the student into its own 6 heads instead is a different quantity.
    assert expected != pytest.approx(
        reference_relation_kl(student_q, student_k, teacher_q[..., :384], teacher_k[..., :384], 6),
        rel=1e-3)


def test_full_loss_matches_reference_with_weights_and_low_precision_inputs():
    torch.manual_seed(1)
    student_qkv = torch.randn(3, 9, 3 * 48).to(torch.bfloat16)
    teacher_qkv = (1.5 * torch.randn(3, 9, 3 * 96)).to(torch.bfloat16)
    loss = tinymim_relation_loss(student_qkv.chunk(3, -1), teacher_qkv.chunk(3, -1), heads=6,
                                 qk_weight=0.5, vv_weight=2.0)
    assert loss.dtype == torch.float32  # computed in float32 whatever the tap dtype
    expected = reference_loss_from_fused(student_qkv, teacher_qkv, 6, qk_weight=0.5, vv_weight=2.0)
    assert loss.item() == pytest.approx(expected, **FP32_KL)


def test_loss_is_zero_iff_relations_match():
    torch.manual_seed(2)
    qkv = torch.randn(2, 10, 3 * 64)
    assert tinymim_relation_loss(qkv.chunk(3, -1), qkv.chunk(3, -1), heads=4).abs().item() < 1e-6
    other = torch.randn(2, 10, 3 * 64)
    assert tinymim_relation_loss(qkv.chunk(3, -1), other.chunk(3, -1), heads=4).item() > 1e-2


@pytest.mark.parametrize("chunk_rows", [1, 4, 22, 23, 100])
def test_chunked_equals_unchunked_values_and_gradients(chunk_rows):
    torch.manual_seed(3)
    tokens = 23  # not a multiple of most chunk sizes: the last chunk is short
    student_qkv = torch.randn(2, tokens, 3 * 32, requires_grad=True)
    teacher_qkv = 2 * torch.randn(2, tokens, 3 * 64)

    def loss_and_grad(chunk):
        student_qkv.grad = None
        loss = tinymim_relation_loss(student_qkv.chunk(3, -1), teacher_qkv.chunk(3, -1), heads=8,
                                     qk_weight=1.0, vv_weight=0.7, chunk_rows=chunk)
        loss.backward()
        return loss.detach(), student_qkv.grad.clone()

    full_loss, full_grad = loss_and_grad(None)
    chunked_loss, chunked_grad = loss_and_grad(chunk_rows)
    assert full_grad.abs().max() > 0
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-4, atol=1e-7)


def test_teacher_is_a_target_without_gradient():
    torch.manual_seed(4)
    student_qkv = torch.randn(1, 5, 3 * 16, requires_grad=True)
    teacher_qkv = torch.randn(1, 5, 3 * 16, requires_grad=True)
    for chunk in (None, 2):
        tinymim_relation_loss(student_qkv.chunk(3, -1), teacher_qkv.chunk(3, -1), heads=2,
                              chunk_rows=chunk).backward()
    assert teacher_qkv.grad is None and student_qkv.grad is not None


def _saved_for_backward_bytes(chunk_rows):
    """Bytes of the distinct storages autograd keeps for backward of one relation loss."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    student_qkv = torch.randn(2, 128, 3 * 32, requires_grad=True)
    teacher_qkv = torch.randn(2, 128, 3 * 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tinymim_relation_loss(student_qkv.chunk(3, -1), teacher_qkv.chunk(3, -1),
                                     heads=4, chunk_rows=chunk_rows)
    loss.backward()
    input_bytes = sum(t.untyped_storage().nbytes() for t in (student_qkv, teacher_qkv))
    return sum(storages.values()), input_bytes


def test_chunking_does_not_keep_every_chunks_relations_for_backward():
    # Unchunked keeps several [B, h, N, N] float32 tensors (512 KiB each here). Chunked must keep
    # only O(B N C) chunk inputs (head-split q, k), not each chunk's [B, h, rows, N] tensors,
    # which would add up to as much as unchunked.
    relation_bytes = 2 * 4 * 128 * 128 * 4
    unchunked_saved, _ = _saved_for_backward_bytes(None)
    chunked_saved, input_bytes = _saved_for_backward_bytes(32)
    assert unchunked_saved >= 2 * relation_bytes
    assert chunked_saved <= 2 * input_bytes < relation_bytes


def _peak_live_tensor_bytes(chunk_rows):
    """Most bytes held by live torch tensors during one forward + backward (CPU allocation and
    free events of the profiler, summed in time order)."""
    student_qkv = torch.randn(2, 256, 3 * 32, requires_grad=True)
    teacher_qkv = torch.randn(2, 256, 3 * 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profiler:
        tinymim_relation_loss(student_qkv.chunk(3, -1), teacher_qkv.chunk(3, -1), heads=4,
                              chunk_rows=chunk_rows).backward()
    events = sorted((e for e in profiler.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda e: e.start_ns())
    return max(itertools.accumulate(e.nbytes() for e in events))


def test_chunked_peak_memory_stays_below_one_full_relation():
    relation_bytes = 2 * 4 * 256 * 256 * 4  # one [B, h, N, N] float32 tensor: 2 MiB
    assert _peak_live_tensor_bytes(None) > 4 * relation_bytes
    assert _peak_live_tensor_bytes(16) < relation_bytes


# ----------------------------------------------------------------------------- config

def test_config_needs_exactly_one_tap_style_per_model():
    RelationConfig(student_qkv="blocks.1.attn.qkv", teacher_qkv="blocks.3.attn.qkv")
    RelationConfig(student_q="a.q", student_k="a.k", student_v="a.v", teacher_qkv="b.qkv")
    with pytest.raises(ValidationError, match="not both"):
        RelationConfig(student_qkv="a.qkv", student_q="a.q", teacher_qkv="b.qkv")
    with pytest.raises(ValidationError, match="teacher_qkv"):
        RelationConfig(student_qkv="a.qkv", teacher_q="b.q", teacher_k="b.k")
    with pytest.raises(ValidationError):
        RelationConfig(student_qkv="a.qkv", teacher_qkv="b.qkv", chunk_rows=0)
    with pytest.raises(ValidationError, match="both 0"):
        RelationConfig(student_qkv="a.qkv", teacher_qkv="b.qkv", qk_weight=0, vv_weight=0)
    cfg = RelationConfig(student_q="a.q", student_k="a.k", student_v="a.v", teacher_qkv="b.qkv")
    assert cfg.student_taps() == ["a.q", "a.k", "a.v"] and cfg.teacher_taps() == ["b.qkv"]
    assert OBJECTIVES["relation"] is RelationDistillation


# ----------------------------------------------------------------------------- real models

def meta_tap_shapes(build, taps, make_input):
    """What the runtime hands an objective: the model built on the meta device, and the shapes
    of the tapped module outputs from a meta forward."""
    with torch.device("meta"):
        model = build()
        shapes = {}
        hooks = [model.get_submodule(tap).register_forward_hook(
            lambda module, args, output, tap=tap: shapes.__setitem__(tap, tuple(output.shape)))
            for tap in taps]
        with torch.no_grad():
            model(make_input())
    for hook in hooks:
        hook.remove()
    return shapes, model


def run_with_taps(model, taps, inputs):
    captured = {}
    hooks = [model.get_submodule(tap).register_forward_hook(
        lambda module, args, output, tap=tap: captured.__setitem__(tap, output)) for tap in taps]
    model(inputs)
    for hook in hooks:
        hook.remove()
    return captured


def tiny_vit(embed_dim, heads, depth):
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=embed_dim, num_heads=heads, depth=depth, num_classes=0)


def test_objective_on_timm_vits_through_qkv_hooks():
    torch.manual_seed(5)
    batch = 2
    build_student = lambda: tiny_vit(48, 3, 2)   # noqa: E731  last block: blocks.1
    build_teacher = lambda: tiny_vit(96, 6, 4)   # noqa: E731  intermediate block: blocks.2
    config = RelationConfig(student_qkv="blocks.1.attn.qkv", teacher_qkv="blocks.2.attn.qkv",
                            chunk_rows=5)
    images = lambda: torch.randn(batch, 3, 32, 32)  # noqa: E731
    student_shapes, meta_student = meta_tap_shapes(build_student, config.student_taps(), images)
    teacher_shapes, meta_teacher = meta_tap_shapes(build_teacher, config.teacher_taps(), images)
    assert student_shapes == {"blocks.1.attn.qkv": (batch, 17, 144)}  # 4x4 patches + CLS
    objective = build_objective(config, TapShapes(student_shapes, teacher_shapes,
                                                  meta_student, meta_teacher))
    assert objective.heads == 6  # read from the teacher's blocks.2.attn.num_heads

    student, teacher = build_student(), build_teacher().eval()
    x = torch.randn(batch, 3, 32, 32)
    student_taps = run_with_taps(student, config.student_taps(), x)
    with torch.no_grad():
        teacher_taps = run_with_taps(teacher, config.teacher_taps(), x)
    loss = objective(student_taps, teacher_taps, {})

    # The tap is the block's qkv = W_qkv LN1(x) + b, recomputed here from the block input.
    block_inputs = {}
    for name, model in (("student", student), ("teacher", teacher)):
        block = model.blocks[1 if name == "student" else 2]
        block.register_forward_pre_hook(
            lambda module, args, name=name: block_inputs.__setitem__(name, args[0]))
    with torch.no_grad():
        student(x), teacher(x)
        student_qkv = student.blocks[1].attn.qkv(student.blocks[1].norm1(block_inputs["student"]))
        teacher_qkv = teacher.blocks[2].attn.qkv(teacher.blocks[2].norm1(block_inputs["teacher"]))
    expected = reference_loss_from_fused(student_qkv, teacher_qkv, heads=6)
    assert loss.item() == pytest.approx(expected, **FP32_KL)

    loss.backward()
    assert student.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_objective_on_bert_with_separate_projections():
    torch.manual_seed(6)
    batch, tokens = 2, 11

    def bert(hidden, heads, layers):
        return lambda: BertModel(BertConfig(vocab_size=50, hidden_size=hidden,
                                            num_attention_heads=heads, num_hidden_layers=layers,
                                            intermediate_size=2 * hidden,
                                            max_position_embeddings=32))

    student_layer = "encoder.layer.1.attention.self"
    teacher_layer = "encoder.layer.2.attention.self"
    config = RelationConfig(
        student_q=f"{student_layer}.query", student_k=f"{student_layer}.key",
        student_v=f"{student_layer}.value", teacher_q=f"{teacher_layer}.query",
        teacher_k=f"{teacher_layer}.key", teacher_v=f"{teacher_layer}.value", vv_weight=0.5)
    ids = lambda: torch.randint(0, 50, (batch, tokens))  # noqa: E731
    student_shapes, meta_student = meta_tap_shapes(bert(32, 2, 2), config.student_taps(), ids)
    teacher_shapes, meta_teacher = meta_tap_shapes(bert(64, 4, 3), config.teacher_taps(), ids)
    objective = build_objective(config, TapShapes(student_shapes, teacher_shapes,
                                                  meta_student, meta_teacher))
    assert objective.heads == 4  # the teacher's num_attention_heads; student 32 -> 4 heads of 8

    student, teacher = bert(32, 2, 2)().eval(), bert(64, 4, 3)().eval()
    input_ids = torch.randint(0, 50, (batch, tokens))
    student_taps = run_with_taps(student, config.student_taps(), input_ids)
    with torch.no_grad():
        teacher_taps = run_with_taps(teacher, config.teacher_taps(), input_ids)
    loss = objective(student_taps, teacher_taps, {})
    sq, sk, sv = (student_taps[t] for t in config.student_taps())
    tq, tk, tv = (teacher_taps[t] for t in config.teacher_taps())
    expected = (reference_relation_kl(sq, sk, tq, tk, 4)
                + 0.5 * reference_relation_kl(sv, sv, tv, tv, 4))
    assert loss.item() == pytest.approx(expected, **FP32_KL)
    loss.backward()
    assert student.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0


def test_swin_teacher_against_vit_student_is_refused_clearly():
    images = lambda: torch.randn(2, 3, 32, 32)  # noqa: E731
    build_swin = lambda: timm.create_model(  # noqa: E731
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
        embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=0)
    config = RelationConfig(student_qkv="blocks.1.attn.qkv",
                            teacher_qkv="layers.0.blocks.1.attn.qkv")
    student_shapes, meta_student = meta_tap_shapes(lambda: tiny_vit(48, 3, 2),
                                                   config.student_taps(), images)
    teacher_shapes, meta_teacher = meta_tap_shapes(build_swin, config.teacher_taps(), images)
    shapes = TapShapes(student_shapes, teacher_shapes, meta_student, meta_teacher)
    with pytest.raises(ObjectiveError) as error:
        build_objective(config, shapes)
    message = str(error.value)
    assert "teacher's attention at ['layers.0.blocks.1.attn.qkv'] runs per local window" in message
    assert str(list(teacher_shapes["layers.0.blocks.1.attn.qkv"])) in message  # [B*4, 16, 96]
    assert "student's at ['blocks.1.attn.qkv']" in message
    assert str(list(student_shapes["blocks.1.attn.qkv"])) in message
    # Without the module (only shapes), the batch x windows dimension still gives it away.
    with pytest.raises(ObjectiveError, match="runs per local window"):
        build_objective(config, TapShapes(student_shapes, teacher_shapes))


def test_unworkable_shapes_are_refused():
    config = RelationConfig(student_qkv="s.qkv", teacher_qkv="t.qkv")
    with pytest.raises(ObjectiveError, match="17 tokens and the teacher 65"):
        build_objective(config, TapShapes({"s.qkv": (2, 17, 144)}, {"t.qkv": (2, 65, 288)}))
    with pytest.raises(ObjectiveError, match="width 40 .* not divisible by 6"):
        build_objective(config.model_copy(update={"heads": 6}),
                        TapShapes({"s.qkv": (2, 17, 120)}, {"t.qkv": (2, 17, 288)}))
    with pytest.raises(ObjectiveError, match="set 'heads'"):
        build_objective(config, TapShapes({"s.qkv": (2, 17, 144)}, {"t.qkv": (2, 17, 288)}))
    with pytest.raises(ObjectiveError, match=r"needs qkv projection outputs \[B, N, C\]"):
        build_objective(config, TapShapes({"s.qkv": (2, 144)}, {"t.qkv": (2, 17, 288)}))
