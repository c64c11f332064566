import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import pack_digits  # noqa: E402


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The 1,797 digits of scikit-learn, packed once per test session by the command a user
    runs: ``digits/train`` (1,408 samples in 6 shards of at most 250) and ``digits/holdout``
    (389), split by key with seed 0. Tests read them and never write there."""
    out = tmp_path_factory.mktemp("digits")
    return pack_digits(out, "--holdout", "0.2", "--seed", "0", "--max-samples-per-shard", "250")
