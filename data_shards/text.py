"""Tokenising text samples in the loader's workers, with Hugging Face tokenizers read from
local directories.

A text batch gets one entry per tokenizer: ``tokens`` when one tokenizer serves every model,
or one per role (``teacher``, ``student``) when they differ, as images get one view per role.
Each entry is ``{"input_ids", "attention_mask"}``, truncated to ``max_length`` and padded to
the longest sequence of the batch (not to ``max_length``: short sentences cost short batches).
Tokenising is a pure function of the texts, so a resumed stream gives the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import DataError
from .hf_folders import custom_code_problem

# The workers are the parallelism: a fast tokenizer's own thread pool inside a forked worker
# would oversubscribe the cores (and the library warns once per fork if it was used before).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKEN_ENTRIES = ("tokens", "teacher", "student")


class TextConfig(BaseModel):
    """``tokenizer: DIR`` (one, for every model: batch entry ``tokens``), or
    ``tokenizers: {teacher: DIR, student: DIR}`` (batch entries per role)."""

    model_config = ConfigDict(extra="forbid")
    tokenizer: Path | None = Field(None, description="a local tokenizer directory shared by all models")
    tokenizers: dict[str, Path] | None = Field(None, description="per role: {teacher: DIR, student: DIR}")
    max_length: int = Field(128, ge=2, description="longer texts are truncated to this many tokens")

    @model_validator(mode="after")
    def _one_form(self) -> "TextConfig":
        if (self.tokenizer is None) == (self.tokenizers is None):
            raise ValueError("give exactly one of 'tokenizer' (shared) or 'tokenizers' ({teacher: DIR, student: DIR})")
        if self.tokenizers is not None:
            unknown = sorted(set(self.tokenizers) - {"teacher", "student"})
            if unknown or not self.tokenizers:
                raise ValueError(f"tokenizers are named by role, 'teacher' and/or 'student'; not {unknown}")
        return self

    def entries(self) -> dict[str, Path]:
        """Batch entry name -> tokenizer directory."""
        return {"tokens": self.tokenizer} if self.tokenizer is not None else dict(self.tokenizers)

    def for_role(self, role: str) -> Path | None:
        """The tokenizer a model of ``role`` reads its ids from."""
        entries = self.entries()
        return entries.get(role, entries.get("tokens"))


_LOADED: dict[str, object] = {}  # one tokenizer per directory per process (worker)


def load_tokenizer(directory: str | os.PathLike):
    """A fast tokenizer from a local directory (never a hub); cached per process."""
    key = str(directory)
    if key not in _LOADED:
        from transformers import AutoTokenizer

        if not Path(key).exists():
            raise DataError(f"tokenizer directory {key} does not exist; name a local directory saved by a Hugging Face tokenizer's save_pretrained (with tokenizer.json).")
        if not (Path(key) / "tokenizer_config.json").is_file() and not (Path(key) / "tokenizer.json").is_file():
            raise DataError(f"{key} is not a tokenizer directory (no tokenizer.json or tokenizer_config.json); name a local directory saved by a Hugging Face tokenizer's save_pretrained.")
        if problem := custom_code_problem(key):
            raise DataError(problem)
        try:
            # trust_remote_code=False: never the folder's code, and never a question on stdin
            tokenizer = AutoTokenizer.from_pretrained(key, local_files_only=True, trust_remote_code=False)
        except Exception as exn:  # transformers raises OSError, ValueError, ... for a broken directory
            raise DataError(f"cannot load a tokenizer from {key}: {str(exn).splitlines()[0] if str(exn) else type(exn).__name__}") from None
        if not tokenizer.is_fast:
            raise DataError(f"the tokenizer in {key} is not a fast (Rust) tokenizer; save one with tokenizer.json.")
        _LOADED[key] = tokenizer
    return _LOADED[key]


# A tokenizer truncates only after tokenising the whole text: one 50 MB line cost gigabytes
# and a minute on every draw. So a long text is given to it from its start only, cut at a
# word boundary (whitespace), in windows of max_length x 8 characters, doubled until the
# window holds max_length tokens; a word is never cut, so those tokens are the whole text's.
# At most max_length x 1,024 characters are ever tokenised: first tokens that span more
# than that (an unbroken 'word' or a run of spaces 1,024 characters per token) are cut there.
FIRST_WINDOW_CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 1024


def within_reach(text: str, tokenizer, max_length: int) -> str:
    """The start of ``text`` that gives the same first ``max_length`` tokens as the whole
    text (see above); short texts are returned as they are."""
    window = max_length * FIRST_WINDOW_CHARS_PER_TOKEN
    limit = max_length * MAX_CHARS_PER_TOKEN
    while len(text) > window:
        if window >= limit:
            return text[:limit]
        cut = next((i for i in range(window, window // 2, -1) if text[i].isspace()), window)
        start = text[:cut]
        if len(tokenizer(start, add_special_tokens=False)["input_ids"]) >= max_length:
            return start
        window *= 2
    return text


def tokenize(texts: list[str], config: TextConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Every batch entry of ``config`` for these texts: {entry: {input_ids, attention_mask}}."""
    out = {}
    for entry, directory in config.entries().items():
        tokenizer = load_tokenizer(directory)
        reachable = [within_reach(text, tokenizer, config.max_length) for text in texts]
        encoded = tokenizer(reachable, truncation=True, max_length=config.max_length, padding="longest", return_tensors="pt", return_token_type_ids=False)
        out[entry] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return out
