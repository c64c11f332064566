"""pack: sources, determinism, holdout, index, and the CLI's error handling; round trip on generated images."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_shards import (DataError, EvalStream, GeometryConfig, ShardIndex, ViewConfig, ViewsConfig,
                         pack)
from data_shards.__main__ import main
from data_shards.keys import make_key
from data_shards.safety import check_member_name, read_shard

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 4 solid-colour images of different sizes, PNG and JPEG, one name with a dot and a space."""
    root = tmp_path / "images"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            image = Image.new("RGB", (20 + 7 * i, 16 + 5 * i), colour)
            image.save(root / name / (f"img {i}.v1.png" if i % 2 else f"img{i}.jpg"))
    return root


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.tar"))}


def test_image_folder_round_trip_keeps_labels_and_pixels(image_folder, tmp_path):
    out = tmp_path / "shards"
    pack(str(image_folder), out, max_samples_per_shard=5, workers=1, progress=False)
    index = ShardIndex.load(out)
    assert index.classes == ["blue", "green", "red"]
    assert [count for _, count in index.shards] == [5, 5, 2] and index.total == 12
    assert main(["verify", str(out)]) == 0

    views = ViewsConfig(geometry=GeometryConfig(size=8, crop="resize", hflip=0), views={"image": ViewConfig(normalize="none")})
    seen = {}
    for batch in EvalStream(out, batch_size=5, rank=0, world_size=1, views=views):
        for key, label, image, valid in zip(batch["key"], batch["label"], batch["image"], batch["valid"]):
            if valid:
                seen[key] = (index.classes[label], image)
    assert len(seen) == 12
    for key, (class_name, image) in seen.items():
        assert key.startswith(class_name + "_")  # keys come from the relative path
        expected = np.array(COLOURS[class_name]) / 255
        assert np.allclose(image.mean(dim=(1, 2)).numpy(), expected, atol=0.03)  # JPEG is lossy


def test_keys_are_stable_and_webdataset_safe(image_folder, tmp_path):
    pack(str(image_folder), tmp_path / "a", workers=1, progress=False)
    keys = [sample["__key__"] for url in ShardIndex.load(tmp_path / "a").urls for sample in read_shard(url)]
    assert "red_img_1_v1_png" in keys and "red_img0_jpg" in keys
    assert all("." not in key and "/" not in key for key in keys)
    meta = [json.loads(sample["json"]) for url in ShardIndex.load(tmp_path / "a").urls for sample in read_shard(url)]
    assert all(Path(m["source"]).is_file() and len(m["size"]) == 2 for m in meta)


def test_pack_is_reproducible_across_runs_and_worker_counts(image_folder, tmp_path):
    out = tmp_path / "out"
    pack(str(image_folder), out, max_samples_per_shard=3, workers=2, progress=False)
    first = _shard_bytes(out)
    first_index = (out / "index.json").read_text()
    # Second run into the same directory, different shard size first, then the original command again:
    pack(str(image_folder), out, max_samples_per_shard=5, workers=1, progress=False)
    assert len(_shard_bytes(out)) == 3  # the 4 old shards were replaced, not left beside the new ones
    pack(str(image_folder), out, max_samples_per_shard=3, workers=1, progress=False)
    assert _shard_bytes(out) == first and len(first) == 4
    assert json.loads((out / "index.json").read_text())["shards"] == json.loads(first_index)["shards"]


def test_holdout_split_is_disjoint_and_by_key(tmp_path):
    lines = tmp_path / "docs.txt"
    lines.write_text("".join(f"document number {i}\n" + ("\n" if i % 10 == 0 else "") for i in range(200)))
    pack(str(lines), tmp_path / "s1", holdout=0.25, seed=3, workers=1, progress=False)
    pack(str(lines), tmp_path / "s2", holdout=0.25, seed=3, workers=2, max_samples_per_shard=7, progress=False)

    def keys(directory):
        return {s["__key__"] for url in ShardIndex.load(directory).urls for s in read_shard(url)}

    train, held = keys(tmp_path / "s1" / "train"), keys(tmp_path / "s1" / "holdout")
    assert not train & held and len(train | held) == 200
    assert 20 < len(held) < 80
    assert keys(tmp_path / "s2" / "holdout") == held  # same key -> same side, whatever the shard size
    assert ShardIndex.load(tmp_path / "s1" / "holdout").split == "holdout"
    assert ShardIndex.load(tmp_path / "s1" / "train").modality == "text"


