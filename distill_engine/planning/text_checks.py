"""What a stage's data and its models must agree on before launch: the modality (text shards
to a model that reads token ids, images to one that reads pixels), and for text the
tokenizer directories, their vocabularies and the sequence length.

Without these checks a mismatch surfaced on every rank as a ``KeyError`` deep in the first
step; here it is one paragraph at ``--check``.
"""

from __future__ import annotations

from torch import nn

from data_shards import DataError, load_tokenizer
from distill_engine.families import ModelRecipe
from distill_engine.spec.schema import StageSpec

from .job import Problems
from .references import read_index


def shard_modality(urls) -> tuple[str | None, str | None]:
    """(modality, location) from the first local shard index, or (None, None) when no index
    is readable (remote shards, brace patterns)."""
    for url in [urls] if isinstance(urls, str) else (urls or []):
        index = read_index(url)
        if index and index.get("modality") in ("image", "text"):
            return index["modality"], url
    return None, None


def check_inputs(index: int, stage: StageSpec, models: dict[str, tuple[ModelRecipe, nn.Module]],
                 problems: Problems) -> None:
    """``models``: role -> (recipe, meta-built model) for the roles the stage has."""
    here = f"stages[{index}].data"
    data = stage.data
    for key in ("train", "eval"):
        modality, url = shard_modality(getattr(data, key))
        if modality is None:
            continue
        for role, (recipe, model) in models.items():
            reads = recipe.family.input_modality(model)
            if reads != modality:
                wanted = ("text shards (pack a .txt or a JSONL of {\"text\", \"label\"})"
                          if reads == "text" else "image shards")
                problems.append((f"{here}.{key}", (
                    f"{url} holds {modality} shards (its index.json says modality "
                    f"'{modality}'), but the {role} {recipe.arch} reads "
                    f"{'token ids' if reads == 'text' else 'images'}; give this stage "
                    f"{wanted}, or a {role} that reads {modality}")))
        if modality == "text" and data.text is None:
            problems.append((f"{here}.text", (
                f"{url} holds text shards, which are tokenised in the stream: set "
                f"data.text.tokenizer to a local tokenizer directory (one saved by "
                f"save_pretrained, with tokenizer.json) and data.text.max_length")))
        if modality == "image" and data.text is not None:
            problems.append((f"{here}.text", f"{url} holds image shards; data.text applies to "
                             f"text shards only (remove it, or give text shards)"))
    if data.text is None:
        return
    for role, (recipe, model) in models.items():
        if recipe.family.input_modality(model) != "text":
            continue
        directory = data.text.for_role(role)
        where = f"{here}.text.{'tokenizer' if data.text.tokenizer is not None else 'tokenizers'}"
        if directory is None:
            problems.append((where, f"no tokenizer for the {role}: add tokenizers.{role}"))
            continue
        try:
            tokenizer = load_tokenizer(directory)
        except DataError as err:
            problems.append((where, str(err)))
            continue
        config = model.config
        if len(tokenizer) > config.vocab_size:
            problems.append((where, (
                f"the tokenizer in {directory} has {len(tokenizer):,} tokens but the {role} "
                f"{recipe.arch} embeds only vocab_size={config.vocab_size:,}; give the {role} "
                f"kwargs vocab_size: {len(tokenizer)} (or the tokenizer it was trained with)")))
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and data.text.max_length > positions:
            problems.append((f"{here}.text.max_length", (
                f"{data.text.max_length} tokens, but the {role} {recipe.arch} has "
                f"max_position_embeddings={positions}; use at most {positions}")))


def describe_text(stage: StageSpec) -> str | None:
    """One line for ``--check``: tokenizers, vocabularies and sequence length."""
    text = stage.data.text
    if text is None:
        return None
    parts = []
    for entry, directory in text.entries().items():
        try:
            size = f"vocabulary {len(load_tokenizer(directory)):,}"
        except DataError:
            size = "unreadable"
        parts.append(f"{entry}: {directory} ({size})")
    return (f"{'; '.join(parts)}; at most {text.max_length} tokens, padded per batch")
