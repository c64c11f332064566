"""What a hurried user types: absurd sizes, files that are not specs, nesting without end,
batches larger than the data, names that are nearly right, memory sizes without units.
Each ends in exit code 2 with one message naming where the problem is written, no
traceback, and, where the input could cost memory, a bounded peak measured on the
``launch/run.py --check`` process itself (``helpers.run_check_measured``)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from helpers import DIGITS_STUDENT, DIGITS_TEACHER, check_in_process, run_check_measured, write_spec

MiB = 1024 ** 2
# What a bad input may add to the peak memory of a --check that refuses it, over the same
# check of a good spec (importing torch and timm alone is about 1 GB here).
HEADROOM = 200 * MiB


@pytest.fixture(scope="module")
def spec(digits_shards, tmp_path_factory) -> dict:
    """Two stages on the digits shards: a labelled teacher, then FD into a student."""
    return {
        "name": "hurried", "run_dir": str(tmp_path_factory.mktemp("run")),
        "data": {"train": str(digits_shards / "train"), "eval": str(digits_shards / "holdout"),
                 "micro_batch_size": 16, "views": {"geometry": {"size": 24}}},
        "optimisation": {"lr": 1e-3, "steps": 4},
        "eval": {"batch_size": 64},
        "stages": [
            {"name": "teacher",
             "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": dict(DIGITS_TEACHER)},
             "objectives": [{"kind": "cross_entropy"}]},
            {"name": "fd", "teacher": {"arch": "stage:teacher"},
             "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": dict(DIGITS_STUDENT)},
             "objectives": [{"kind": "feature", "student_tap": "norm", "teacher_tap": "norm"}],
             "eval": None},
        ],
    }


@pytest.fixture(scope="module")
def baseline_rss(spec, tmp_path_factory) -> int:
    """Peak memory of --check on the good spec: what every bad input is compared with."""
    code, _, err, rss = run_check_measured(write_spec(tmp_path_factory.mktemp("good") / "job.yaml",
                                                      spec))
    assert code == 0, err
    return rss


def changed(spec: dict, *changes: tuple[str, object]) -> dict:
    spec = copy.deepcopy(spec)
    for dotted, value in changes:
        node = spec
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return spec


def refused(spec: dict, tmp_path, *extra: str) -> list[str]:
    """The problem lines of a --check that must fail with exit code 2."""
    code, out, err = check_in_process(write_spec(tmp_path / "job.yaml", spec), *extra)
    assert code == 2, out + err
    assert "Traceback" not in err
    return [line.removeprefix("  - ") for line in err.splitlines()[1:]]


# ---------------------------------------------------------------------------- 1. model sizes

@pytest.mark.parametrize("value,message", [
    ([100_000_000, 3], "depth must be an int, not [100000000, 3]"),
    (1_000_000_000, "depth 1000000000 is beyond any real model (at most 1,024); check for a typo"),
    (True, "depth must be an int, not True"),
    (0, "depth must be positive, not 0"),
])
def test_absurd_depth_is_refused_before_building(spec, tmp_path, value, message):
    lines = refused(changed(spec, ("stages.1.student.kwargs.depth", value)), tmp_path)
    assert lines == [f"stages[1].student.kwargs.depth: {message}"]


def test_sizes_within_limits_but_absurd_together_are_refused_by_parameter_count(spec, tmp_path):
    lines = refused(changed(spec, ("stages.1.student.kwargs.embed_dim", 60_000),
                            ("stages.1.student.kwargs.depth", 1000),
                            ("stages.1.student.kwargs.num_heads", 2)), tmp_path)
    assert len(lines) == 1 and lines[0].startswith(
        "stages[1].student.kwargs: the model would have 4.32e+13 parameters, more than 1e+12"), lines


def test_a_list_for_depth_costs_no_memory(spec, tmp_path, baseline_rss):
    # Before the limits, timm turned this into torch.linspace(0, rate, 100000002) on the CPU
    # (under the meta device), then into a Python list: gigabytes before any error.
    bad = changed(spec, ("stages.1.student.kwargs.depth", [100_000_000, 2]))
    code, _, err, rss = run_check_measured(write_spec(tmp_path / "job.yaml", bad))
    assert code == 2 and "Traceback" not in err
    assert "stages[1].student.kwargs.depth: depth must be an int" in err, err
    assert rss < baseline_rss + HEADROOM, (rss / MiB, baseline_rss / MiB)


# ---------------------------------------------------------------------------- 2. spec files

def _check_file(path) -> str:
    code, out, err = check_in_process(path)
    assert code == 2 and "Traceback" not in err, out + err
    return err.splitlines()[1].removeprefix("  - ")


def test_files_that_are_not_specs_are_refused_unread(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block until someone writes
    assert _check_file(tmp_path) == ("is a directory; --spec takes a YAML file, e.g. "
                                     "jobs/quickstart.yaml")
    assert _check_file(fifo) == "is a FIFO (named pipe); --spec takes a regular YAML file"
    assert _check_file("/dev/zero") == "is a device; --spec takes a regular YAML file"
    assert _check_file(tmp_path / "nowhere.yaml") == "the file does not exist"


def test_a_huge_file_is_refused_without_reading_it(spec, tmp_path, baseline_rss):
    nul = tmp_path / "nul.yaml"
    with open(nul, "wb") as out:
        out.truncate(2 * 1024 ** 3)  # 2 GB of NUL bytes, sparse: no disk, no time
    code, _, err, rss = run_check_measured(nul)
    assert code == 2 and "Traceback" not in err
    assert "is 2,147,483,648 bytes, more than the 1,048,576 a job spec may have" in err, err
    assert rss < baseline_rss + HEADROOM, (rss / MiB, baseline_rss / MiB)


def test_nesting_past_32_levels_is_refused_without_recursion(spec, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert _check_file(deep).startswith("the file nests deeper than 32 levels")
    good = write_spec(tmp_path / "job.yaml", spec)
    code, _, err = check_in_process(good, "--set", "a." * 10_000 + "b=1",
                                    "--set", "name=" + "[" * 10_000 + "]" * 10_000)
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()[1:]
    assert lines[0].startswith("  - --set 'a.a.a.") and "the key nests deeper than 32" in lines[0]
    assert lines[1].startswith("  - name: the --set value nests deeper than 32"), err
    # Aliases that nest inside each other past the limit (the text alone is shallow).
    chain = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [[[[[[[[[[*a{i - 1}]]]]]]]]]]\n"
                                      for i in range(1, 5))
    (tmp_path / "aliases.yaml").write_text(chain)
    assert _check_file(tmp_path / "aliases.yaml").startswith(
        "the spec (its aliases expanded) nests deeper than 32 levels")


# ---------------------------------------------------------------------------- 3. batch sizes

def test_a_batch_larger_than_the_data_is_refused(spec, tmp_path, baseline_rss):
    bad = changed(spec, ("data.micro_batch_size", 10 ** 12))
    code, _, err, rss = run_check_measured(write_spec(tmp_path / "job.yaml", bad))
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()[1:]
    assert len(lines) == 1, err  # written once at the top level: reported once
    assert lines[0].startswith("  - data.micro_batch_size: one optimizer step takes "
                               "micro_batch_size 1,000,000,000,000 x 2 ranks"), err
    total = json.loads((Path(spec["data"]["train"]) / "index.json").read_text())["total"]
    assert f"but an epoch has {total:,} (the index of {spec['data']['train']})" in lines[0]
    assert f"use a micro-batch of at most {total // 2:,}" in lines[0]
    assert rss < baseline_rss + HEADROOM, (rss / MiB, baseline_rss / MiB)


def test_a_batch_no_machine_holds_is_refused_by_the_memory_plan(spec, tmp_path):
    lines = refused(changed(spec, ("data.micro_batch_size", 10 ** 8),
                            ("data.samples_per_epoch", 10 ** 12)), tmp_path)
    assert len(lines) == 1, lines
    assert lines[0].startswith("data.micro_batch_size: stage 'teacher' needs ")
    assert "per rank by its memory plan at micro_batch_size 100,000,000, more than any " \
           "accelerator or host has (1024.00 GiB)" in lines[0]


# ---------------------------------------------------------------------------- 4. names

def test_names_that_are_nearly_right_get_the_nearest_valid_name(spec, tmp_path):
    bad = changed(spec, ("stages.1.teacher.arch", "stage:techer"),
                  ("stages.0.student.arch", "timm:vit_tiny_pach16_224"))
    assert refused(bad, tmp_path) == [
        "stages[0].student.arch: timm has no architecture 'vit_tiny_pach16_224'; did you mean "
        "'vit_tiny_patch16_224' or 'deit_tiny_patch16_224' or 'vit_tiny_patch16_384'?",
        "stages[1].teacher.arch: 'stage:techer' is not an earlier stage; earlier stages: "
        "['teacher']; did you mean 'teacher'?"]
    bad = changed(spec, ("stages.1.objectives.0.kind", "featur"))
    from distill_engine.objectives import OBJECTIVES
    assert refused(bad, tmp_path) == [
        "stages[1].objectives[0].kind: 'featur' is not an objective kind; kinds: "
        f"{sorted(OBJECTIVES)}; did you mean 'feature'?"]


def test_a_misspelt_section_is_one_problem_not_two(spec, tmp_path):
    bad = copy.deepcopy(spec)
    bad["optimization"] = bad.pop("optimisation")
    bad["stages"][0]["student"]["kwarg"] = bad["stages"][0]["student"].pop("kwargs")
    assert refused(bad, tmp_path) == [
        "optimization: unknown key; did you mean 'optimisation'?",
        "stages[0].student.kwarg: unknown key; did you mean 'kwargs'?"]


def test_a_bad_default_is_reported_once_where_it_is_written(spec, tmp_path):
    bad = changed(spec, ("optimisation.lr", -1), ("data.views.geometry.size", "big"))
    assert refused(bad, tmp_path) == [
        "data.views.geometry.size: Input should be a valid integer, unable to parse string "
        "as an integer (got 'big')",
        "optimisation.lr: Input should be greater than 0 (got -1)"]
    # A stage that writes its own value is reported at the stage.
    bad["stages"][1]["optimisation"] = {"lr": -2}
    assert "stages[1].optimisation.lr: Input should be greater than 0 (got -2)" in refused(
        bad, tmp_path)


# ---------------------------------------------------------------------------- 5. labels

def test_labels_beyond_the_students_classes_are_refused_at_check(spec, tmp_path):
    bad = changed(spec, ("stages.0.student.kwargs.num_classes", 8))
    train, holdout = spec["data"]["train"], spec["data"]["eval"]
    assert refused(bad, tmp_path) == [
        f"stages[0].student.kwargs.num_classes: the index of data.{key} {url} lists 10 classes "
        "(labels 0..9), but the student cannot score them: it predicts 8; set num_classes: 10"
        for key, url in (("train", train), ("eval", holdout))]


# ---------------------------------------------------------------------------- 7. taps

def test_a_tap_on_an_identity_names_the_module_that_holds_the_norm(spec, tmp_path):
    """BEiT pools by averaging by default: its `norm` is an nn.Identity and the norm is
    applied after pooling, in `fc_norm`; tapping `norm` would take features before any norm."""
    beit = {"arch": "timm:beit_base_patch16_224",
            "kwargs": {**DIGITS_STUDENT, "use_abs_pos_emb": False, "use_rel_pos_bias": True}}
    bad = changed(spec, ("stages.1.student", beit))
    assert refused(bad, tmp_path) == [
        "stages[1].objectives[0].student_tap: student tap 'norm' is an nn.Identity in this "
        "model: it would capture that module's input, not a norm output; in this model "
        "'fc_norm' holds the norm (applied after pooling), or build the model so that 'norm' "
        "is a real layer (timm: global_pool: token)"]
    token_pooled = changed(bad, ("stages.1.student.kwargs.global_pool", "token"))
    code, _, err = check_in_process(write_spec(tmp_path / "job.yaml", token_pooled))
    assert code == 0, err


# ---------------------------------------------------------------------------- 6. options

@pytest.mark.parametrize("size,words", [
    ("80", "'80' has no unit; give a number and a unit, e.g. 80GB, 80GiB or 512MB"),
    ("abc", "'abc' is not a memory size"),
    ("80XB", "'80XB' has an unknown unit 'xb'"),
    ("10KB", "'10KB' is less than 1 MiB"),
])
def test_gpu_memory_needs_a_unit(spec, tmp_path, capsys, size, words):
    from distill_engine.cli.main import main
    with pytest.raises(SystemExit) as exit_:
        main(["--spec", str(write_spec(tmp_path / "job.yaml", spec)), "--plan",
              "--gpu-memory", size])
    assert exit_.value.code == 2
    assert f"argument --gpu-memory: {words}" in capsys.readouterr().err


def test_gpu_memory_units():
    from distill_engine.spec.units import parse_bytes
    assert parse_bytes("80GB") == parse_bytes("80GiB") == parse_bytes("80 g") == 80 * 1024 ** 3
    assert parse_bytes("512MB") == 512 * MiB and parse_bytes("1.5TB") == 1.5 * 1024 ** 4