def test_class_split_and_labelled_subset(tmp_path):
    """--classes packs a class split relabelled 0..k-1 (source / target tasks from one data
    set); --max-per-class keeps a subset of what the same split holds without it."""
    from sklearn.datasets import load_digits

    def samples(directory):
        index = ShardIndex.load(directory)
        return index, {s["__key__"]: int(s["cls"]) for url in index.urls for s in read_shard(url)}

    pack("sklearn:digits", tmp_path / "target", classes=[5, 7], holdout=0.2, workers=1, progress=False)
    pack("sklearn:digits", tmp_path / "few", classes=[5, 7], holdout=0.2, max_per_class=3, workers=1, progress=False)
    targets = load_digits().target
    index, train = samples(tmp_path / "target" / "train")
    _, held = samples(tmp_path / "target" / "holdout")
    assert index.classes == ["5", "7"] and set(train.values()) == {0, 1}
    assert len(train) + len(held) == int(((targets == 5) | (targets == 7)).sum())
    assert all(targets[int(key.split("_")[1])] == [5, 7][label] for key, label in train.items())
    _, few = samples(tmp_path / "few" / "train")
    assert sorted(few.values()) == [0, 0, 0, 1, 1, 1] and set(few) <= set(train)
    assert main(["pack", "sklearn:digits", "--out", str(tmp_path / "bad"), "--classes", "5,12", "--no-progress"]) == 2


def test_text_jsonl_with_class_names(tmp_path):
    source = tmp_path / "reviews.jsonl"
    records = [{"text": f"review {i} é", "label": ["neg", "pos"][i % 2]} for i in range(9)]
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pack(str(source), tmp_path / "out", workers=1, progress=False)
    index = ShardIndex.load(tmp_path / "out")
    assert index.classes == ["neg", "pos"] and index.labelled
    batches = list(EvalStream(tmp_path / "out", batch_size=4, rank=0, world_size=1))
    texts = {t: index.classes[l] for b in batches for t, l, v in zip(b["text"], b["label"], b["valid"]) if v}
    assert texts == {r["text"]: r["label"] for r in records}


def test_manifest_csv_and_flat_folder(image_folder, tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nimages/red/img0.jpg,7\nimages/blue/img 1.v1.png,2\n")
    pack(str(manifest), tmp_path / "m", workers=1, progress=False)
    index = ShardIndex.load(tmp_path / "m")
    assert index.classes is None and index.labelled and index.total == 2
    labels = {s["__key__"]: int(s["cls"]) for s in read_shard(index.urls[0])}
    assert labels == {"images_red_img0_jpg": 7, "images_blue_img_1_v1_png": 2}

    pack(str(image_folder / "green"), tmp_path / "flat", workers=1, progress=False)
    flat = ShardIndex.load(tmp_path / "flat")
    assert flat.total == 4 and not flat.labelled and flat.classes is None


def test_resize_max_side(image_folder, tmp_path):
    pack(str(image_folder), tmp_path / "r", resize_max_side=10, workers=1, progress=False)
    for sample in read_shard(ShardIndex.load(tmp_path / "r").urls[0]):
        assert "png" in sample and max(json.loads(sample["json"])["size"]) == 10


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,label\nimages/none.png,1\n", "line 2 names images/none.png"),
        ("name\nx.png\n", "'path' column"),
        ("path,label\nimages/red/img0.jpg,1\nimages/red/img2.jpg,\n", "line 3 has no label"),
    ],
)
def test_bad_manifests_name_the_line(image_folder, tmp_path, content, message):
    manifest = tmp_path / "bad.csv"
    manifest.write_text(content)
    with pytest.raises(DataError, match=message):
        pack(str(manifest), tmp_path / "o", workers=1, progress=False)


def test_broken_image_is_named_at_pack_time(image_folder, tmp_path):
    (image_folder / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png"):
        pack(str(image_folder), tmp_path / "o", workers=2, progress=False)


def test_malformed_index_is_a_clear_error(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "prefix": "x"}))
    with pytest.raises(DataError, match=r"index\.json is malformed: field 'modality'"):
        ShardIndex.load(tmp_path)
    with pytest.raises(DataError, match="No shard index"):
        ShardIndex.load(tmp_path / "nowhere")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    # main() is what `python -m data_shards` exits with; run in-process to skip a 10 s interpreter start.
    assert main(["pack", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data_shards pack: error: Source" in err and "missing does not exist" in err
    assert "Traceback" not in err
    bad_manifest = tmp_path / "m.jsonl"
    bad_manifest.write_text('{"path": "a.png"}\nnot json\n')
    assert main(["pack", str(bad_manifest), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "m.jsonl: line 2 is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pack", "x", "--out", "o", "--max-shard-bytes", "lots"])
    assert "not a size" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_any_source_name_becomes_a_safe_key(name):
    key = make_key(name)
    assert key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    assert make_key(name) == key


@pytest.mark.parametrize("member, refused", [("a/b.png", False), ("key.cls", False), ("../x.cls", True), ("a/../../x", True), ("/etc/passwd", True), ("a\\..\\x", True)])
def test_member_names(member, refused):
    if refused:
        with pytest.raises(Exception, match=re.escape(member)):
            check_member_name(member)
    else:
        assert check_member_name(member) == member
