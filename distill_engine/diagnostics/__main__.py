"""python -m distill_engine.diagnostics attention --model MODEL [--model MODEL ...]
--shards DIR --out DIR

Writes OUT/attention.json (per model, layer and head: mean attention distance in pixels and
patches; per layer: head similarity) and OUT/attention.png (the models side by side).

Exit codes: 0 written, 2 bad arguments or inputs (a model that is not a timm ViT or not a
complete timm export, missing or damaged weights, config or shards, text shards, an --out
that is a file, a count below 1), each with a one-paragraph message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def positive(text: str) -> int:
    """A count of at least 1 (``--samples -5`` analysed 59 images: a negative slice)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill_engine.diagnostics",
        description="Analyses of trained models.",
        epilog="exit codes: 0 written; 2 bad arguments or inputs (one-paragraph message)")
    commands = parser.add_subparsers(dest="command", required=True)
    attention = commands.add_parser(
        "attention", epilog="exit codes: 0 written; 2 bad arguments or inputs",
        help="average attention distance per head and layer, and head similarity per layer "
             "(the Feature Distillation paper's analysis), as JSON and PNG",
        description="Average attention distance per head and layer, and head similarity "
                    "per layer, of timm vision transformers on images from shards.")
    attention.add_argument(
        "--model", action="append", required=True, metavar="MODEL",
        help="an export directory (a stage's export/, loaded with timm's local-dir:) or "
             "timm:NAME (with --kwargs and --weights); repeat to compare models")
    attention.add_argument("--label", action="append", default=[], metavar="NAME",
                           help="a name per --model for the JSON and the legend (default: "
                                "the export's stage, or the architecture)")
    attention.add_argument("--weights", type=Path, metavar="FILE",
                           help="weights (.safetensors or a torch state dict) for timm:NAME "
                                "models, e.g. a teacher's")
    attention.add_argument("--kwargs", type=json.loads, default={}, metavar="JSON",
                           help="keyword arguments for timm:NAME models, e.g. "
                                "'{\"img_size\": 24, \"patch_size\": 4}'")
    attention.add_argument("--shards", required=True, metavar="DIR",
                           help="image shards with an index (python -m data_shards pack); "
                                "read in order, centre-cropped as the model's config says")
    attention.add_argument("--samples", type=positive, default=256, metavar="N",
                           help="images to average over (default 256)")
    attention.add_argument("--batch-size", type=positive, default=64, metavar="N",
                           help="images per forward (default 64)")
    attention.add_argument("--out", type=Path, required=True, metavar="DIR",
                           help="where attention.json and attention.png are written")
    return parser


class InputError(Exception):
    pass


