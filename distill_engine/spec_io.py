"""Reading a job spec: YAML (safely), ``--set`` overrides, and the one error that lists every
problem of a spec with its YAML path."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class SpecError(Exception):
    """Every problem of a job spec, each with its YAML path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.problems)
        lines = [f"job spec {self.source} has {count} problem{'s' * (count != 1)}:"]
        lines += [f"  - {path}: {message}" if path else f"  - {message}"
                  for path, message in self.problems]
        return "\n".join(lines)


MAX_SPEC_NODES = 100_000


def expanded_size(value: Any, memo: dict[int, int] | None = None) -> int:
    """How many values the YAML holds once its aliases are expanded (copying or validating
    expands them), counted without expanding: shared nodes are counted once per use."""
    memo = {} if memo is None else memo
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) not in memo:
        children = value.values() if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(expanded_size(child, memo) for child in children)
    return memo[id(value)]


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(str(path), [("", "the file does not exist")])
    try:
        raw = yaml.safe_load(path.read_text())  # data only: no tags that build objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(str(path), [("", f"not valid YAML ({where}{problem}); job specs are "
                                     "plain YAML data, without tags such as !!python")]) from None
    if not isinstance(raw, dict):
        raise SpecError(str(path), [("", "the top level must be a mapping with 'name', "
                                     "'run_dir' and 'stages'")])
    if expanded_size(raw) > MAX_SPEC_NODES:
        # A few nested aliases ("billion laughs") expand to gigabytes once copied.
        raise SpecError(str(path), [("", f"its aliases (*name) expand to more than "
                                     f"{MAX_SPEC_NODES:,} values; write the spec out or use "
                                     "the top-level defaults that stages inherit")])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``a.b.0.c=value``: the value is parsed as YAML (so 3e-4, true, [1, 2] work)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((f"--set {item}", "expected KEY=VALUE, e.g. stages.0.optimisation.lr=1e-3"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = raw
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append((key, f"--set cannot reach this path in {source}"))
    if problems:
        raise SpecError(source, problems)
    return raw


def yaml_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif i > 0 and loc[i - 1] is not None and isinstance(loc[i - 1], int) and \
                i >= 2 and loc[i - 2] == "objectives":
            continue  # the discriminator tag pydantic inserts ("feature") is not a YAML key
        else:
            text += f".{part}" if text else str(part)
    return text


def pydantic_problems(err: ValidationError, prefix: tuple = ()) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and its section)"
        elif e["type"] == "missing":
            message = "required, but missing"
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            message += f" (got {reprlib.repr(e['input'])})"  # bounded, however big the input
        problems.append((yaml_path(prefix + tuple(e["loc"])), message.removeprefix("Value error, ")))
    return problems
