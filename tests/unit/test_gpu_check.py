"""bench/gpu_check.sh: the check a GPU machine runs, tested where CI runs (no GPU): its
dry run passes and says what the real run would do, and the real run refuses to run on a
machine without a GPU instead of timing the CPU."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    summary = tmp_path / "gpu_check" / "summary.md"
    result = subprocess.run(["bash", str(SCRIPT), *args, "--summary", str(summary)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    return result, summary.read_text() if summary.exists() else ""


def test_dry_run_checks_every_step_on_the_cpu(tmp_path):
    result, summary = run("--dry-run", "--gpus", "2", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run passed" in result.stderr
    # Each timed step is named with the command the real run would time, and its CPU check passed.
    for step in ("quickstart", "engine_overhead", "teacher_sharding", "peers"):
        assert f"## {step}" in summary
    assert summary.count("passed.") == 4
    assert "stages.1.teacher.dtype=bf16" in summary and "--worlds 1,2" in summary
    assert "GPU CHECK FAILED" not in summary


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have a GPU")
def test_without_a_gpu_the_real_run_fails_loudly(tmp_path):
    result, summary = run(tmp_path=tmp_path)
    assert result.returncode == 1
    assert "GPU CHECK FAILED" in result.stderr and "does not fall back to the CPU" in result.stderr
    assert "**GPU CHECK FAILED**" in summary
