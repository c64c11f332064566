"""Broken job specs, generated: every one must end in exit code 2 with a message and no
traceback, before anything expensive starts.

Hypothesis mutates a valid two-stage spec (wrong types, unknown keys, missing keys and
files, impossible batch arithmetic, negative or absurd values, absurd model sizes, taps
that do not exist, stage references to unknown, later or the same stage, and plain
garbage YAML). Mutations run through launch/run.py's ``main`` (the command-line path
without a new interpreter per spec) in one child process with a capped address space and
a measured peak memory; a few also through a real ``python launch/run.py`` process.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from helpers import ROOT, TINY_VIT as VIT, check_in_process, run_check, run_measured, write_spec

EXAMPLES = 140


def make_base(work: Path) -> dict:
    """A valid two-stage spec whose models share their kwargs through a YAML alias."""
    import timm
    for split in ("train", "holdout"):
        (work / "shards" / split).mkdir(parents=True)
        (work / "shards" / split / "index.json").write_text("{}")
    save_file(timm.create_model("vit_tiny_patch16_224", **VIT).state_dict(),
              str(work / "teacher.safetensors"))
    spec = {
        "name": "broken", "run_dir": str(work / "run"),
        "data": {"train": str(work / "shards/train"), "eval": str(work / "shards/holdout"),
                 "micro_batch_size": 4, "views": {"geometry": {"size": 32}}},
        "optimisation": {"lr": 1e-3, "steps": 4},
        "deepspeed": {"teacher_config": str(ROOT / "ds_configs/teacher_zero3_inference.json"),
                      "student_config": str(ROOT / "ds_configs/student_zero3.json")},
        "stages": [{
            "name": "fd",
            "teacher": {"arch": "timm:vit_tiny_patch16_224", "kwargs": VIT,
                        "weights": str(work / "teacher.safetensors")},
            "student": {"arch": "timm:vit_tiny_patch16_224", "kwargs": VIT},
            "objectives": [{"kind": "feature", "student_tap": "norm", "teacher_tap": "norm"}],
        }, {
            "name": "finetune",
            "student": {"arch": "stage:fd", "init": "stage:fd"},
            "objectives": [{"kind": "cross_entropy"}],
            "eval": {"batch_size": 8},
        }],
    }
    code, _, err = check_in_process(write_spec(work / "good.yaml", spec))
    assert code == 0, err  # the base is valid: every failure below is the mutation's
    return spec


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    return make_base(tmp_path_factory.mktemp("base"))


def tiny_vit_modules() -> set[str]:
    import timm
    return {name for name, _ in timm.create_model("vit_tiny_patch16_224", **VIT).named_modules()}



# ---------------------------------------------------------------------------- mutations
# Each strategy yields (category, function that breaks a spec dict in place, or a YAML text).

def at(spec: dict, path: tuple):
    node = spec
    for part in path:
        node = node[part]
    return node


def setter(path: tuple, value):
    def apply(spec):
        at(spec, path[:-1])[path[-1]] = value
    return apply


def deleter(path: tuple):
    def apply(spec):
        del at(spec, path[:-1])[path[-1]]
    return apply


SECTIONS = [(), ("data",), ("data", "views"), ("data", "views", "geometry"), ("optimisation",),
            ("deepspeed",), ("stages", 0), ("stages", 0, "student"), ("stages", 0, "teacher"),
            ("stages", 0, "objectives", 0), ("stages", 1), ("stages", 1, "objectives", 0)]
unknown_key = st.builds(
    lambda section, key, value: ("unknown key", setter(section + ("zz_" + key,), value)),
    st.sampled_from(SECTIONS), st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    st.one_of(st.integers(), st.text(max_size=5), st.booleans()))

REQUIRED = [("name",), ("run_dir",), ("stages",), ("data", "train"), ("data", "micro_batch_size"),
            ("optimisation", "lr"), ("optimisation", "steps"), ("stages", 0, "name"),
            ("stages", 0, "student"), ("stages", 0, "objectives"), ("stages", 0, "teacher"),
            ("stages", 0, "student", "arch"), ("stages", 0, "teacher", "arch"),
            ("stages", 0, "teacher", "weights"), ("stages", 0, "objectives", 0, "kind")]
missing_key = st.builds(lambda path: ("missing key", deleter(path)), st.sampled_from(REQUIRED))

not_a_scalar = st.one_of(st.lists(st.integers(), min_size=1, max_size=3),
                         st.dictionaries(st.from_regex(r"[a-z]{1,4}", fullmatch=True),
                                         st.integers(), min_size=1, max_size=2))
not_a_number = st.one_of(not_a_scalar, st.from_regex(r"[a-z]{1,8}", fullmatch=True))
WRONG_TYPES = {
    ("name",): not_a_scalar, ("run_dir",): not_a_scalar,
    ("stages",): st.one_of(st.text(max_size=8), st.integers(), st.just({})),
    ("data", "micro_batch_size"): st.one_of(not_a_number, st.just(2.5)),
    ("data", "train"): st.one_of(st.integers(), st.just({"a": 1})),
    ("optimisation", "lr"): not_a_number, ("optimisation", "steps"): not_a_number,
    ("optimisation", "betas"): st.one_of(not_a_number, st.just([0.9])),
    ("stages", 0, "objectives"): st.one_of(st.text(max_size=8), st.just([]), st.just({})),
    ("stages", 0, "student"): st.one_of(st.text(max_size=8), st.integers()),
    ("stages", 0, "student", "kwargs"): st.one_of(st.text(max_size=8), st.lists(st.integers())),
    ("stages", 0, "student", "kwargs", "depth"): not_a_number,
    ("stages", 0, "teacher", "kwargs", "embed_dim"): not_a_number,
    ("stages", 0, "name"): st.one_of(not_a_scalar, st.from_regex(r"[a-z]{0,4}[ /:][a-z]{0,4}",
                                                                  fullmatch=True)),
    ("deepspeed", "timeout_s"): not_a_number,
    ("stages", 0, "objectives", 0, "kind"): st.from_regex(r"[a-z]{1,10}", fullmatch=True).filter(
        lambda k: k not in ("feature", "cross_entropy")),
}
wrong_type = st.sampled_from(sorted(WRONG_TYPES, key=str)).flatmap(
    lambda path: WRONG_TYPES[path].map(lambda value: ("wrong type", setter(path, value))))

file_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"),
                    min_size=1, max_size=20)
FILES = [("stages", 0, "teacher", "weights"), ("data", "train"), ("data", "eval"),
         ("deepspeed", "student_config"), ("deepspeed", "teacher_config"),
         ("stages", 0, "student", "init")]
missing_file = st.builds(
    lambda path, name: ("missing file", setter(path, f"/nonexistent/{name.replace('://', '')}")),
    st.sampled_from(FILES), file_name)

batch_arithmetic = st.integers(1, 10**6).filter(lambda n: n != 4 * 2).map(
    lambda n: ("batch arithmetic", setter(("data", "global_batch_size"), n)))

ABSURD = {
    ("optimisation", "lr"): st.one_of(st.floats(max_value=0), st.just(math.inf), st.just(math.nan)),
    ("optimisation", "steps"): st.integers(max_value=0),
    ("optimisation", "warmup_steps"): st.integers(max_value=-1),
    ("optimisation", "weight_decay"): st.floats(max_value=-1e-9, allow_infinity=True),
    ("optimisation", "min_lr_ratio"): st.floats(min_value=1.0001, allow_infinity=True),
    ("optimisation", "eps"): st.floats(max_value=0),
    ("optimisation", "grad_clip"): st.one_of(st.floats(max_value=0), st.just(math.inf)),
    ("optimisation", "betas"): st.tuples(st.floats(1, 1e6), st.floats(0, 0.99)).map(list),
    ("optimisation", "gradient_accumulation_steps"): st.integers(max_value=0),
    ("data", "micro_batch_size"): st.integers(max_value=0),
    ("data", "num_workers"): st.integers(max_value=-1),
    ("data", "max_bad_samples"): st.integers(max_value=-1),
    ("data", "samples_per_epoch"): st.integers(max_value=0),
    ("data", "views", "geometry", "size"): st.integers(max_value=0),
    ("deepspeed", "timeout_s"): st.one_of(st.integers(max_value=9), st.integers(min_value=10**7)),
    ("checkpointing", "keep"): st.integers(max_value=0),
    ("checkpointing", "every_steps"): st.integers(max_value=0),
    ("stages", 0, "student", "drop_path_rate"): st.one_of(st.floats(min_value=1.0),
                                                          st.floats(max_value=-1e-9)),
    ("stages", 0, "objectives", 0, "weight"): st.one_of(st.floats(max_value=-1e-9),
                                                        st.just(math.inf), st.just(math.nan)),
    ("stages", 1, "eval", "batch_size"): st.integers(max_value=0),
}


def absurd_setter(path, value):
    def apply(spec):
        for section in ("checkpointing",):
            spec.setdefault(section, {})
        at(spec, path[:-1])[path[-1]] = value
    return apply


absurd_value = st.sampled_from(sorted(ABSURD, key=str)).flatmap(
    lambda path: ABSURD[path].map(lambda value: ("negative or absurd value",
                                                 absurd_setter(path, value))))


def missing_tap(names: set[str]):
    tap = st.from_regex(r"[a-z_][a-z0-9_]{0,8}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True).filter(
        lambda t: t not in names and t != "output")
    return st.builds(lambda key, name: ("tap that does not exist",
                                        setter(("stages", 0, "objectives", 0, key), name)),
                     st.sampled_from(["student_tap", "teacher_tap"]), tap)


REFERENCES = [(1, ("student", "init")), (1, ("student", "arch")), (0, ("student", "init")),
              (1, ("teacher",))]


def bad_reference(stage: int, field: tuple, target: str):
    def apply(spec):
        value = f"stage:{target}"
        if field == ("teacher",):
            spec["stages"][stage]["teacher"] = {"arch": value}
        else:
            at(spec, ("stages", stage) + field[:-1])[field[-1]] = value
    return apply


stage_reference = st.builds(
    lambda where, target: ("stage reference", bad_reference(*where, target)),
    st.sampled_from(REFERENCES),
    st.one_of(st.just("finetune"), st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True).filter(
        lambda n: n != "fd")))

garbage_yaml = st.one_of(
    st.text(max_size=200),
    st.builds(lambda k, v: f"{k}: {v}\n", st.from_regex(r"[a-z]{1,8}", fullmatch=True),
              st.text(max_size=30)),
    st.sampled_from(["- a\n- b\n", "name: [unclosed\n", "!!python/object/apply:os.system ['x']",
                     "\t\tname: x", "name: x\nname: y\nstages: 3"]),
).map(lambda text: ("garbage YAML", text))


# Sizes past any real model, as a typo makes them: a list where an int belongs, or an int
# of many digits. The two models share their kwargs through a YAML alias, so a change to
# one changes both. Each must be refused before a model is built (timm computes drop-path
# rates on the CPU even under the meta device: depth [10**9] once took gigabytes).
huge = st.integers(min_value=10 ** 5, max_value=10 ** 12)
huge_list = st.lists(st.integers(min_value=10 ** 4, max_value=10 ** 9), min_size=1, max_size=3)
SIZES = {"depth": st.one_of(st.integers(1025, 10 ** 12), huge_list),
         "embed_dim": st.one_of(huge, huge_list), "num_heads": st.one_of(st.integers(1025, 10 ** 9)),
         "img_size": st.one_of(huge, huge_list), "patch_size": huge,
         "mlp_ratio": st.floats(min_value=65, max_value=1e12)}
absurd_size = st.tuples(st.sampled_from(["student", "teacher"]), st.sampled_from(sorted(SIZES))) \
    .flatmap(lambda where: SIZES[where[1]].map(lambda value: (
        "absurd model size", setter(("stages", 0, where[0], "kwargs", where[1]), value))))


def kinds_of_breakage(names: set[str]) -> list:
    return [unknown_key, missing_key, wrong_type, missing_file, batch_arithmetic,
            absurd_value, missing_tap(names), stage_reference, garbage_yaml, absurd_size]


def materialise(base: dict, mutation, path: Path) -> Path:
    if isinstance(mutation, str):
        path.write_text(mutation)
        return path
    spec = copy.deepcopy(base)
    mutation(spec)
    return write_spec(path, spec)


# ---------------------------------------------------------------------------- tests

def try_generated_broken_specs(base: dict, names: set[str], work: Path) -> dict[str, int]:
    """Every generated broken spec through --check's main; returns how many per category."""
    tried: dict[str, int] = {}

    def check(broken):
        category, mutation = broken
        spec_file = materialise(base, mutation, work / "job.yaml")
        code, out, err = check_in_process(spec_file)
        assert code == 2, (category, spec_file.read_text(), out, err)
        assert "problem" in err and "Traceback" not in err, (category, err)
        tried[category] = tried.get(category, 0) + 1

    kinds = kinds_of_breakage(names)
    for kind in kinds:  # the same share of examples for every kind of breakage
        # No shrinking: an example costs a meta-device model build, so shrinking a failure
        # takes minutes, and the assertion message already shows the whole broken spec.
        # derandomize: the same examples on every run, so that CI is reproducible.
        settings(max_examples=EXAMPLES // len(kinds), deadline=None, database=None,
                 derandomize=True,
                 phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])(
            given(broken=kind)(check))()
    return tried


