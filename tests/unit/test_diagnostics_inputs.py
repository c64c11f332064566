"""The attention diagnostics command's ordinary mistakes: each is exit 2 with one paragraph
(no traceback), and a complete timm export is read by its own weights file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill_engine.diagnostics.__main__ import main as diagnostics_main
from distill_engine.families import ModelRecipe
from helpers import tiny_text_splits

VIT = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2,
       "num_classes": 10}


def timm_export(out: Path) -> Path:
    """A stage's export of a tiny timm ViT, as the family writes it, with the probe beside."""
    from safetensors.torch import save_file
    recipe = ModelRecipe("timm:vit_tiny_patch16_224", dict(VIT))
    torch.manual_seed(0)
    model = recipe.family.create(recipe)
    out.mkdir(parents=True)
    recipe.family.write_export(model.state_dict(), recipe, model, out, {"stage": "fd"})
    save_file({"input": torch.zeros(2, 3, 8, 8)}, str(out / "probe.safetensors"))
    return out


def hf_export(out: Path) -> Path:
    recipe = ModelRecipe("hf:bert", {"hidden_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "intermediate_size": 32,
                                     "vocab_size": 30, "task": "masked_lm"})
    model = recipe.family.create(recipe)
    out.mkdir(parents=True)
    recipe.family.write_export(model.state_dict(), recipe, model, out, {})
    return out


def run(*args: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = diagnostics_main(["attention", *args])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


def test_a_complete_timm_export_is_read_by_its_weights(tmp_path, digits_shards, capsys):
    export = timm_export(tmp_path / "export")
    common = ["--shards", str(digits_shards / "holdout"), "--samples", "8"]
    assert run("--model", str(export), "--out", str(tmp_path / "a"), *common, capsys=capsys)[0] == 0
    assert run("--model", "timm:vit_tiny_patch16_224", "--kwargs", json.dumps(VIT),
               "--weights", str(export / "model.safetensors"), "--out", str(tmp_path / "b"),
               *common, capsys=capsys)[0] == 0
    by_export = json.loads((tmp_path / "a" / "attention.json").read_text())["fd"]
    by_name = json.loads((tmp_path / "b" / "attention.json").read_text())["vit_tiny_patch16_224"]
    assert by_export["layers"] == by_name["layers"]


def _damaged(export: Path) -> None:
    (export / "config.json").write_text('{"architecture": "vit_tiny_patch16_224", ')


def _unknown(export: Path) -> None:
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "architecture": "no_such_vit"}))


@pytest.mark.parametrize("case,says", [
    ("hf_export", "is a Hugging Face transformers export (model_type 'bert'); attention "
                  "diagnostics read timm vision transformers"),
    ("no_weights", "has no model.safetensors, the export's weights"),
    ("damaged_config", "config.json cannot be read as JSON (JSONDecodeError"),
    ("unknown_architecture", "config.json does not build a timm model: Unknown model (no_such_vit)"),
    ("text_shards", "holds text shards (its index.json says modality 'text'); attention "
                    "diagnostics need image shards"),
    ("out_is_a_file", "is a file; attention.json and attention.png are written into a folder"),
    ("negative_samples", "argument --samples: -5 is not a count; give 1 or more"),
])
def test_ordinary_mistakes_are_exit_2_with_one_paragraph(tmp_path, digits_shards, capsys,
                                                         case, says):
    model, shards, out = None, str(digits_shards / "holdout"), tmp_path / "out"
    extra: list[str] = []
    if case == "hf_export":
        model = hf_export(tmp_path / "export")
    else:
        model = timm_export(tmp_path / "export")
    if case == "no_weights":
        (model / "model.safetensors").unlink()  # before: timm loaded probe.safetensors
    elif case == "damaged_config":
        _damaged(model)
    elif case == "unknown_architecture":
        _unknown(model)
    elif case == "text_shards":
        shards = str(tiny_text_splits(tmp_path / "text", {"train": (20, 0, True)}) / "train")
    elif case == "out_is_a_file":
        out.write_text("a file")
    elif case == "negative_samples":
        extra = ["--samples", "-5"]
    code, err = run("--model", str(model), "--shards", shards, "--out", str(out), *extra,
                    capsys=capsys)
    assert code == 2, err
    assert says in err and "Traceback" not in err, err
    # One paragraph: the last line (argparse prints its usage lines before it).
    assert says in err.strip().splitlines()[-1], err
    if case != "negative_samples":
        assert len(err.strip().splitlines()) == 1, err
    if case == "out_is_a_file":
        assert out.read_text() == "a file"
