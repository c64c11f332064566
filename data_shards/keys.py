"""Stable sample keys and derived seeds.

Keys must survive webdataset's naming rule (everything before the first dot of a tar member
is the key), so they contain only letters, digits, '_' and '-'. Seeds are derived with a
hash, not Python's hash(), so they are the same in every process and on every run.
"""

import hashlib
import re

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def make_key(text: str) -> str:
    """A webdataset-safe key from a source identifier (a relative path, 'name_line', ...)."""
    return _UNSAFE_KEY_CHARS.sub("_", text).strip("_") or "_"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of its parts (ints and strings)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def in_holdout(key: str, fraction: float, seed: int) -> bool:
    """Split by key alone, so a sample lands on the same side whatever else is in the source."""
    return derive_seed("holdout", seed, key) / 2**63 < fraction
