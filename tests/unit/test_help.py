"""``--help`` of the commands a user types: exit codes in the usage, help text for every
option, and no heavy import before the usage is printed (torch alone takes seconds to
import on a loaded machine; ``-X importtime`` lists every module the command imported)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from helpers import ROOT, env

COMMANDS = {
    "launch/run.py": [str(ROOT / "launch" / "run.py")],
    "data_shards": ["-m", "data_shards"],
    "diagnostics": ["-m", "distill_engine.diagnostics"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_exit_codes_without_importing_torch(command):
    result = subprocess.run([sys.executable, "-X", "importtime", *COMMANDS[command], "--help"],
                            capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"exit codes:.*\b2\b", result.stdout, re.DOTALL), result.stdout
    imported = re.findall(r"\|\s+(\S+)$", result.stderr, re.MULTILINE)
    assert not [m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "timm")]


def _parsers():
    from data_shards.__main__ import build_parser as shards_parser
    from distill_engine.cli.main import build_parser as run_parser
    from distill_engine.diagnostics.__main__ import build_parser as diagnostics_parser
    for name, build in (("launch/run.py", run_parser), ("data_shards", shards_parser),
                        ("diagnostics", diagnostics_parser)):
        parser = build()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield f"{name} {sub}", subparser


def test_every_option_has_help_text():
    missing = [f"{name}: {action.option_strings or action.dest}"
               for name, parser in _parsers() for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and not action.help]
    assert not missing, missing
