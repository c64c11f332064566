"""Hugging Face folders a spec names are data: a model or tokenizer folder that asks for its
own code is refused without running it (and without a question on stdin), the sizes a
config.json gives obey the same limits as a spec's kwargs, and a classifier's export
names its classes. The --check runs are real ``launch/run.py`` processes, with their exit
code and peak memory measured (``helpers.run_check_measured``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_check_measured, tiny_text_splits, tiny_tokenizer, write_spec

MiB = 1024 ** 2
# What refusing a folder may add to the peak memory of the --check of a good spec
# (importing torch, transformers and timm is about 1 GB here).
HEADROOM = 200 * MiB
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 41}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Labelled tiny text shards, their tokenizer, and a BERT model folder (config.json)."""
    from transformers import BertConfig
    root = tmp_path_factory.mktemp("hf")
    tiny_text_splits(root / "data", {"train": (60, 0, True)})
    tiny_tokenizer(root / "tokenizer")
    BertConfig(**TINY_BERT).save_pretrained(root / "bert")
    return root


def classifier_spec(path: Path, text: Path, arch: str, tokenizer: Path,
                    kwargs: dict | None = None) -> Path:
    kwargs = {"task": "sequence_classification", "num_labels": 3} if kwargs is None else kwargs
    stage = {"name": "cls", "objectives": [{"kind": "cross_entropy"}],
             "student": {"arch": arch, "kwargs": kwargs},
             "data": {"train": str(text / "data" / "train"), "micro_batch_size": 4,
                      "text": {"tokenizer": str(tokenizer), "max_length": 16}},
             "optimisation": {"lr": 1e-3, "steps": 2}}
    return write_spec(path, {"name": "hf", "run_dir": str(path.parent / "run"), "stages": [stage]})


@pytest.fixture(scope="module")
def baseline_rss(text, tmp_path_factory) -> int:
    """Peak memory of --check on a good spec: the model folder and the tokenizer as saved."""
    spec = classifier_spec(tmp_path_factory.mktemp("good") / "job.yaml", text,
                           f"hf:{text / 'bert'}", text / "tokenizer")
    code, _, err, rss = run_check_measured(spec)
    assert code == 0, err
    return rss


def problems(err: str) -> list[str]:
    assert err.startswith("job spec ") and "Traceback" not in err, err
    return [line.removeprefix("  - ") for line in err.splitlines()[1:]]


# ---------------------------------------------------------------------------- 1. no code

def _runs_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('the folder ran its code')\n"


