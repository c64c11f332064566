"""pack never destroys what it replaces, text sources that do not decode are one paragraph
naming the file and line, and a huge text line costs a stream what a short one does.
Text packing and the stream run as real processes (``python -m data_shards pack``, a
stream script) with their exit code and peak memory measured (``helpers.run_measured``)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_shards import ShardIndex, TextConfig, load_tokenizer, pack, tokenize
from data_shards.__main__ import main
from helpers import run_measured, tiny_text_jsonl, tiny_tokenizer

MiB = 1024 ** 2
# What a bad line may add to the peak memory of a pack (or a stream) over the same command
# on good input of the same size.
HEADROOM = 200 * MiB


def files_on_disk(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones included), by relative path: its SHA-256."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------- 3. re-pack

@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    for label, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12 + i, 10), colour).save(root / f"c{label}" / f"img{i}.png")
    return root


@pytest.mark.parametrize("split", [[], ["--holdout", "0.3"]])
def test_a_failed_repack_leaves_the_shards_a_job_reads_as_they_were(images, tmp_path, capsys, split):
    out = tmp_path / "shards"
    command = ["pack", str(images), "--out", str(out), "--prefix", "imgs",
               "--max-samples-per-shard", "2", "--no-progress", *split]
    assert main(command) == 0
    (out / "notes.txt").write_text("kept by hand")
    before = files_on_disk(out)
    assert len([name for name in before if name.endswith(".tar")]) >= 6
    (images / "c1" / "zz_broken.png").write_bytes(b"\x89PNG this is not an image")
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "data_shards pack: error: Cannot decode image" in err and "zz_broken.png" in err, err
    # Before: PREFIX-*.tar and index.json were deleted first, then a shard was left half
    # written and no index at all.
    assert files_on_disk(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging left
    # Fixed (and with fewer images: fewer shards), the same command replaces the shards
    # and the index, leaving no old shard beside them and other files alone.
    (images / "c1" / "zz_broken.png").unlink()
    for path in images.glob("c1/img[2-5].png"):
        path.unlink()
    assert main(command) == 0
    after = files_on_disk(out)
    assert after["notes.txt"] == before["notes.txt"]
    for folder in [out / "train", out / "holdout"] if split else [out]:
        index = ShardIndex.load(folder)
        assert sorted(Path(url).name for url, _ in index.shards) == sorted(
            p.name for p in folder.glob("imgs-*.tar"))
    assert sum(ShardIndex.load(f).total for f in ([out / "train", out / "holdout"] if split else [out])) == 8


def test_a_pack_killed_before_it_finished_leaves_the_next_pack_clean(images, tmp_path):
    out = tmp_path / "shards"
    pack(str(images), out, prefix="imgs", workers=1, progress=False)
    # What a SIGKILLed pack leaves: its staging folder, named by host and a pid that is gone.
    import socket
    import subprocess
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname())
    left = out / f".imgs.packing-{host}-{gone}-abc123"
    (left / "all").mkdir(parents=True)
    (left / "all" / "imgs-000000.tar").write_bytes(b"half a shard")
    pack(str(images), out, prefix="imgs", workers=1, progress=False)
    assert not left.exists()
    assert sorted(p.name for p in out.iterdir()) == ["imgs-000000.tar", "index.json"]


# ---------------------------------------------------------------------------- 4. text that does not decode

def _good_lines(count: int) -> list[bytes]:
    return [json.dumps({"text": f"the film was good {i}", "label": i % 3}).encode() for i in range(count)]


BAD_TEXT = {
    # name: (file name, content, what the message says)
    "latin1_in_jsonl": ("docs.jsonl", lambda: b"\n".join(_good_lines(5000)[:2999] + [
        '{"text": "caf\u00e9 au lait", "label": 1}'.encode("latin-1")] + _good_lines(5000)[3000:]),
        "docs.jsonl: line 3000 is not UTF-8: byte 14 of the line (0xe9)"),
    "bad_byte_first_txt_line": ("docs.txt", lambda: b"\xff the first line\n" + b"a line\n" * 5000,
                                "docs.txt: line 1 is not UTF-8: byte 1 of the line (0xff)"),
    "lone_surrogate": ("docs.jsonl", lambda: b"\n".join(_good_lines(5000)[:41] + [
        b'{"text": "half a pair \\ud83d here", "label": 0}'] + _good_lines(5000)[42:]),
        "docs.jsonl: line 42: the 'text' string holds an unpaired surrogate (\\ud83d, character 13)"),
    "superscript_label": ("docs.jsonl", lambda: b"\n".join(_good_lines(5000)[:6] + [
        json.dumps({"text": "squared", "label": "\u00b2"}).encode()] + _good_lines(5000)[7:]),
        "docs.jsonl: line 7 has label '\u00b2', which reads as digits but not the digits 0-9"),
}


@pytest.fixture(scope="module")
def good_pack_rss(tmp_path_factory) -> int:
    """Peak memory of packing 5,000 good lines, the size of each bad file below."""
    root = tmp_path_factory.mktemp("good")
    (root / "docs.jsonl").write_bytes(b"\n".join(_good_lines(5000)))
    code, _, err, rss = run_measured([sys.executable, "-m", "data_shards", "pack",
                                      str(root / "docs.jsonl"), "--out", str(root / "out"),
                                      "--workers", "2", "--no-progress"])
    assert code == 0, err
    return rss


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_text_that_does_not_decode_is_one_paragraph_naming_file_and_line(
        tmp_path, good_pack_rss, case):
    name, content, says = BAD_TEXT[case]
    source = tmp_path / name
    source.write_bytes(content())
    code, out, err, rss = run_measured([sys.executable, "-m", "data_shards", "pack", str(source),
                                        "--out", str(tmp_path / "out"), "--workers", "2",
                                        "--no-progress"])
    # Before: UnicodeDecodeError, UnboundLocalError, UnicodeEncodeError (from a worker) and
    # ValueError tracebacks.
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"data_shards pack: error: {tmp_path}/{says}"), err
    print(f"\n{case}: exit {code}, peak {rss / MiB:.0f} MiB (good input: {good_pack_rss / MiB:.0f} MiB)")
    assert rss < good_pack_rss + HEADROOM, (rss / MiB, good_pack_rss / MiB)


# ---------------------------------------------------------------------------- 13. huge lines

STREAM = """
import json, sys
from data_shards import ShardStream, TextConfig
stream = ShardStream(sys.argv[1], batch_size=4, rank=0, world_size=1, num_workers=0,
                     text=TextConfig(tokenizer=sys.argv[2], max_length=16), shuffle_buffer=1)
