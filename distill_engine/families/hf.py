"""Hugging Face transformers models, never fetched from a hub:

- ``hf:DIR``: a local directory with ``config.json`` (weights, if any, are loaded by the
  runtime); ``kwargs`` override config values;
- ``hf:MODEL_TYPE`` (``hf:bert``): an architecture declared by its config values in the spec.
  For BERT-like configs, ``num_attention_heads`` defaults to ``hidden_size / 64`` and
  ``intermediate_size`` to ``4 * hidden_size`` (the shapes of "Well-Read Students Learn
  Better"), so that a miniature is one line: ``{num_hidden_layers: 4, hidden_size: 256}``.

``kwargs.task`` picks the head: ``base``, ``masked_lm``, ``sequence_classification`` (with
``num_labels``), ``mae_pretraining`` (ViTMAE encoder + decoder) or ``image_classification`` (a
ViT classifier, which also builds from an MAE config so that it can start from an MAE
encoder). A directory of that name wins over a model type.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from data_shards import DataError
from data_shards.hf_folders import custom_code_problem, read_config
from distill_engine.suggest import did_you_mean

from . import masking
from .base import InputShape, ModelFamily, ModelRecipe, register_family

TASKS = {
    "base": "AutoModel",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "mae_pretraining": "AutoModelForPreTraining",            # ViTMAEForPreTraining
    "image_classification": "AutoModelForImageClassification",
}
CLASSIFIER_TASKS = ("sequence_classification", "image_classification")

# The key of an input dict that names the positions [B, L] (bool) whose vocabulary scores a
# masked-LM objective reads: the output projection then runs on those alone (the model's
# logits become [K, vocab], K = the positions chosen, in row-major order).
PREDICT_AT = "predict_at"
# Keys a checkpoint of the same backbone may carry for another head: a BertModel's pooler in
# a masked-LM model, a masked-LM head in a classifier. Dropped when the model has no such key.
OTHER_HEADS = ("pooler.", "cls.", "classifier.")


def _is_directory(name: str) -> bool:
    return (Path(name) / "config.json").is_file()


def _directory_problem(name: str) -> str | None:
    """Why a model directory cannot be read without running code or unbounded memory (its
    own code named by ``auto_map`` or a custom ``model_type``; a config that is not a JSON
    object of reasonable size), or None."""
    try:
        read_config(Path(name) / "config.json")
    except DataError as err:
        return str(err)
    return custom_code_problem(name)


def config_file_values(recipe: ModelRecipe) -> dict[str, Any]:
    """The values an ``hf:DIR`` config file gives and the recipe's kwargs do not override,
    nested configs (``text_config``) as dotted names; {} for a declared model type. Read as
    JSON, without transformers, so that a size can be judged before anything is built
    (transformers fills ``id2label`` with ``num_labels`` entries as it reads the file)."""
    if not _is_directory(recipe.name):
        return {}
    try:
        config = read_config(Path(recipe.name) / "config.json")
    except DataError:
        return {}  # reported by architecture_problem
    flat: dict[str, Any] = {}
    todo = [("", config)]
    while todo:
        prefix, node = todo.pop()
        for key, value in node.items():
            if not prefix and key in recipe.kwargs:
                continue
            if isinstance(value, dict):
                todo.append((f"{prefix}{key}.", value))
            else:
                flat[f"{prefix}{key}"] = value
    return flat


def _model_types() -> list[str]:
    from transformers import CONFIG_MAPPING
    return list(CONFIG_MAPPING.keys())


def build_config(recipe: ModelRecipe):
    """The transformers config of a recipe: the directory's, or the declared model type's,
    with the recipe's kwargs (``task`` aside) over it."""
    import transformers
    values = {k: v for k, v in recipe.kwargs.items() if k != "task"}
    if _is_directory(recipe.name):
        if problem := _directory_problem(recipe.name):
            raise ValueError(problem)
        # trust_remote_code=False: never the folder's code, and never a question on stdin
        config = transformers.AutoConfig.from_pretrained(recipe.name, local_files_only=True,
                                                         trust_remote_code=False)
        for key, value in values.items():
            setattr(config, key, value)
        return config
    width = values.get("hidden_size")
    if width is not None:
        values.setdefault("num_attention_heads", max(1, width // 64))
        values.setdefault("intermediate_size", 4 * width)
    return transformers.AutoConfig.for_model(recipe.name, **values)


@register_family("hf")
class HuggingFaceFamily(ModelFamily):

    def architecture_problem(self, name: str) -> str | None:
        if _is_directory(name):
            return _directory_problem(name)
        if name in _model_types():
            return None
        if ("/" in name or name.startswith(".")) and not Path(name).exists():
            return (f"model directory {name} does not exist (hf:NAME is a local directory "
                    f"with config.json, or a transformers model type such as 'bert')")
        return (f"{name} is neither a Hugging Face model directory (no config.json there) nor a "
                f"transformers model type such as 'bert'" + did_you_mean(name, _model_types(), "type"))

    def file_sizes(self, recipe: ModelRecipe) -> tuple[Path, dict[str, Any]] | None:
        if not _is_directory(recipe.name):
            return None
        return Path(recipe.name) / "config.json", config_file_values(recipe)

    def create(self, recipe: ModelRecipe, drop_path_rate: float | None = None,
               drop_path_schedule: str = "linear") -> nn.Module:
        import transformers

        # Imported here, at the plan's meta-device build: importing them later, inside
        # zero.Init (which patches tensor construction), fails in torch._dynamo's import.
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import initialize_weights_zero3
        task = recipe.kwargs.get("task", "base")
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {sorted(TASKS)}")
        config = build_config(recipe)
        if task == "image_classification" and config.model_type == "vit_mae":
            # Fine-tuning an MAE encoder: the same encoder (same module names) under a ViT
            # classifier head; transformers has no MAE classification head.
            config = transformers.ViTConfig(**config.to_dict())
        # drop_path_rate is timm's notion; BERT-style models regularise by the dropout
        # probabilities in their config.
        model_class = getattr(transformers, TASKS[task])
        if not _inside_zero_init():
            model = model_class.from_config(config, trust_remote_code=False)
        else:
            # Under the runtime's zero.Init each parameter is partitioned as it is created, and
            # transformers' own initialisation (which indexes the embedding's padding row) would
            # see empty shards: build without it, then initialise each module's gathered
            # parameters, as transformers does when it opens zero.Init itself.
            with no_init_weights():
                model = model_class.from_config(config, trust_remote_code=False)
            initialize_weights_zero3(model)
            model.tie_weights()
        masking.set_fixed_positions(model)  # an MAE's sin-cos tables (transformers leaves zeros)
        return model

    def input_modality(self, model: nn.Module) -> str:
        return "text" if getattr(model, "main_input_name", "input_ids") == "input_ids" else "image"

    def example_input(self, model: nn.Module, shape: InputShape, batch: int = 1,
                      device: str | torch.device = "meta",
                      generator: torch.Generator | None = None) -> Any:
        config = model.config
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            size = (batch, getattr(config, "num_channels", 3), shape.image_size, shape.image_size)
            pixels = torch.zeros(size) if generator is None else torch.randn(size, generator=generator)
            return {"pixel_values": pixels.to(device)}
        # A sequence past the position embeddings is refused by --check with its own
        # message (text_checks); the trace stays within them so that it can say so.
        length = min(shape.seq_len, getattr(config, "max_position_embeddings", shape.seq_len))
        if generator is None:
            # No attention mask for tracing: transformers inspects a mask's values, which
            # meta tensors do not have (no mask means every token is attended).
            return {"input_ids": torch.zeros(batch, length, dtype=torch.long, device=device)}
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
        return {"input_ids": ids.to(device),
                "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device)}

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        if masking.masks_inside(model) or (isinstance(inputs, dict) and masking.MASK_RATIO in inputs):
            return masking.forward(model, inputs)  # ViTMAE: the mask ratio an objective chose
        if isinstance(inputs, dict) and PREDICT_AT in inputs:
            inputs = dict(inputs)
            with predictions_only_at(model, inputs.pop(PREDICT_AT)):
                return model(**inputs)
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(**{model.main_input_name: inputs})

    def output_tensor(self, output: Any) -> torch.Tensor | None:
        if isinstance(output, torch.Tensor):
            return output
        for name in ("logits", "last_hidden_state"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value
        return super().output_tensor(output)

    def supports_grad_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model, "supports_gradient_checkpointing", False))

    def set_grad_checkpointing(self, model: nn.Module, enabled: bool = True) -> None:
        if not self.supports_grad_checkpointing(model):
            super().set_grad_checkpointing(model, enabled)
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    def init_extra_modules(self, model: nn.Module) -> tuple[str, ...]:
        # A ViT (classifier or encoder) starting from a ViTMAEForPreTraining export: the
        # encoder has the same module names, the MAE decoder is not part of it.
        if isinstance(getattr(model, "vit", None), nn.Module) and not masking.masks_inside(model):
            return ("decoder",)
        return ()

    def classifier_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """The task heads, which start fresh when the file holds another head (a backbone
        or a masked-LM model initialising a classifier, like ``from_pretrained``)."""
        prefix = getattr(model, "base_model_prefix", "")
        heads = [name for name in ("classifier", "cls") if isinstance(getattr(model, name, None), nn.Module)]
        backbone = getattr(model, prefix, None) if prefix else None
        if heads and isinstance(getattr(backbone, "pooler", None), nn.Module):
            heads.append(f"{prefix}.pooler")  # a masked-LM checkpoint has no pooler
        return tuple(f"{h}." for h in heads)

    def adapt_state_keys(self, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints of the same backbone saved by another class: a ``BertModel`` file has
        no ``bert.`` prefix that ``BertFor*`` models have (and the other way round); keys of
        another head (``cls.``, ``classifier.``, a pooler) are dropped when the model has
        none; tied copies (a masked-LM decoder that is the word embedding) count once; buffers
        the model does not save are dropped."""
        params = dict(model.state_dict(keep_vars=True))
        owner: dict[int, str] = {}  # a tensor's first name: the one named_parameters reports
        for name, value in params.items():
            owner.setdefault(id(value), name)
        wanted = set(owner.values())
        prefix = getattr(model, "base_model_prefix", "")
        if prefix:
            model_prefixed = any(k.startswith(prefix + ".") for k in wanted)
            file_prefixed = any(k.startswith(prefix + ".") for k in state)
            if model_prefixed and not file_prefixed:
                state = {(k if k.startswith(OTHER_HEADS[1:]) else f"{prefix}.{k}"): v
                         for k, v in state.items()}
            elif file_prefixed and not model_prefixed:
                state = {k[len(prefix) + 1:]: v for k, v in state.items()
                         if k.startswith(prefix + ".")}
        # Buffers the model computes itself and does not save (position_ids), which older
        # transformers versions saved.
        unsaved = {name for name, _ in model.named_buffers()} - set(params)
        adapted = {}
        for key, value in state.items():
            if key in params and key not in wanted:
                key = owner[id(params[key])]  # a tied alias: stored under the owner's name
            elif key not in params and (_is_other_head(key, prefix) or key in unsaved):
                continue
            adapted.setdefault(key, value)
        return adapted

    def write_export(self, state: dict[str, torch.Tensor], recipe: ModelRecipe, model: nn.Module,
                     out_dir: Path, extra: dict[str, Any]) -> Path:
        """A ``save_pretrained`` directory: config, ``model.safetensors`` and (when the stage
        read text) the student's tokenizer, so that ``AutoModelFor...from_pretrained(DIR)``
        loads it in one line; a classifier's config names its classes (``id2label``, from
        ``extra["label_names"]``); ``model.json`` records the recipe."""
        export = self.create(recipe)  # on the CPU, outside ZeRO: rank 0 only
        missing, unexpected = export.load_state_dict(self.adapt_state_keys(export, state),
                                                     strict=False)
        tied = {k for k in missing if k in _aliases(export)}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export of {recipe.arch}: missing {sorted(set(missing) - tied)}, "
                               f"unexpected {sorted(unexpected)}")
        names = extra.get("label_names") or []
        if recipe.kwargs.get("task") in CLASSIFIER_TASKS and len(names) == export.config.num_labels:
            # Class names as the shards' index has them, so that pipeline() and
            # config.id2label say "positive" where transformers would write "LABEL_2".
            export.config.id2label = dict(enumerate(names))
            export.config.label2id = {name: i for i, name in enumerate(names)}
        export.save_pretrained(out_dir)
        _keep_own_names(export, out_dir / "model.safetensors")
        tokenizer = extra.pop("tokenizer", None)
        if tokenizer is not None:
            from data_shards import load_tokenizer
            load_tokenizer(tokenizer).save_pretrained(out_dir)
        card = {"arch": recipe.arch, "kwargs": recipe.kwargs, "tokenizer": str(tokenizer), **extra}
        (out_dir / "model.json").write_text(json.dumps(card, indent=2, default=str))
        return out_dir / "model.safetensors"


def output_projection(model: nn.Module | None) -> nn.Module | None:
    """The module that maps hidden states to vocabulary scores (a masked-LM decoder), or
    None for a model without one."""
    get = getattr(model, "get_output_embeddings", None)
    projection = get() if callable(get) else None
    return projection if isinstance(projection, nn.Module) else None


@contextmanager
def predictions_only_at(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Inside the block the model's output projection reads only the hidden states at
    ``positions`` ([B, L] bool): its input [B, L, D] becomes [K, D], so the vocabulary is
    scored where a loss reads it and nowhere else. The hook is gone afterwards (an evaluation
    or a second pass scores every position)."""
    projection = output_projection(model)
    if projection is None:
        raise ValueError(f"{type(model).__name__} has no output projection to score chosen "
                         f"positions with (get_output_embeddings() is None)")

    def gather(module, args):
        hidden, *rest = args
        return (hidden[positions.to(hidden.device)], *rest)

    handle = projection.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _keep_own_names(model: nn.Module, weights: Path) -> None:
    """transformers writes some models under older key names (ViTMAE's encoder layers); the
    runtime's later stages load an export by the model's own names, which ``from_pretrained``
    reads as well, so the file is rewritten with those where the two differ."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    own = {k: v for k, v in model.state_dict().items() if k not in _aliases(model)}
    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    if saved != set(own):
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in own.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(weights)


def _inside_zero_init() -> bool:
    try:
        from deepspeed.runtime.zero import partition_parameters
    except ImportError:
        return False
    return partition_parameters.zero_init_context > 0


def _is_other_head(key: str, prefix: str) -> bool:
    return key.startswith(OTHER_HEADS) or (bool(prefix) and key.startswith(f"{prefix}.pooler."))


def _aliases(model: nn.Module) -> set[str]:
    """State-dict names of tensors that another name already holds (tied weights)."""
    seen, aliases = set(), set()
    for name, value in model.state_dict(keep_vars=True).items():
        (aliases.add(name) if id(value) in seen else seen.add(id(value)))
    return aliases
