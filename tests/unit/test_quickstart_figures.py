"""The image check compares the quickstart's accuracies with the README's within the
tolerance another CPU needs (its figures moved by up to about 2 points), as
``scripts/build_image.sh`` runs it: the comparison fed to python on stdin."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT


def expected_and_tolerance() -> tuple[str, str]:
    script = (ROOT / "scripts" / "build_image.sh").read_text()
    expected = re.search(r'^EXPECTED="([^"]+)"', script, re.M).group(1)
    tolerance = re.search(r"^ACCURACY_TOLERANCE=\$\{ACCURACY_TOLERANCE:-([0-9.]+)\}", script, re.M)
    return expected, tolerance.group(1)


def compare(tmp_path: Path, accuracies: dict[str, float]) -> subprocess.CompletedProcess:
    for stage, accuracy in accuracies.items():
        export = tmp_path / "runs" / "quickstart" / stage / "export"
        export.mkdir(parents=True, exist_ok=True)
        (export / "metrics.json").write_text(json.dumps({"accuracy": accuracy / 100}))
    expected, tolerance = expected_and_tolerance()
    with open(ROOT / "scripts" / "quickstart_accuracy.py") as script:
        return subprocess.run([sys.executable, "-", expected, tolerance], stdin=script,
                              capture_output=True, text=True, cwd=tmp_path)


def test_the_image_check_states_the_readmes_figures():
    expected, _ = expected_and_tolerance()
    readme = (ROOT / "README.md").read_text()
    for item in expected.split():
        stage, want = item.split("=")
        assert re.search(rf"│ {stage} +│.*│ {re.escape(want)}% +│", readme), (stage, want)


def shifted(**points: float) -> dict[str, float]:
    """The README's figures moved by ``points`` per stage."""
    expected = dict(item.split("=") for item in expected_and_tolerance()[0].split())
    return {stage: round(float(want) + points.get(stage, 0.0), 2) for stage, want in expected.items()}


@pytest.mark.parametrize("accuracies,code", [
    # Another CPU of the same family (issue 23) moved the figures by these points; exact
    # two-decimal equality failed there.
    (shifted(teacher=+0.77, finetune_distilled=-1.29), 0),
    (shifted(), 0),
    # A run that learnt something else is still caught.
    (shifted(finetune_distilled=-6.61), 1),
])
def test_the_image_check_allows_other_cpus_figures_and_no_more(tmp_path, accuracies, code):
    result = compare(tmp_path, accuracies)
    assert result.returncode == code, result.stdout + result.stderr
    assert ("DIFFERENT" in result.stdout) == bool(code), result.stdout
