"""python -m data_shards {pack, verify, inspect} ... (see docs/data_shards.md)."""

import argparse
import os
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import DataError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'500000', '100MB', '1.5GB', '512MiB' -> bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower().removesuffix("b") if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size; use bytes or a unit such as 100MB, 1GB, 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


EXIT_CODES = "exit codes: 0 done; 1 verify found bad samples; 2 bad arguments or unreadable data (one-paragraph message)"


def _class_list(text: str) -> list[int]:
    """'5,6,7' -> [5, 6, 7]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of class indices; write e.g. 5,6,7,8,9") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_shards", description="Pack, verify and inspect webdataset shards.", epilog=EXIT_CODES)
    commands = parser.add_subparsers(dest="command", required=True)

    pack = commands.add_parser("pack", epilog=EXIT_CODES, help="write shards and index.json from an image folder, a manifest, text or sklearn:digits")
    pack.add_argument("source", help="image folder (ImageFolder layout or flat), manifest .jsonl/.csv, text .txt/.jsonl, or sklearn:digits")
    pack.add_argument("--out", required=True, help="output directory")
    pack.add_argument("--prefix", help="shard name prefix (default: from the source's name)")
    limit = pack.add_mutually_exclusive_group()
    limit.add_argument("--max-samples-per-shard", type=int, metavar="N", help="at most N samples per shard (instead of --max-shard-bytes)")
    limit.add_argument("--max-shard-bytes", type=parse_size, metavar="SIZE", help="e.g. 500MB (default 1GB)")
    pack.add_argument("--resize-max-side", type=int, metavar="PX", help="downscale images whose longer side exceeds PX (re-encoded as PNG)")
    pack.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="K", help="encoding processes")
    pack.add_argument("--holdout", type=float, metavar="FRACTION", help="also write a held-out split (by stable key) to OUT/holdout")
    pack.add_argument("--seed", type=int, default=0, help="seed of the holdout split and of the sample order")
    pack.add_argument("--classes", type=_class_list, metavar="I,J,...", help="pack only these classes (indices of the source's classes), relabelled 0, 1, ... in the order given")
    pack.add_argument("--max-per-class", type=int, metavar="N", help="keep at most N samples of each class in each split (a small labelled subset)")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in scripts and logs)")

    verify = commands.add_parser("verify", epilog=EXIT_CODES, help="decode every sample of every shard; exit 1 if any is bad")
    verify.add_argument("directory", help="a shard directory with index.json (or a directory holding several, e.g. train/ and holdout/), or a directory of teacher targets (targets.json)")
    verify.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs in the index")

    inspect = commands.add_parser("inspect", epilog=EXIT_CODES, help="print a few samples and optionally write a contact sheet")
    inspect.add_argument("directory", help="a shard directory with index.json")
    inspect.add_argument("--count", type=int, default=8, help="samples to print (default 8)")
    inspect.add_argument("--png", metavar="FILE", help="write a contact sheet of the images")
    inspect.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs in the index")
    return parser


def run_pack(args, console: Console) -> int:
    from .pack import pack

    paths = pack(
        args.source, args.out, prefix=args.prefix, max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=args.max_shard_bytes, resize_max_side=args.resize_max_side, workers=args.workers,
        holdout=args.holdout, seed=args.seed, progress=not args.no_progress,
        classes=args.classes, max_per_class=args.max_per_class,
    )  # fmt: skip
    from .index import ShardIndex

    for path in paths:
        index = ShardIndex.load(path)
        console.print(f"{index.split}: {index.total} samples in {len(index.shards)} shards, index {path}")
    return 0


def run_verify(args, console: Console) -> int:
    from .targets import TARGETS_INDEX
    from .verify import find_indexes, verify_index

    if (Path(args.directory) / TARGETS_INDEX).is_file() or list(Path(args.directory).glob("progress-r*.json")):
        return run_verify_targets(args, console)

    all_ok = True
    for index in find_indexes(args.directory):
        reports = verify_index(index, allow_pipe=args.allow_pipe)
        table = Table(title=f"{index.location} ({index.split})")
        for column in ("shard", "expected", "good", "bad", "status"):
            table.add_column(column)
        for report in reports:
            status = "ok" if report.ok else "BAD"
            table.add_row(os.path.basename(report.url), str(report.expected), str(report.good), str(len(report.bad)), status)
        console.print(table)
        for report in reports:
            for key, reason in report.bad:
                console.print(f"bad: shard {report.url} sample '{key or '-'}': {reason}", markup=False, highlight=False)
            if not report.bad and report.good != report.expected:
                console.print(f"bad: shard {report.url} holds {report.good} samples, the index says {report.expected}", markup=False)
        all_ok &= all(report.ok for report in reports)
    console.print("verify: all samples decode" if all_ok else "verify: FAILED (see above)")
    return 0 if all_ok else 1


def run_verify_targets(args, console: Console) -> int:
    from .targets import verify_targets

    report = verify_targets(args.directory, allow_pipe=args.allow_pipe)
    raw = report.index.raw
    console.print(f"teacher targets of {raw.teacher.arch} (sha256 {raw.teacher.sha256[:12]}...), {raw.epochs} epoch(s), "
                  f"{raw.data.world_size} rank(s), {raw.samples} records, {raw.bytes:,} bytes", markup=False, highlight=False)
    for store in raw.taps:
        console.print(f"  tap {store.describe()}", markup=False, highlight=False)
    table = Table(title=f"{report.index.directory}")
    for column in ("shard", "expected", "good", "bad", "status"):
        table.add_column(column)
    for shard in report.shards:
        table.add_row(os.path.basename(shard.url), str(shard.expected), str(shard.good), str(len(shard.bad)), "ok" if shard.ok else "BAD")
    console.print(table)
    for shard in report.shards:
        for key, reason in shard.bad:
            console.print(f"bad: shard {shard.url} record '{key or '-'}': {reason}", markup=False, highlight=False)
        if not shard.bad and shard.good != shard.expected:
            console.print(f"bad: shard {shard.url} holds {shard.good} records, the index says {shard.expected}", markup=False)
    for problem in report.problems:
        console.print(f"bad: {problem}", markup=False, highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print("verify: all records match the index" if report.ok else "verify: FAILED (see above)")
    return 0 if report.ok else 1


def run_inspect(args, console: Console) -> int:
    from .verify import contact_sheet, find_indexes, first_samples

    index = find_indexes(args.directory)[0]
    console.print(f"{index.location}: {index.modality}, {index.total} samples in {len(index.shards)} shards, classes: {index.classes}")
    samples = first_samples(index, args.count, allow_pipe=args.allow_pipe)
    for decoded, size in samples:
        label = "-" if decoded.label is None else str(decoded.label)
        if index.classes and decoded.label is not None and decoded.label < len(index.classes):
            label += f" ({index.classes[decoded.label]})"
        what = f"image {decoded.image.shape[2]}x{decoded.image.shape[1]}" if decoded.image is not None else f"text {decoded.text[:60]!r}"
        console.print(f"{decoded.key}  {size} bytes  label {label}  {what}", markup=False, highlight=False)
    if args.png:
        path = contact_sheet([decoded for decoded, _ in samples], index.classes, args.png)
        console.print(f"contact sheet: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)  # bad-sample lines stay whole for grep
    try:
        return {"pack": run_pack, "verify": run_verify, "inspect": run_inspect}[args.command](args, console)
    except DataError as exn:
        print(f"data_shards {args.command}: error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