# The examples run in a child process whose address space is capped: whatever a spec
# makes --check allocate, the child fails with MemoryError and the machine (shared by the
# rest of the suite) stays up. Its peak resident memory is then compared with a bound.
ADDRESS_SPACE = 6 * 1024 ** 3     # torch, timm and hypothesis map about 3.6 GB of it
PEAK_RSS = 2 * 1024 ** 3           # the process itself needs about 1 GB
CHILD = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.path[:0] = ["tests/unit", "tests"]  # the module itself, and helpers.py beside it
import test_bad_input as t
work = Path(sys.argv[1])
print(json.dumps(t.try_generated_broken_specs(t.make_base(work), t.tiny_vit_modules(), work)))
"""


def test_generated_broken_specs_exit_2_with_a_message(tmp_path):
    code, out, err, rss = run_measured([sys.executable, "-c", CHILD, str(tmp_path),
                                        str(ADDRESS_SPACE)], timeout=1800)
    assert code == 0, err[-5000:]
    tried = json.loads(out.splitlines()[-1])
    total = sum(tried.values())
    print(f"\n{total} broken specs tried, by category: {tried}; peak memory {rss / 2**20:.0f} MiB")
    assert total >= EXAMPLES * 0.8 and len(tried) == len(kinds_of_breakage(set())), tried
    assert rss < PEAK_RSS, rss


@pytest.mark.parametrize("category,mutation", [
    ("unknown key", setter(("data", "colour"), "red")),
    ("negative value", setter(("optimisation", "lr"), -1.0)),
    ("stage refers to itself", setter(("stages", 1, "student", "init"), "stage:finetune")),
    ("garbage YAML", "name: [unclosed\n"),
])
def test_broken_spec_in_a_real_process_exits_2_without_traceback(base, tmp_path, category,
                                                                  mutation):
    result = run_check(materialise(base, mutation, tmp_path / "job.yaml"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "problem" in result.stderr, result.stderr


def test_yaml_tags_never_build_objects(base, tmp_path):
    """Safe YAML only: a tag that would import a module and call it is refused unparsed."""
    marker = tmp_path / "ran"
    text = yaml.safe_dump(base) + f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
    code, _, err = check_in_process(materialise(base, text, tmp_path / "job.yaml"))
    assert code == 2 and "not valid YAML" in err
    assert not marker.exists()