def model_folder_with_code(text: Path, root: Path, marker: Path) -> Path:
    """A BERT folder whose config.json names a model type and classes of its own Python
    files (what a downloaded hub repository with custom code looks like)."""
    folder = root / "custom_model"
    folder.mkdir()
    config = json.loads((text / "bert" / "config.json").read_text())
    config.update(model_type="custom-bert", auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForSequenceClassification": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        _runs_code(marker) + "from transformers import BertConfig\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n")
    (folder / "modeling_custom.py").write_text(
        _runs_code(marker) + "from transformers import BertForSequenceClassification\n"
        "from .configuration_custom import CustomConfig\n"
        "class CustomModel(BertForSequenceClassification):\n    config_class = CustomConfig\n")
    return folder


def tokenizer_with_code(root: Path, marker: Path) -> Path:
    folder = tiny_tokenizer(root / "custom_tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer",
                  auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_custom.py").write_text(
        _runs_code(marker) + "from transformers import PreTrainedTokenizerFast\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder


@pytest.mark.parametrize("what", ["model", "tokenizer"])
def test_folders_with_their_own_code_are_refused_without_running_it(
        text, tmp_path, baseline_rss, what):
    marker = tmp_path / "MARKER"
    if what == "model":
        arch, tokenizer = f"hf:{model_folder_with_code(text, tmp_path, marker)}", text / "tokenizer"
        where, folder = "stages[0].student.arch", Path(arch[3:])
    else:
        arch, tokenizer = f"hf:{text / 'bert'}", tokenizer_with_code(tmp_path, marker)
        where, folder = "stages[0].data.text.tokenizer", tokenizer
    spec = classifier_spec(tmp_path / "job.yaml", text, arch, tokenizer)
    # Before, transformers asked "Do you wish to run the custom code? [y/N]" on stdin, and
    # this answer ran the folder's files (for the tokenizer, --check then passed).
    code, out, err, rss = run_check_measured(spec, stdin="y\n")
    assert not marker.exists(), "the folder's code ran"
    assert code == 2, out + err
    assert "Do you wish to run the custom code" not in out + err
    lines = problems(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{where}: {folder} asks for code of its own: "), lines
    assert "auto_map" in lines[0] and "never run code" in lines[0], lines
    print(f"\n{what} with code: exit {code}, peak {rss / MiB:.0f} MiB (good spec: "
          f"{baseline_rss / MiB:.0f} MiB)")
    assert rss < baseline_rss + HEADROOM, (rss / MiB, baseline_rss / MiB)


def test_every_hf_load_passes_trust_remote_code_false():
    """Beside the refusal: no load of a config, model or tokenizer leaves the choice to
    transformers, whose default is to ask on stdin."""
    import ast
    from helpers import ROOT
    unguarded = []
    for path in [*(ROOT / "distill_engine").rglob("*.py"), *(ROOT / "data_shards").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if keywords.get("trust_remote_code") != "False":
                    unguarded.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unguarded, unguarded


# ---------------------------------------------------------------------------- 2. sizes

@pytest.mark.parametrize("key,value,says", [
    ("num_hidden_layers", 1_000_000, "num_hidden_layers 1000000 is beyond any real model"),
    ("num_labels", 1_000_000_000, "num_labels 1000000000 is beyond any real model"),
])
def test_sizes_in_config_json_obey_the_limits_before_anything_is_built(
        text, tmp_path, baseline_rss, key, value, says):
    folder = tmp_path / "big"
    folder.mkdir()
    config = json.loads((text / "bert" / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    # The config file's num_labels, not the spec's: the kwargs leave it out.
    spec = classifier_spec(tmp_path / "job.yaml", text, f"hf:{folder}", text / "tokenizer",
                           {"task": "sequence_classification"})
    # Before: a million BertLayers (4.9 GB after 2 min), or 10^9 id2label entries (5 GB).
    code, out, err, rss = run_check_measured(spec, timeout=240)
    assert code == 2, (code, out[-2000:], err[-2000:])
    lines = problems(err)
    assert lines == [f"stages[0].student.arch: {folder / 'config.json'}: {says} (at most "
                     f"{'1,024' if key == 'num_hidden_layers' else '1,000,000'}); check for a "
                     f"typo"], lines
    print(f"\n{key} {value} in config.json: exit {code}, peak {rss / MiB:.0f} MiB (good spec: "
          f"{baseline_rss / MiB:.0f} MiB)")
    assert rss < baseline_rss + HEADROOM, (rss / MiB, baseline_rss / MiB)


# ---------------------------------------------------------------------------- 11. class names

def test_a_classifier_export_names_the_shards_classes(text, tmp_path):
    """The export as a stage writes it (the family's ``write_export``, given the class names
    of the shards' index as the trainer gives them): transformers' pipeline says the name."""
    import torch
    from transformers import pipeline

    from data_shards import ShardIndex
    from distill_engine.families import ModelRecipe
    names = ShardIndex.load(text / "data" / "train").classes
    assert names == ["negative", "neutral", "positive"]
    recipe = ModelRecipe("hf:bert", {**TINY_BERT, "task": "sequence_classification",
                                     "num_labels": 3})
    model = recipe.family.create(recipe)
    with torch.no_grad():  # a classifier that always says class 2
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    out = tmp_path / "export"
    out.mkdir()
    recipe.family.write_export(model.state_dict(), recipe, model, out,
                               {"label_names": names, "tokenizer": text / "tokenizer"})
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    classify = pipeline("text-classification", model=str(out), tokenizer=str(out))
    assert classify("a lovely film")[0]["label"] == "positive"
