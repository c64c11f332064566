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
            reads = _reads(recipe, model)
            if reads is not None and reads != modality:
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
    loaded = check_tokenizers(here, data.text, problems)
    for role, (recipe, model) in models.items():
        if _reads(recipe, model) != "text":
            continue
        directory = data.text.for_role(role)
        if directory is None:
            problems.append((f"{here}.text.tokenizers", f"no tokenizer for the {role}: add "
                             f"tokenizers.{role}"))
            continue
        tokenizer = loaded.get(directory)
        if tokenizer is None:
            continue  # reported by check_tokenizers
        config = model.config
        # The largest id, not the count: a vocabulary with gaps (41 tokens, ids past 1,000)
        # gives ids the embedding does not have (an IndexError on every rank's first step).
        ids = max(tokenizer.get_vocab().values(), default=-1) + 1
        if ids > config.vocab_size:
            count = "" if ids == len(tokenizer) else f" (its {len(tokenizer):,} tokens have gaps)"
            problems.append((_tokenizer_path(here, data.text, role), (
                f"the tokenizer in {directory} gives ids up to {ids - 1:,}{count}, but the "
                f"{role} {recipe.arch} embeds only vocab_size={config.vocab_size:,}; give the "
                f"{role} kwargs vocab_size: {ids} (or the tokenizer it was trained with)")))
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and data.text.max_length > positions:
            problems.append((f"{here}.text.max_length", (
                f"{data.text.max_length} tokens, but the {role} {recipe.arch} has "
                f"max_position_embeddings={positions}; use at most {positions}")))


def check_tokenizers(here: str, text, problems: Problems) -> dict:
    """Each tokenizer directory of ``data.text`` loaded once (directory -> tokenizer, for
    those that load), with its problems: one that is not there (a warning for --plan of a
    recipe whose data is still to come), one that does not load, one without a padding
    token (the stream pads every batch to its longest text)."""
    loaded, seen = {}, set()
    for entry, directory in text.entries().items():
        if directory in seen:
            continue  # a directory both roles read: reported once
        seen.add(directory)
        where = _tokenizer_path(here, text, entry)
        try:
            tokenizer = load_tokenizer(directory)
        except DataError as err:
            problems.append((where, str(err)))
            continue
        if tokenizer.pad_token_id is None:
            problems.append((where, (
                f"the tokenizer in {directory} has no padding token (GPT-2-style tokenizers "
                f"have none), and the stream pads each batch to its longest text; save it "
                f"with one, e.g. tokenizer.pad_token = tokenizer.eos_token (or "
                f"add_special_tokens({{'pad_token': '[PAD]'}}) and a model with one more "
                f"vocabulary entry), then save_pretrained")))
            continue
        loaded[directory] = tokenizer
    return loaded


def _tokenizer_path(here: str, text, role: str) -> str:
    """Where a role's tokenizer is written: data.text.tokenizer (shared) or tokenizers.ROLE."""
    return (f"{here}.text.tokenizer" if text.tokenizer is not None
            else f"{here}.text.tokenizers.{role}")


def _reads(recipe: ModelRecipe, model: nn.Module) -> str | None:
    try:
        return recipe.family.input_modality(model)
    except Exception:  # a family that cannot tell: the forward check reports the model
        return None


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