batches = iter(stream)
ids = {}
for _ in range(6):  # 24 draws: the huge line is drawn more than once
    batch = next(batches)
    for key, row, mask in zip(batch["key"], batch["tokens"]["input_ids"], batch["tokens"]["attention_mask"]):
        ids[key] = row[mask.bool()].tolist()
print(json.dumps(ids))
"""


def test_one_huge_line_costs_a_stream_what_a_short_one_does(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    tiny_text_jsonl(tmp_path / "short.jsonl", 8, seed=0, labelled=False)
    lines = (tmp_path / "short.jsonl").read_text().splitlines()
    huge = "the film was good and " * 500_000  # 11 MB on one line
    (tmp_path / "huge.jsonl").write_text("\n".join(lines[:7] + [json.dumps({"text": huge})]) + "\n")
    pack(str(tmp_path / "short.jsonl"), tmp_path / "short", workers=1, progress=False)
    pack(str(tmp_path / "huge.jsonl"), tmp_path / "huge", workers=1, progress=False)
    script = tmp_path / "stream.py"
    script.write_text(STREAM)
    runs = {}
    for name in ("short", "huge"):
        code, out, err, rss = run_measured([sys.executable, str(script), str(tmp_path / name),
                                            str(tokenizer)], timeout=600)
        assert code == 0, err[-3000:]
        runs[name] = (json.loads(out.strip().splitlines()[-1]), rss)
    print(f"\nstream peak: {runs['huge'][1] / MiB:.0f} MiB with an 11 MB line, "
          f"{runs['short'][1] / MiB:.0f} MiB without")
    # Before: the whole line was tokenised on every draw (gigabytes, and a minute per draw).
    assert runs["huge"][1] < runs["short"][1] + HEADROOM, (runs["huge"][1] / MiB, runs["short"][1] / MiB)
    ids = runs["huge"][0]
    (key,) = [k for k in ids if k.endswith("00000008")]
    vocab = load_tokenizer(tokenizer).get_vocab()
    assert ids[key] == [vocab["[CLS]"]] + [vocab[w] for w in ("the film was good and " * 3).split()][:14] \
        + [vocab["[SEP]"]]


@pytest.mark.parametrize("text", [
    "word " * 3000,
    "the  film\t\twas   " * 1000 + "good",
    "a" * 5000 + " the film",                    # one unknown 'word' longer than the window
    " " * 4000 + "the film was good",            # leading whitespace longer than the window
    "the film " * 10 + "x" * 200 + " " + "good " * 2000,
])
def test_tokens_of_a_long_text_are_those_of_the_whole_text(tmp_path_factory, text):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")
    config = TextConfig(tokenizer=tokenizer, max_length=16)
    whole = load_tokenizer(tokenizer)([text], truncation=True, max_length=16)["input_ids"][0]
    assert tokenize([text], config)["tokens"]["input_ids"][0].tolist() == whole
