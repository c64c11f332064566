"""Job specs: a good one is accepted and planned; each bad one is refused with exit code 2,
no traceback, and a message that names the YAML path of the problem."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT, TINY_VIT, check_in_process, run_check, write_spec


@pytest.fixture
def good_spec(tmp_path):
    for split in ("train", "holdout"):
        (tmp_path / "shards" / split).mkdir(parents=True)
        (tmp_path / "shards" / split / "index.json").write_text("{}")
    import timm
    teacher = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "embed_dim": 48, "num_heads": 3})
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    return {
        "name": "spec-test",
        "run_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "shards/train"), "eval": str(tmp_path / "shards/holdout"),
                 "micro_batch_size": 4, "views": {"geometry": {"size": 32}}},
        "optimisation": {"lr": 1e-3, "steps": 4},
        "deepspeed": {"teacher_config": str(ROOT / "ds_configs/teacher_zero3_inference.json"),
                      "student_config": str(ROOT / "ds_configs/student_zero3.json")},
        "stages": [{
            "name": "fd",
            "teacher": {"arch": "timm:vit_tiny_patch16_224",
                        "kwargs": {**TINY_VIT, "embed_dim": 48, "num_heads": 3},
                        "weights": str(tmp_path / "teacher.safetensors")},
            "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": TINY_VIT},
            "objectives": [{"kind": "feature"}],
        }, {
            "name": "finetune",
            "student": {"arch": "stage:fd", "init": "stage:fd"},
            "objectives": [{"kind": "cross_entropy"}],
            "eval": {"batch_size": 8},
        }],
    }


def test_good_spec_is_planned(tmp_path, good_spec):
    result = run_check(write_spec(tmp_path / "job.yaml", good_spec))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "fd" in out and "finetune" in out
    assert "4 per rank x 2 ranks x 1 accumulation = 8" in out
    # The FD stage's classifier head gets no gradient from the feature objective.
    assert "head (no objective reaches them)" in out


def _set(spec, dotted, value):
    node = spec
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


DELETE = object()

BAD = [
    # (what to change, value, expected YAML path in the message, a word of the explanation);
    # a problem of a top-level default is reported once, at the top level where it is written
    ("stages.0.student.colour", "red", "stages[0].student.colour", "unknown key"),
    ("optimisation.lr", -1, "- optimisation.lr", "greater than 0"),
    ("optimisation.lr", "fast", "- optimisation.lr", "number"),
    ("optimisation.epochs", 3, "- optimisation", "exactly one of 'steps' or 'epochs'"),
    ("data.micro_batch_size", 0, "- data.micro_batch_size", "greater than or equal to 1"),
    ("data.global_batch_size", 100, "- data.global_batch_size", "x 2 ranks"),
    ("data.train", "/no/such/shards", "- data.train", "does not exist"),
    ("data.train", "pipe:curl -s http://x/a.tar", "- data.train", "allow_pipe"),
    ("stages.0.teacher.weights", "/no/such/file.safetensors", "stages[0].teacher.weights", "does not exist"),
    ("stages.0.teacher.arch", "timm:vit_nonexistent", "stages[0].teacher.arch", "no architecture"),
    ("stages.0.teacher.arch", "torch.load", "stages[0].teacher.arch", "not an architecture"),
    ("stages.0.objectives.0.student_tap", "blocks.1.nrom1", "stages[0].objectives[0].student_tap", "blocks.1.norm1"),
    ("stages.0.objectives.0.kind", "telepathy", "stages[0].objectives[0].kind", "telepathy"),
    ("stages.1.student.init", "stage:finetune", "stages[1].student.init", "refers to itself"),
    ("stages.0.student.init", "stage:finetune", "stages[0].student.init", "not an earlier stage"),
    ("stages.0.teacher", DELETE, "stages[0]", "need a teacher"),
    ("data.views.geometry.size", 64, "stages[0]", "fails"),
    ("deepspeed.student_config", "/no/ds.json", "- deepspeed.student_config", "does not exist"),
    ("stages.0.objectives.0.teacher_tap", "head", "stages[0].objectives[0]", "token maps"),
]


@pytest.mark.parametrize("field,value,path,words", BAD, ids=[b[0] + "=" + str(b[1])[:20] for b in BAD])
def test_bad_spec_names_its_field_and_exits_2(tmp_path, good_spec, field, value, path, words):
    spec = copy.deepcopy(good_spec)
    _set(spec, field, value)
    code, out, err = check_in_process(write_spec(tmp_path / "job.yaml", spec))
    assert code == 2, out + err
    assert path in err and words in err, err


def test_bad_spec_process_exits_2_without_traceback(tmp_path, good_spec):
    spec = copy.deepcopy(good_spec)
    spec["stages"][0]["student"]["kwargs"]["depth"] = "deep"
    result = run_check(write_spec(tmp_path / "job.yaml", spec))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "stages[0].student.kwargs" in result.stderr


def test_every_problem_is_reported_at_once(tmp_path, good_spec):
    spec = copy.deepcopy(good_spec)
    spec["stages"][0]["optimisation"] = {"lr": -1}
    spec["stages"][0]["student"]["colour"] = "red"
    spec["stages"][1]["student"]["init"] = "stage:nowhere"
    spec["stages"][1]["data"] = {"micro_batch_size": "many"}
    code, _, err = check_in_process(write_spec(tmp_path / "job.yaml", spec))
    assert code == 2
    for path in ("stages[0].optimisation.lr", "stages[0].student.colour",
                 "stages[1].data.micro_batch_size"):
        assert path in err, err


def test_set_overrides_any_field(tmp_path, good_spec):
    spec_file = write_spec(tmp_path / "job.yaml", good_spec)
    result = run_check(spec_file, "--set", "stages.0.optimisation.lr=-5")
    assert result.returncode == 2 and "stages[0].optimisation.lr" in result.stderr
    result = run_check(spec_file, "--set", "data.micro_batch_size=3")
    assert result.returncode == 0 and "3 per rank x 2 ranks" in result.stdout


def test_yaml_that_would_build_objects_is_refused(tmp_path):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("name: !!python/object/apply:os.system ['echo pwned']\nrun_dir: x\n")
    result = run_check(spec_file)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not valid YAML" in result.stderr and "pwned" not in result.stdout


def test_teacher_weights_that_do_not_fit_are_listed_before_training(tmp_path, good_spec):
    import timm
    wrong = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)  # student-sized, not teacher
    state = wrong.state_dict()
    state.pop("cls_token")
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    spec = copy.deepcopy(good_spec)
    spec["stages"][0]["teacher"]["weights"] = str(tmp_path / "wrong.safetensors")
    code, _, message = check_in_process(write_spec(tmp_path / "job.yaml", spec))
    assert code == 2
    assert "stages[0].teacher.weights" in message
    assert "missing keys: cls_token" in message
    assert "unexpected keys: extra.weight" in message
    assert "shape mismatches" in message and "pos_embed" not in message.split("shape mismatches")[0]


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefgh"):
        previous = "abcdefgh"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    spec_file = tmp_path / "bomb.yaml"
    spec_file.write_text("\n".join(levels) + "\nname: *h\n")  # 9**8 = 43 million leaves
    code, _, err = check_in_process(spec_file)
    assert code == 2 and "aliases (*name) expand" in err


def test_check_prints_the_step_count_of_an_epoch_budget(tmp_path, good_spec, digits_shards):
    """Steps are resolved at plan time from the shard index: 1,408 samples / (4 x 2 ranks)
    = 176 batches an epoch, 2 epochs = 352 steps, half an epoch of warm-up = 88."""
    spec = copy.deepcopy(good_spec)
    spec["data"]["train"] = str(digits_shards / "train")
    spec["optimisation"] = {"lr": 1e-3, "epochs": 2, "warmup_epochs": 0.5}
    code, out, err = check_in_process(write_spec(tmp_path / "job.yaml", spec), world_size=2)
    assert code == 0, err
    text = " ".join(out.replace("│", " ").split())
    assert "2.0 epochs = 352 steps (176 batches per epoch per rank)" in text, text
    assert "88 steps warm-up" in text
