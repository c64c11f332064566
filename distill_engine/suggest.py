"""Suggestions for misspelt names, for every error message that names a choice."""

from __future__ import annotations

import difflib


def did_you_mean(name: str, candidates, what: str) -> str:
    """`` did you mean 'x'?`` (or nothing) for a misspelt ``name``."""
    nearest = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(n) for n in nearest)}?" if nearest else ""
