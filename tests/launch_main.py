"""Runs launch/run.py's ``main`` in this process (the same code path as the command line,
without the 5 s start-up of a fresh interpreter)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

from helpers import ROOT

_spec = importlib.util.spec_from_file_location("launch_run", ROOT / "launch" / "run.py")
launch_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_run)


def check_in_process(spec: Path, *extra: str, world_size: int = 2) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = launch_run.main(["--spec", str(spec), "--check", "--world-size", str(world_size),
                                *extra])
    return code, out.getvalue(), err.getvalue()
