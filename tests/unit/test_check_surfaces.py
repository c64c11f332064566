"""What ``--check`` and ``--plan`` must see before any rank starts on the newer surfaces
(MAE masks, text recipes without their data yet, tokenizers, the command line, run
directories): each hole is a one-paragraph problem at its YAML path or flag, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, check_in_process, write_spec


def problem_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line.removeprefix("  - ") for line in err.splitlines()[1:]]


# ---------------------------------------------------------------------------- 12. MAE masks

def mae_spec(tmp_path: Path, digits_shards: Path, mask_ratio: float) -> Path:
    stage = {"name": "mae", "objectives": [{"kind": "mae", "mask_ratio": mask_ratio}],
             "student": {"arch": f"hf:{ROOT / 'jobs' / 'configs' / 'digits_vit_mae'}",
                         "kwargs": {"task": "mae_pretraining"}, "dtype": "fp32"},
             "data": {"train": str(digits_shards / "train"), "micro_batch_size": 8,
                      "views": {"geometry": {"size": 24}}},
             "optimisation": {"lr": 1e-3, "steps": 2}}
    return write_spec(tmp_path / "mae.yaml", {"name": "m", "run_dir": str(tmp_path / "run"),
                                              "stages": [stage]})


def test_an_mae_mask_that_leaves_no_patch_is_refused_at_its_yaml_path(tmp_path, digits_shards):
    # 24 px in patches of 4: L = 36; ViTMAE keeps int(36 x (1 - ratio)) patches.
    for ratio in (0.9999, 0.98):
        code, out, err = check_in_process(mae_spec(tmp_path, digits_shards, ratio))
        assert code == 2, out + err
        assert problem_lines(err) == [
            f"stages[0].objectives[0].mask_ratio: mask_ratio {ratio} keeps int(36 x (1 - "
            f"{ratio})) = 0 of the student's 36 patches (ViTMAE keeps int(L x (1 - "
            f"mask_ratio))), so the encoder would see none; use at most 1 - 1/36 = 0.972222 "
            f"(MAE's is 0.75)"]
    code, out, err = check_in_process(mae_spec(tmp_path, digits_shards, 0.972222))  # keeps 1
    assert code == 0, err


# ---------------------------------------------------------------------------- 7. text recipes before their data

def well_read_in_a_fresh_clone(tmp_path: Path) -> Path:
    """jobs/well_read_students.yaml with its data folder where nothing has been made yet
    (as in a fresh clone, before scripts/well_read_students.sh)."""
    text = (ROOT / "jobs" / "well_read_students.yaml").read_text()
    text = text.replace("data/well_read", str(tmp_path / "data" / "well_read"))
    text = text.replace("runs/well_read_students", str(tmp_path / "run"))
    spec = tmp_path / "well_read_students.yaml"
    spec.write_text(text)
    return spec


def test_check_of_a_text_recipe_before_its_data_lists_what_is_missing(tmp_path):
    spec = well_read_in_a_fresh_clone(tmp_path)
    code, out, err = check_in_process(spec)
    # Before: a DataError traceback from the mlm objective's constructor.
    assert code == 2, out + err
    lines = problem_lines(err)
    tokenizer = [line for line in lines if "tokenizer directory" in line]
    assert tokenizer == [f"data.text.tokenizer: tokenizer directory {tmp_path}/data/well_read/"
                         f"minilm does not exist; name a local directory saved by a Hugging "
                         f"Face tokenizer's save_pretrained (with tokenizer.json)."], lines
    assert not [line for line in lines if ".objectives[" in line], lines
    assert f"stages[0].student.arch: model directory {tmp_path}/data/well_read/minilm does " \
           f"not exist" in err


def test_plan_of_a_text_recipe_before_its_data_plans_it_with_warnings(tmp_path):
    spec = well_read_in_a_fresh_clone(tmp_path)
    code, out, err = check_in_process(spec, "--plan")
    assert code == 0, out + err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert f"warning: data.text.tokenizer: tokenizer directory {tmp_path}/data/well_read/minilm " \
           f"does not exist" in err, err
    # The teacher's model folder is the same missing directory, and the pre-trained L3 is
    # converted into another: the teacher's stage, the recording of its soft labels, the
    # stages that read them and those of the L3 cannot be planned, and say so; the
    # masked-LM student's own stages (7, 9) are.
    assert [w.split(":")[1].strip() for w in warnings if "is not planned" in w] == [
        "stages[0]", "stages[1]", "stages[2]", "stages[3]", "stages[4]", "stages[5]",
        "stages[6]", "stages[8]"], warnings
    flat = " ".join(out.split())
    for stage in ("student_mlm", "pd_finetune"):
        assert f"{stage}: memory per GPU at 2 GPUs" in flat, flat


class RaisingConfig:
    """Stand-in for an objective a project registers (the registry is open to new kinds):
    its constructor fails with something other than an ObjectiveError."""


def test_any_exception_an_objective_raises_while_checking_is_a_problem(tmp_path, digits_shards):
    from distill_engine.objectives import OBJECTIVES, Objective, ObjectiveConfig
    from distill_engine.planning import model_checks
    from distill_engine.planning.job import StageRefs
    from distill_engine.families import InputShape, ModelRecipe
    from distill_engine.spec.schema import StageSpec
    from helpers import TINY_VIT, TINY_VIT_ARCH

    class Broken(Objective):
        def __init__(self, config, shapes):
            super().__init__(config, shapes)
            raise KeyError("blocks.9")  # e.g. a module the objective looks up by name

    class BrokenConfig(ObjectiveConfig):
        kind: str = "broken"
        needs_teacher = False

    OBJECTIVES["broken"] = Broken
    try:
        stage = StageSpec.model_validate({
            "name": "s", "student": {"arch": TINY_VIT_ARCH, "kwargs": TINY_VIT},
            "objectives": [{"kind": "cross_entropy"}],
            "data": {"train": str(digits_shards / "train"), "micro_batch_size": 4},
            "optimisation": {"lr": 1e-3, "steps": 2}})
        stage.objectives = [BrokenConfig()]
        refs = StageRefs("s", tmp_path / "s", None, ModelRecipe(TINY_VIT_ARCH, TINY_VIT), None,
                         [], [])
        problems: list = []
        model_checks.check_models(0, stage, refs, InputShape(image_size=32), problems)
    finally:
        del OBJECTIVES["broken"]
    assert problems == [("stages[0].objectives[0]", "the broken objective cannot be built for "
                         "these models: KeyError: 'blocks.9'")]


# ---------------------------------------------------------------------------- 14, 15. tokenizers

def word_tokenizer(directory: Path, first_word_id: int = 5, pad: bool = True) -> Path:
    """A fast tokenizer over the tiny text's words; ids from ``first_word_id`` on (gaps
    past the specials when larger than 5); with or without a padding token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from helpers import FILLER, TEXT_WORDS
    words = sorted({w for ws in TEXT_WORDS.values() for w in ws} | set(FILLER))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({word: first_word_id + i for i, word in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
               "mask_token": "[MASK]", **({"pad_token": "[PAD]"} if pad else {})}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    from helpers import tiny_text_splits
    return tiny_text_splits(tmp_path_factory.mktemp("text"), {"train": (40, 0, True)}) / "train"


def text_spec(tmp_path: Path, shards: Path, tokenizer: Path, vocab_size: int) -> Path:
    stage = {"name": "cls", "objectives": [{"kind": "cross_entropy"}],
             "student": {"arch": "hf:bert", "kwargs": {
                 "hidden_size": 32, "num_hidden_layers": 1, "vocab_size": vocab_size,
                 "task": "sequence_classification", "num_labels": 3}},
             "data": {"train": str(shards), "micro_batch_size": 4,
                      "text": {"tokenizer": str(tokenizer), "max_length": 16}},
             "optimisation": {"lr": 1e-3, "steps": 2}}
    return write_spec(tmp_path / "job.yaml", {"name": "t", "run_dir": str(tmp_path / "run"),
                                              "stages": [stage]})


def test_tokenizer_ids_past_the_vocabulary_are_refused(tmp_path, text_shards):
    tokenizer = word_tokenizer(tmp_path / "gaps", first_word_id=1000)  # 41 tokens, ids to 1,035
    code, out, err = check_in_process(text_spec(tmp_path, text_shards, tokenizer, 41))
    # Before: len(tokenizer) 41 <= vocab_size 41 passed; the first step's embedding lookup
    # raised IndexError on every rank.
    assert code == 2, out + err
    assert problem_lines(err) == [
        f"stages[0].data.text.tokenizer: the tokenizer in {tokenizer} gives ids up to 1,035 (its 41 "
        f"tokens have gaps), but the student hf:bert embeds only vocab_size=41; give the "
        f"student kwargs vocab_size: 1036 (or the tokenizer it was trained with)"]
    code, out, err = check_in_process(text_spec(tmp_path, text_shards, tokenizer, 1036))
    assert code == 0, err


def test_a_tokenizer_without_a_padding_token_is_refused(tmp_path, text_shards):
    tokenizer = word_tokenizer(tmp_path / "no_pad", pad=False)
    code, out, err = check_in_process(text_spec(tmp_path, text_shards, tokenizer, 41))
    # Before: --check passed; every rank died in its first step ("Asking to pad but the
    # tokenizer does not have a padding token").
    assert code == 2, out + err
    (line,) = problem_lines(err)
    assert line.startswith(f"stages[0].data.text.tokenizer: the tokenizer in {tokenizer} has "
                           f"no padding "
                           f"token (GPT-2-style tokenizers have none)"), line


# ---------------------------------------------------------------------------- 16. --world-size

def tiny_spec(tmp_path: Path, digits_shards: Path, run_dir: Path | str | None = None) -> Path:
    from helpers import DIGITS_STUDENT, TINY_VIT_ARCH
    stage = {"name": "ce", "objectives": [{"kind": "cross_entropy"}],
             "student": {"arch": TINY_VIT_ARCH, "kwargs": DIGITS_STUDENT},
             "data": {"train": str(digits_shards / "train"), "micro_batch_size": 32,
                      "views": {"geometry": {"size": 24}}},
             "optimisation": {"lr": 1e-3, "steps": 2}}
    return write_spec(tmp_path / "job.yaml", {
        "name": "t", "run_dir": str(run_dir or tmp_path / "run"), "stages": [stage]})


@pytest.mark.parametrize("flags", [["--check", "--world-size", "-3"],
                                   ["--check", "--world-size", "0"],
                                   ["--plan", "--world-size=-2"]])
def test_a_world_size_below_one_is_refused_naming_the_flag(tmp_path, digits_shards, capsys, flags):
    from distill_engine.cli.main import main as cli_main
    spec = tiny_spec(tmp_path, digits_shards)
    # Before: "32 per rank x -3 ranks = -96" and a valid spec; 0 silently 1; a plan of
    # "-2037.8 MiB" that fit.
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--spec", str(spec), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    value = flags[-1].split("=")[-1]
    assert err.strip().splitlines()[-1].endswith(
        f"error: argument --world-size: {value} is not a number of ranks; give 1 or more"), err


# ---------------------------------------------------------------------------- 17. run_dir

def test_a_run_dir_that_cannot_be_created_is_refused_at_check(tmp_path, digits_shards):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for run_dir, says in ((a_file / "run", f"{a_file / 'run'} cannot be created: {a_file} is "
                                           f"a file, not a folder"),
                          (a_file, f"{a_file} is a file, not a folder")):
        code, out, err = check_in_process(tiny_spec(tmp_path, digits_shards, run_dir))
        # Before: --check passed; the launch died with NotADirectoryError from the run lock.
        assert code == 2, out + err
        (line,) = problem_lines(err)
        assert line.startswith(f"run_dir: {says}"), line
    assert a_file.read_text() == "not a folder"