def load_model(source: str, weights: Path | None, kwargs: dict):
    """A timm model from an export directory or timm:NAME (+ kwargs, weights); and its label."""
    import timm
    if source.startswith("timm:"):
        name = source.removeprefix("timm:")
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except (RuntimeError, TypeError, ValueError) as err:
            raise InputError(f"cannot build {source} with kwargs {kwargs}: {err}") from None
        if weights is not None:
            from distill_engine.weights import WeightsError, read_state_dict
            try:
                model.load_state_dict(read_state_dict(weights))
            except (WeightsError, RuntimeError) as err:
                raise InputError(f"weights {weights} do not load into {source}: "
                                 f"{str(err).splitlines()[0]}") from None
        return model, name
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise InputError(f"{source} is neither timm:NAME nor an export directory (one with "
                         f"config.json and model.safetensors, as a stage's export/ holds)")
    from data_shards import DataError
    from data_shards.hf_folders import read_config
    try:
        config = read_config(directory / "config.json")
    except DataError as err:
        raise InputError(str(err)) from None
    if "architecture" not in config:
        what = (f"a Hugging Face transformers export (model_type {config['model_type']!r})"
                if "model_type" in config else "not a timm export (its config.json names no "
                "'architecture')")
        raise InputError(f"{source} is {what}; attention diagnostics read timm vision "
                         f"transformers: the export of a stage whose student is timm:..., or "
                         f"timm:NAME with --kwargs and --weights")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        # timm's local-dir: would take another file of the folder (a stage's
        # probe.safetensors) for the weights; the export's own are read here, by name.
        raise InputError(f"{source} has no model.safetensors, the export's weights; point "
                         f"at a complete export (a finished stage's export/)")
    try:
        model = timm.create_model(f"local-dir:{directory.resolve()}", pretrained=False)
    except Exception as err:  # timm: RuntimeError (unknown model), TypeError (bad model_args), ...
        raise InputError(f"{directory / 'config.json'} does not build a timm model: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    from distill_engine.weights import WeightsError, read_state_dict
    try:
        model.load_state_dict(read_state_dict(weights))
    except (WeightsError, RuntimeError) as err:
        raise InputError(f"weights {weights} do not load into the model its config.json "
                         f"describes: {str(err).splitlines()[0]}") from None
    card = directory / "model.json"
    try:
        label = json.loads(card.read_text()).get("stage") if card.is_file() else None
    except (OSError, ValueError, AttributeError):
        label = None  # a damaged card: the folder's name labels the model
    return model, label or directory.name


def check_shards(shards: str) -> None:
    """Image shards with a readable index (text shards have no pixels to attend over)."""
    from data_shards import DataError, ShardIndex
    try:
        index = ShardIndex.load(shards)
    except DataError as err:
        raise InputError(str(err)) from None
    if index.modality != "image":
        raise InputError(f"{shards} holds {index.modality} shards (its index.json says "
                         f"modality '{index.modality}'); attention diagnostics need image "
                         f"shards (python -m data_shards pack IMAGE_FOLDER)")


def check_out(out: Path) -> None:
    """``--out`` is a folder, or can be made one (before any model is run)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; attention.json and attention.png are "
                         f"written into a folder: name one that is not there yet or a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out} cannot be made a folder ({err.strerror}); name "
                         f"another one") from None


def images(model, shards: str, samples: int, batch_size: int):
    """Batches of at most ``samples`` images from ``shards``, prepared as the model's data
    config says (size, interpolation, mean and std; the central square, as evaluation)."""
    from timm.data import resolve_input_data_config

    from data_shards import EvalStream, GeometryConfig, ViewConfig, ViewsConfig
    # The model's current input size (timm's resolve_data_config would report the source
    # architecture's 224 px for a ViT built with another img_size).
    config = resolve_input_data_config(model)
    interpolation = config["interpolation"] if config["interpolation"] in (
        "bilinear", "bicubic", "nearest") else "bicubic"
    views = ViewsConfig(
        geometry=GeometryConfig(size=config["input_size"][-1], crop="center", hflip=0.0,
                                interpolation=interpolation),
        views={"image": ViewConfig(normalize=(tuple(config["mean"]), tuple(config["std"])))})
    left = samples
    for batch in EvalStream(shards, batch_size=batch_size, rank=0, world_size=1, views=views):
        chosen = batch["image"][batch["valid"]][:left]
        if len(chosen):
            yield chosen
            left -= len(chosen)
        if left <= 0:
            return


def plot(results: dict, png: Path) -> None:
    import os
    os.environ.setdefault("MPLCONFIGDIR", str(png.parent / ".matplotlib"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (distance_ax, similarity_ax) = plt.subplots(1, 2, figsize=(11, 4))
    count = len(results)
    for i, (label, result) in enumerate(results.items()):
        colour = f"C{i}"
        offset = (i - (count - 1) / 2) * 0.12
        for layer in result["layers"]:
            heads = layer["mean_distance_px"]
            distance_ax.scatter([layer["layer"] + offset] * len(heads), heads, color=colour,
                                s=18, alpha=0.8, label=label if layer["layer"] == 0 else None)
        similarity_ax.plot([l["layer"] for l in result["layers"]],
                           [l["head_similarity"] for l in result["layers"]], marker="o",
                           color=colour, label=label)
    uniform = {round(r["uniform_distance_px"], 3) for r in results.values()}
    if len(uniform) == 1:  # one grid: the distance of uniform attention is a useful yardstick
        distance_ax.axhline(uniform.pop(), color="grey", linestyle="--", linewidth=1,
                            label="uniform attention")
    layers = max(len(r["layers"]) for r in results.values())
    for ax in (distance_ax, similarity_ax):
        ax.set_xticks(range(layers))
    distance_ax.set_xlabel("layer")
    distance_ax.set_ylabel("average attention distance (pixels), one dot per head")
    distance_ax.set_title("attention distance: lower is more local")
    similarity_ax.set_xlabel("layer")
    similarity_ax.set_ylabel("mean cosine similarity between heads")
    similarity_ax.set_title("head similarity: lower is more diverse")
    for ax in (distance_ax, similarity_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run_attention(args) -> int:
    from data_shards import DataError

    from .attention import attention_statistics
    if args.label and len(args.label) != len(args.model):
        raise InputError(f"give one --label per --model ({len(args.model)} models, "
                         f"{len(args.label)} labels), or none")
    check_shards(args.shards)
    check_out(args.out)
    results = {}
    for i, source in enumerate(args.model):
        model, label = load_model(source, args.weights, args.kwargs)
        label = args.label[i] if args.label else label
        try:
            result = attention_statistics(model, images(model, args.shards, args.samples,
                                                        args.batch_size))
        except DataError as err:
            raise InputError(str(err)) from None
        except ValueError as err:
            raise InputError(f"{source}: {err}") from None
        results[label] = {"source": source, **result}
    try:
        (args.out / "attention.json").write_text(json.dumps(results, indent=2))
        plot(results, args.out / "attention.png")
    except OSError as err:
        raise InputError(f"cannot write into --out {args.out}: {err}") from None
    print(f"wrote {args.out / 'attention.json'} and {args.out / 'attention.png'}")
    for label, result in results.items():
        distances = " ".join(f"{sum(l['mean_distance_px']) / len(l['mean_distance_px']):.2f}"
                             for l in result["layers"])
        similarity = " ".join(f"{l['head_similarity']:.3f}" for l in result["layers"])
        print(f"{label}: mean distance per layer (px) {distances}; head similarity {similarity}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"attention": run_attention}[args.command](args)
    except InputError as err:
        print(f"diagnostics {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
