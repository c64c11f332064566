"""Memory sizes as people write them ('80GB', '512MiB') and as the plans print them."""

from __future__ import annotations

import re

GiB = 1024 ** 3
MEMORY_UNITS = {"kb": 1024, "kib": 1024, "mb": 1024 ** 2, "mib": 1024 ** 2,
                "gb": 1024 ** 3, "gib": 1024 ** 3, "g": 1024 ** 3,
                "tb": 1024 ** 4, "tib": 1024 ** 4, "t": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '80G', '512MB', '1.5TB' -> bytes. GB is taken as GiB, as GPU
    vendors mean it ('80GB' H100s have 80 GiB). A bare number is refused: '80' would be
    80 bytes, which nobody means."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in MEMORY_UNITS:
        unit = "" if not match else (" has no unit" if not match[2] else
                                     f" has an unknown unit {match[2]!r}")
        raise ValueError(f"{text!r}{unit or ' is not a memory size'}; give a number and a "
                         f"unit, e.g. 80GB, 80GiB or 512MB")
    size = int(float(match[1]) * MEMORY_UNITS[match[2]])
    if size < 1024 ** 2:
        raise ValueError(f"{text!r} is less than 1 MiB; give the memory of one GPU, e.g. 80GB")
    return size


def memory_size(text: str) -> int:
    """``parse_bytes`` for argparse: a bad size ends the command with exit code 2."""
    import argparse
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def gib(count: float) -> str:
    return f"{count / GiB:.2f} GiB" if count >= GiB / 10 else f"{count / 1024 ** 2:.1f} MiB"
