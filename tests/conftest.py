import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import DIGITS_TEACHER, pack_digits  # noqa: E402


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The 1,797 digits of scikit-learn, packed once per test session by the command a user
    runs: ``digits/train`` (1,408 samples in 6 shards of at most 250) and ``digits/holdout``
    (389), split by key with seed 0. Tests read them and never write there."""
    out = tmp_path_factory.mktemp("digits")
    return pack_digits(out, "--holdout", "0.2", "--seed", "0", "--max-samples-per-shard", "250")


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory) -> Path:
    """Weights of the digits FD teacher (helpers.DIGITS_TEACHER, seed 0), saved once."""
    import timm
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", **DIGITS_TEACHER).state_dict(), str(path))
    return path


def pytest_collection_modifyitems(config, items):
    """Every test under tests/distributed/ starts real DeepSpeed ranks: marked so, so that
    ``-m "not distributed"`` (or ``pytest tests/unit``) is the fast subset."""
    for item in items:
        if "distributed" in Path(str(item.fspath)).parent.parts[-1:]:
            item.add_marker(pytest.mark.distributed)
