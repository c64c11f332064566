"""Each problem once, at the path where the user wrote it.

The top-level sections ``data``, ``optimisation``, ... are copied into every stage before
validation (``spec.with_stage_defaults``), so a bad top-level value would otherwise be
reported once per stage, at a path (``stages[1].optimisation.lr``) the user never wrote.
Here a problem at ``stages[i].SECTION...`` whose value the stage did not write itself is
moved to ``SECTION...``, and repeated problems are reported once.
"""

from __future__ import annotations

import re
from typing import Any

from .schema import STAGE_DEFAULTS

_PART = re.compile(r"\[(\d+)\]|\.?([^.\[]+)")


def parse_path(path: str) -> list[str | int]:
    """``stages[0].data.views`` -> ["stages", 0, "data", "views"] (what ``yaml_path`` wrote)."""
    return [int(index) if index else key for index, key in _PART.findall(path)]


def _has(node: Any, parts: list[str | int]) -> bool:
    for part in parts:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


def written_path(path: str, raw: dict[str, Any]) -> str:
    """Where the value behind ``path`` was written: in the stage if the stage wrote it
    (its own value, or a section it merged into), else in the top-level default section
    it inherited. A value written nowhere (a missing field) belongs to whichever wrote
    more of the way to it, the top-level section on a tie, since one default there fixes
    every stage."""
    parts = parse_path(path)
    if len(parts) < 3 or parts[0] != "stages" or not isinstance(parts[1], int) \
            or parts[2] not in STAGE_DEFAULTS or parts[2] not in raw:
        return path
    stages = raw.get("stages")
    stage = stages[parts[1]] if isinstance(stages, list) and parts[1] < len(stages) else None
    inner = parts[2:]
    if isinstance(stage, dict) and (_has(stage, inner) or
                                    _deepest(stage, inner) > _deepest(raw, inner)):
        return path
    return path.removeprefix(f"stages[{parts[1]}].")


def _deepest(node: Any, parts: list[str | int]) -> int:
    for depth in range(len(parts), -1, -1):
        if _has(node, parts[:depth]):
            return depth
    return 0


def where_written(problems: list[tuple[str, str]], raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems moved to where they were written, each once, in their first order."""
    return list(dict.fromkeys((written_path(path, raw), message) for path, message in problems))
