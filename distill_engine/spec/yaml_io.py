"""Reading a job spec: YAML (safely), ``--set`` overrides, and the one error that lists every
problem of a spec with its YAML path."""

from __future__ import annotations

import difflib
import math
import os
import reprlib
import stat
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError


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
# Hand-written specs are a few kB (the paper recipes are under 4 kB): 1 MiB leaves room
# for generated ones, and a multi-GB file (or /dev/zero) is refused before it is read.
MAX_SPEC_BYTES = 1 << 20
# The recipes nest 7 deep (stages[0].data.views.views.teacher.normalize[0]); past this
# depth the YAML composer, deepcopy and pydantic recurse towards Python's recursion limit.
MAX_SPEC_DEPTH = 32


def shape_of(value: Any) -> tuple[int, int]:
    """(values once aliases are expanded, nesting depth), counted without expanding and
    without recursion: shared nodes (aliases) are measured once and counted per use. An
    alias inside its own anchor (a cycle) counts as infinitely deep."""
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()  # being measured: meeting one again below itself is a cycle
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)) or (id(node) in sizes and not children_done):
            continue
        children = [c for c in (node.values() if isinstance(node, dict) else node)
                    if isinstance(c, (dict, list))]
        if children_done:
            size, depth = 1 + len(node) - len(children), 1
            for child in children:
                child_size, child_depth = sizes[id(child)]
                size, depth = size + child_size, max(depth, child_depth + 1)
            sizes[id(node)] = (size, depth)
            open_nodes.discard(id(node))
        elif id(node) in open_nodes:
            return 1, math.inf  # type: ignore[return-value]
        else:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes.get(id(value), (1, 0))


def yaml_depth(text: str) -> int:
    """The deepest nesting of collections in a YAML text, from the parser's event stream
    (which, unlike composing the document, does not recurse)."""
    depth = deepest = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_SPEC_DEPTH:
                break  # no need to read the rest
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return deepest


def too_deep(what: str) -> str:
    return (f"{what} nests deeper than {MAX_SPEC_DEPTH} levels of mappings and lists; job specs "
            "nest about 8 deep (stages[0].data.views.views.teacher.normalize)")


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a spec file, from its metadata alone (never opened: opening
    a FIFO would block, and /dev/zero never ends)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "the file does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory; --spec takes a YAML file, e.g. jobs/quickstart.yaml"
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else
                "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        return f"is {kind}; --spec takes a regular YAML file"
    if info.st_size > MAX_SPEC_BYTES:
        return (f"is {info.st_size:,} bytes, more than the {MAX_SPEC_BYTES:,} a job spec may "
                "have (specs are a few kB); is it the right file?")
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    if problem := _file_problem(path):
        raise SpecError(str(path), [("", problem)])
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(str(path), [("", f"cannot be read as UTF-8 text ({err})")]) from None
    try:
        if yaml_depth(text) > MAX_SPEC_DEPTH:
            raise SpecError(str(path), [("", too_deep("the file"))])
        raw = yaml.safe_load(text)  # data only: no tags that build objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(str(path), [("", f"not valid YAML ({where}{problem}); job specs are "
                                     "plain YAML data, without tags such as !!python")]) from None
    if not isinstance(raw, dict):
        raise SpecError(str(path), [("", "the top level must be a mapping with 'name', "
                                     "'run_dir' and 'stages'")])
    check_shape(raw, str(path))
    return raw


def check_shape(raw: dict[str, Any], source: str) -> None:
    size, depth = shape_of(raw)
    if size > MAX_SPEC_NODES:
        # A few nested aliases ("billion laughs") expand to gigabytes once copied.
        raise SpecError(source, [("", f"its aliases (*name) expand to more than "
                                  f"{MAX_SPEC_NODES:,} values; write the spec out or use "
                                  "the top-level defaults that stages inherit")])
    if depth > MAX_SPEC_DEPTH:  # aliases inside aliases can nest past what the text shows
        raise SpecError(source, [("", too_deep("the spec (its aliases expanded)"))])


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``a.b.0.c=value``: the value is parsed as YAML (so 3e-4, true, [1, 2] work)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((f"--set {item}", "expected KEY=VALUE, e.g. stages.0.optimisation.lr=1e-3"))
            continue
        parts = key.split(".")
        if len(parts) > MAX_SPEC_DEPTH:
            problems.append((f"--set {reprlib.repr(key)}", too_deep("the key")))
            continue
        try:
            if yaml_depth(text) > MAX_SPEC_DEPTH:
                problems.append((key, too_deep("the --set value")))
                continue
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = raw
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
    check_shape(raw, source)  # a value may bring aliases or depth of its own
    return raw


def _objective_kinds() -> dict:
    from distill_engine.objectives import OBJECTIVES
    return OBJECTIVES


def yaml_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "objectives" and \
                part in _objective_kinds():
            continue  # the discriminator tag pydantic inserts ("feature") is not a YAML key
        else:
            text += f".{part}" if text else str(part)
    return text


def keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys valid in the mapping at ``loc`` of ``model`` (following nested models,
    lists and unions; an objective's kind tag picks its config), or [] if unknown."""
    from distill_engine.objectives import OBJECTIVES
    candidates: list[Any] = [model]
    for part in loc:
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                       None)
        if isinstance(part, int):
            candidates = [a for c in candidates for a in (get_args(c) or [c])]
            continue
        if current is None:
            if part in OBJECTIVES:  # the discriminator tag pydantic puts in objective locs
                candidates = [OBJECTIVES[part].Config]
                continue
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        candidates = _flatten(field.annotation)
    current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return list(current.model_fields) if current else []


def _flatten(annotation: Any) -> list[Any]:
    """The classes an annotation may hold: Optional, unions, lists and Annotated unwrapped."""
    args = get_args(annotation)
    if not args:
        return [annotation]
    return [c for a in args for c in _flatten(a)]


def pydantic_problems(err: ValidationError, prefix: tuple = (),
                      model: type[BaseModel] | None = None,
                      extra_keys: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """One (yaml path, message) per pydantic error. With ``model`` (the class validated),
    an unknown key gets the nearest valid key, and a required key that such a misspelling
    stands for is not also reported missing. ``extra_keys``: keys valid at the top level
    besides the model's fields (the stage defaults)."""
    from distill_engine.objectives.base import objective_kind_problem
    from distill_engine.suggest import did_you_mean
    problems, meant = [], set()
    errors = err.errors(include_url=False)
    for e in errors:
        loc = tuple(e["loc"])
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            valid = keys_at(model, loc[:-1]) + list(extra_keys if len(loc) == 1 else ()) \
                if model else []
            hint = did_you_mean(str(loc[-1]), valid, "key")
            message = "unknown key" + (hint or " (check its spelling and its section)")
            meant.update((loc[:-1], near) for near in
                         difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6))
        elif e["type"] == "union_tag_invalid":
            loc += ("kind",)
            message = objective_kind_problem(e.get("ctx", {}).get("tag")) or message
        elif e["type"] == "missing":
            message = "required, but missing"
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            message += f" (got {reprlib.repr(e['input'])})"  # bounded, however big the input
        problems.append((loc, message.removeprefix("Value error, ")))
    return [(yaml_path(prefix + loc), message) for loc, message in problems
            if not (message == "required, but missing" and (loc[:-1], loc[-1]) in meant)]
