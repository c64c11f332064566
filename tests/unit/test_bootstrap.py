"""scripts/bootstrap.sh on a machine that is already set up: it says so, and installs
nothing (a second run must work offline, on an air-gapped node)."""

import os
import stat
import subprocess
import sys

from helpers import ROOT


def test_a_ready_venv_is_recognised_without_installing(tmp_path):
    # A venv whose python is this one, except that any "-m pip" is recorded and fails:
    # a readiness check that wrongly says "not ready" would try to install.
    calls = tmp_path / "pip_calls"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-m" ]; then echo "$@" >> {calls}; '
                      f'exit 1; fi\nexec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    env.update(VENV=str(venv), PYTHONPATH=str(ROOT))  # as a user runs it: no accelerator preset
    result = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh")], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"bootstrap: {venv} is ready", result.stdout
    assert not calls.exists(), calls.read_text()
