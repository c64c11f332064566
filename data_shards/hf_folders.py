"""Hugging Face folders that a spec names (a tokenizer, an ``hf:DIR`` model): read as JSON,
never as code.

transformers runs Python files that a folder's ``config.json`` or ``tokenizer_config.json``
points at (``auto_map``), after asking on stdin when ``trust_remote_code`` is not given; a
``model_type`` or ``tokenizer_class`` it does not ship can only be built by such code. A
spec and the folders it names never run code, so such folders are refused here, before
transformers opens them, and every load passes ``trust_remote_code=False`` as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import DataError

# Configs are a few kB; a tokenizer_config.json with every added token a few MB. A file
# far beyond that is refused before it is read (json.loads of a 5 GB file is 5 GB and more).
MAX_CONFIG_BYTES = 64 << 20
CONFIG_FILES = ("config.json", "tokenizer_config.json")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A folder's JSON config file as a dict; DataError when it is too large, not JSON or
    not an object."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise DataError(f"{path} has {size:,} bytes, more than any Hugging Face config "
                            f"({MAX_CONFIG_BYTES >> 20} MiB at most); it is not read.")
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exn:  # UnicodeDecodeError and JSONDecodeError included
        raise DataError(f"{path} cannot be read as JSON ({type(exn).__name__}: "
                        f"{str(exn).splitlines()[0] if str(exn) else 'no message'}); save the "
                        f"folder again with save_pretrained.") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds a JSON {type(raw).__name__}, not the object of a "
                        f"Hugging Face config; save the folder again with save_pretrained.")
    return raw


def custom_code_problem(directory: str | os.PathLike) -> str | None:
    """Why transformers would need the folder's own code to load it (one paragraph), or
    None. Reads only the folder's JSON files; a file that does not read is left to the
    load that follows, which says why."""
    directory = Path(directory)
    reasons = []
    for name in CONFIG_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            config = read_config(path)
        except DataError:
            continue
        if "auto_map" in config:
            reasons.append(f"{name} has auto_map ({_short_map(config['auto_map'])})")
        model_type = config.get("model_type")
        if name == "config.json" and isinstance(model_type, str) and not _known_model_type(model_type):
            reasons.append(f"{name}'s model_type {model_type!r} is not one of transformers' "
                           f"model types")
        tokenizer_class = config.get("tokenizer_class")
        if isinstance(tokenizer_class, str) and not _known_tokenizer(tokenizer_class):
            reasons.append(f"{name}'s tokenizer_class {tokenizer_class!r} is not one of "
                           f"transformers' tokenizers")
    if not reasons:
        return None
    return (f"{directory} asks for code of its own: {'; '.join(reasons)}. A spec and the "
            f"folders it names never run code, so it is not loaded. Give a folder that "
            f"transformers' own classes read (saved with save_pretrained from a built-in type "
            f"such as BertConfig or a tokenizer with tokenizer.json), or, if the folder's "
            f"model_type and tokenizer_class are transformers' own, delete its auto_map entries.")


def _short_map(auto_map: Any) -> str:
    if isinstance(auto_map, dict):
        parts = [f"{key}: {value}" for key, value in list(auto_map.items())[:3]]
        return ", ".join(parts) + (", ..." if len(auto_map) > 3 else "")
    return str(auto_map)[:120]


def _known_model_type(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING
    return model_type in CONFIG_MAPPING


def _known_tokenizer(class_name: str) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    try:
        return tokenizer_class_from_name(class_name) is not None
    except Exception:  # a name that makes transformers import a module it lacks
        return False
