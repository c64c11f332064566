"""Teacher targets in data_shards: replayable views, the record writer and reader, verify.

A "teacher" here is a fixed linear map of the view's pixels (patches -> tokens -> qkv,
logits), so that everything a recording promises can be checked against the teacher run
live on the very view a student gets, flips and colour jitter included.
"""

import json

import pytest
import torch

from data_shards import GeometryConfig, ShardStream, ViewConfig, ViewsConfig
from data_shards.__main__ import main
from data_shards.errors import DataError
from data_shards.stream import TargetsReplay
from data_shards.targets import (TargetsHeader, TargetsIndex, TargetWriter, TapStore, TeacherRecord,
                                 decode_batch, encode_batch, finish_recording, sha256_of, store_problem)
from data_shards.views import ViewParams, apply_views, draw_view_params, make_views

VIEWS = ViewsConfig(
    geometry=GeometryConfig(size=16, scale=(0.4, 1.0), hflip=0.5),
    views={"teacher": ViewConfig(normalize="clip"), "student": ViewConfig(color_jitter=(0.4, 0.0, 0.3))},
)
TOKENS, WIDTH, CLASSES = 16, 12, 10
generator = torch.Generator().manual_seed(0)
PATCH_TO_TOKEN = torch.randn(48, WIDTH, generator=generator)
TOKEN_TO_QKV = torch.randn(WIDTH, 3 * WIDTH, generator=generator)
TOKEN_TO_LOGITS = torch.randn(WIDTH, CLASSES, generator=generator) * 3


def teacher(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, 3, 16, 16] -> the taps of a linear 'ViT': 16 tokens of 4x4 patches, where a
    flipped view moves every patch, so a record of the wrong flip cannot pass."""
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(len(images), TOKENS, 48)
    tokens = patches @ PATCH_TO_TOKEN
    return {"norm": tokens, "blocks.0.attn.qkv": tokens @ TOKEN_TO_QKV, "output": tokens.mean(1) @ TOKEN_TO_LOGITS,
            "hidden": tokens + 1.0}


STORES = [
    TapStore(tap="norm", store="tokens", dtype="fp16", shape=[TOKENS, WIDTH]),
    TapStore(tap="blocks.0.attn.qkv", store="tokens", dtype="fp16", shape=[TOKENS, 3 * WIDTH]),
    TapStore(tap="output", store="top_k", dtype="fp32", shape=[CLASSES], k=4),  # as a recording stores top-k
    TapStore(tap="hidden", store="token", dtype="fp16", shape=[TOKENS, WIDTH], token="first"),
]


def stream(shards, rank=0, **kwargs) -> ShardStream:
    options = dict(batch_size=8, rank=rank, world_size=2, num_workers=2, seed=5, views=VIEWS, samples_per_epoch=48)
    return ShardStream(shards, **{**options, **kwargs})


def header(data_stream: ShardStream, weights, epochs: int = 2) -> TargetsHeader:
    return TargetsHeader(
        teacher=TeacherRecord(arch="linear:test", weights=str(weights), sha256=sha256_of(weights),
                              weights_bytes=weights.stat().st_size),
        taps=STORES, views=VIEWS.model_dump(mode="json"), epochs=epochs, dtype="fp16", data=data_stream.order())


def record(directory, shards, weights, rank: int, epochs: int = 2, stop_after: int | None = None,
           checkpoint_every: int = 2) -> bool:
    """What a recording stage does on one rank (checkpoints every few batches); stops after
    ``stop_after`` batches as a killed run would: records written after its last checkpoint
    are left behind in an open shard. True when the rank finished."""
    data = stream(shards, rank, record_views=True)
    writer = TargetWriter(directory, rank, header(data, weights, epochs), records_per_shard=5)
    state = writer.resume()
    if state is not None:
        data.load_state_dict(state)
    total = epochs * data.batches_per_epoch
    done = data.epoch * data.batches_per_epoch + data.batch
    batches = iter(data)
    while done < total:
        if stop_after is not None and stop_after == 0:
            writer.abandon()  # killed: nothing after the last checkpoint is kept
            return False
        batch = next(batches)
        writer.write_batch(batch, encode_batch(teacher(batch["teacher"]), STORES))
        done += 1
        stop_after = None if stop_after is None else stop_after - 1
        if done % checkpoint_every == 0 or done == total:
            writer.checkpoint(data.state_dict(), finished=done == total)
    return True


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    from safetensors.torch import save_file
    save_file({"patch": PATCH_TO_TOKEN, "qkv": TOKEN_TO_QKV, "logits": TOKEN_TO_LOGITS}, str(path))
    return path


@pytest.fixture(scope="module")
def recording(tmp_path_factory, digits_shards, weights):
    directory = tmp_path_factory.mktemp("targets")
    for rank in range(2):
        assert record(directory, digits_shards / "train", weights, rank)
    finish_recording(directory, 2)
    return directory


def coordinate_image(height: int = 30, width: int = 40) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs * 5, ys * 7, (xs + ys) * 3]).to(torch.uint8)


# ---------------------------------------------------------------------------- views

@pytest.mark.parametrize("seed", range(8))
def test_views_replayed_from_recorded_parameters_are_the_drawn_views_bit_for_bit(seed):
    image = coordinate_image()
    drawn = draw_view_params(30, 40, VIEWS, seed)
    recorded = ViewParams.from_json(json.loads(json.dumps(drawn.to_json())))  # through a record's JSON
    assert recorded == drawn
    replayed, live = apply_views(image, VIEWS, recorded), make_views(image, VIEWS, seed)
    assert all(torch.equal(replayed[name], live[name]) for name in live)
    assert set(apply_views(image, VIEWS, recorded, ["student"])) == {"student"}


def test_a_recorded_flip_is_replayed_as_a_flip():
    image = coordinate_image()
    params = next(draw_view_params(30, 40, VIEWS, seed) for seed in range(100)
                  if draw_view_params(30, 40, VIEWS, seed).geometry.flip)
    flipped = apply_views(image, VIEWS, params)["teacher"]
    unflipped_params = ViewParams(params.geometry.__class__(**{**params.geometry.__dict__, "flip": False}), params.jitter, params.mask_seed)
    assert torch.equal(flipped, apply_views(image, VIEWS, unflipped_params)["teacher"].flip(-1))


# ---------------------------------------------------------------------------- stored forms

def test_fp16_records_hold_the_taps_within_fp16_precision_and_top_k_keeps_the_tail_mass():
    taps = teacher(torch.randn(6, 3, 16, 16))
    blobs = encode_batch(taps, STORES)
    from safetensors.torch import load
    decoded = decode_batch([load(blob) for blob in blobs], STORES)
    for tap in ("norm", "blocks.0.attn.qkv"):
        relative = (decoded[tap].float() - taps[tap]).abs().max() / taps[tap].abs().max()
        assert relative < 1e-3
    assert torch.allclose(decoded["hidden"].float(), taps["hidden"][:, 0], rtol=1e-3, atol=1e-3)
    live, replayed = torch.softmax(taps["output"], -1), torch.softmax(decoded["output"], -1)
    top = live.topk(4, dim=-1).indices
    assert torch.allclose(replayed.gather(-1, top), live.gather(-1, top), rtol=1e-5)
    tail = ~torch.zeros_like(live, dtype=torch.bool).scatter_(-1, top, True)
    assert torch.allclose((replayed * tail).sum(-1), (live * tail).sum(-1), rtol=1e-4, atol=1e-12)
    # the rest share the tail equally, each below the smallest top-k probability
    assert torch.allclose(replayed[tail].view(6, -1), replayed[tail].view(6, -1)[:, :1].expand(6, 6))
    assert (replayed[tail].view(6, -1)[:, 0] <= replayed.gather(-1, top).min(-1).values).all()


def test_int8_features_are_within_half_a_step_of_their_per_token_scale():
    tokens = torch.randn(3, TOKENS, WIDTH) * torch.logspace(-2, 2, TOKENS).view(1, -1, 1)  # very different token scales
    store = TapStore(tap="norm", store="tokens", dtype="int8", shape=[TOKENS, WIDTH])
    from safetensors.torch import load
    decoded = decode_batch([load(b) for b in encode_batch({"norm": tokens}, [store])], [store])["norm"]
    step = tokens.abs().amax(-1, keepdim=True) / 127
    assert ((decoded - tokens).abs() <= step / 2 + 1e-7).all()
    assert store_problem(store, "tokens", int8_ok=True) is None
    assert "int8" in store_problem(store, "tokens")


def test_fp16_overflow_is_refused_with_a_way_out():
    store = TapStore(tap="norm", store="tokens", dtype="fp16", shape=[2, 2])
    with pytest.raises(DataError, match="bf16 or fp32"):
        encode_batch({"norm": torch.full((1, 2, 2), 1e6)}, [store])


def test_which_records_serve_which_needs():
    tokens = TapStore(tap="t", store="tokens", dtype="bf16", shape=[4, 8])
    top = TapStore(tap="o", store="top_k", dtype="fp16", shape=[10], k=3)
    first = TapStore(tap="h", store="token", dtype="fp16", shape=[4, 8], token="first")
    assert store_problem(tokens, "token", "mean") is None and store_problem(tokens, "top_k") is None
    assert store_problem(top, "top_k") is None and "top-3" in store_problem(top, "tokens")
    assert store_problem(first, "token", "first") is None and "mean token" in store_problem(first, "token", "mean")


# ---------------------------------------------------------------------------- record and replay

def test_a_recording_verifies_and_its_index_says_what_it_holds(recording, weights, capsys):
    index = TargetsIndex.load(recording)
    raw = index.raw
    assert raw.epochs == 2 and raw.data.world_size == 2 and raw.teacher.sha256 == sha256_of(weights)
    assert raw.samples == 2 * 2 * 24  # 2 ranks x 2 epochs x 3 batches of 8
    assert raw.bytes == sum(p.stat().st_size for p in recording.glob("targets-r*.tar"))
    assert [s.tap for s in raw.taps] == [s.tap for s in STORES]
    assert not list(recording.glob("progress-r*.json"))
    assert main(["verify", str(recording)]) == 0
    assert "all records match the index" in capsys.readouterr().out


def test_students_get_the_recorded_view_and_the_teacher_taps_of_that_view(recording, digits_shards):
    """The trap of cached features: a record must belong to the very view the student gets
    (its flip and crop). The teacher run live on the replayed teacher view gives the record."""
    replay = TargetsReplay(TargetsIndex.load(recording), ["norm", "blocks.0.attn.qkv", "output", "hidden"])
    live = stream(digits_shards / "train", rank=1)
    replayed = stream(digits_shards / "train", rank=1, targets=replay)
    flips = 0
    for live_batch, batch, _ in zip(live, replayed, range(2 * live.batches_per_epoch)):
        assert batch["key"] == live_batch["key"]
        assert torch.equal(batch["teacher"], live_batch["teacher"]) and torch.equal(batch["student"], live_batch["student"])
        expected = teacher(batch["teacher"])
        for tap in ("norm", "blocks.0.attn.qkv"):
            assert (batch["targets"][tap].float() - expected[tap]).abs().max() <= 1e-3 * expected[tap].abs().max()
        assert torch.allclose(batch["targets"]["hidden"].float(), expected["hidden"][:, 0], rtol=1e-3, atol=2e-3)
        top = expected["output"].topk(4, dim=-1).indices
        assert torch.allclose(batch["targets"]["output"].gather(-1, top), expected["output"].gather(-1, top), rtol=1e-5, atol=1e-5)
        flips += sum(view["flip"] for view in batch["record"]["views"])
        # a record of the other flip would be far off: the trap is real for this teacher
        mirrored = teacher(batch["teacher"].flip(-1))["norm"]
        assert (batch["targets"]["norm"].float() - mirrored).abs().max() > 0.1 * mirrored.abs().max()
        assert batch["mask_seed"].dtype == torch.long and len(set(batch["mask_seed"].tolist())) == 8
    assert flips > 4


def test_epochs_past_the_recording_wrap_to_record_e_mod_E(recording, digits_shards):
    replay = TargetsReplay(TargetsIndex.load(recording), ["norm"], views=["student"])
    data = stream(digits_shards / "train", rank=0, targets=replay)
    per_epoch = data.batches_per_epoch
    batches = [b for b, _ in zip(data, range(3 * per_epoch))]
    assert set(batches[0]) >= {"student", "targets", "record"} and "teacher" not in batches[0]
    for first, third in zip(batches[:per_epoch], batches[2 * per_epoch:]):
        assert first["key"] == third["key"] and torch.equal(first["student"], third["student"])
        assert torch.equal(first["targets"]["norm"], third["targets"]["norm"])
    assert batches[0]["key"] != batches[per_epoch]["key"]


@pytest.mark.parametrize("num_workers_state", ["full", "minimal"])
def test_a_resumed_replay_yields_the_uninterrupted_batches_and_targets(recording, digits_shards, num_workers_state):
    replay = TargetsReplay(TargetsIndex.load(recording), ["norm", "output"], views=["student"])
    whole = [b for b, _ in zip(stream(digits_shards / "train", targets=replay), range(9))]
    first = stream(digits_shards / "train", targets=replay)
    for _, _ in zip(range(4), first):  # range first: zip would pull a fifth batch
        pass
    state = first.state_dict() if num_workers_state == "full" else {"epoch": first.epoch, "batch": first.batch}
    resumed = stream(digits_shards / "train", targets=replay)
    resumed.load_state_dict(state)
    for expected, batch in zip(whole[4:], resumed):
        assert batch["key"] == expected["key"]
        assert torch.equal(batch["targets"]["norm"], expected["targets"]["norm"])
        assert torch.equal(batch["targets"]["output"], expected["targets"]["output"])


def test_a_killed_recording_resumes_to_the_same_records(tmp_path, digits_shards, weights, recording):
    directory = tmp_path / "killed"
    assert not record(directory, digits_shards / "train", weights, 0, stop_after=3)  # dies after batch 3, saved at 2
    assert list(directory.glob("progress-r00000.json"))
    with pytest.raises(DataError, match="unfinished recording"):
        TargetsIndex.load(directory)
    assert not record(directory, digits_shards / "train", weights, 0, stop_after=2)  # from 2, saved at 4, in the second epoch
    assert record(directory, digits_shards / "train", weights, 0)
    assert record(directory, digits_shards / "train", weights, 1)
    finish_recording(directory, 2)
    assert main(["verify", str(directory)]) == 0

    def all_records(where):
        index = TargetsIndex.load(where)
        from data_shards.targets import read_records
        return [(r.key, r.position, r.view, {k: v.tolist() for k, v in r.tensors.items()})
                for rank in range(2) for epoch in range(2) for slot in range(2)
                for r in read_records(index.directory, index.shards_of(rank, epoch, slot))]
    assert all_records(directory) == all_records(recording)


def test_a_recording_started_with_other_settings_is_not_resumed(tmp_path, digits_shards, weights):
    directory = tmp_path / "other"
    assert not record(directory, digits_shards / "train", weights, 0, stop_after=3)
    with pytest.raises(DataError, match="other settings .*epochs"):
        record(directory, digits_shards / "train", weights, 0, epochs=3)


def test_a_student_streaming_other_data_order_or_views_is_refused(recording, digits_shards):
    replay = TargetsReplay(TargetsIndex.load(recording), ["norm"])
    with pytest.raises(DataError, match="data seed.*recorded with 5, this stream has 6"):
        stream(digits_shards / "train", targets=replay, seed=6)
    with pytest.raises(DataError, match="data.micro_batch_size"):
        stream(digits_shards / "train", targets=replay, batch_size=4)
    other_views = VIEWS.model_copy(update={"geometry": GeometryConfig(size=16, scale=(0.4, 1.0), hflip=0.0)})
    with pytest.raises(DataError, match="views differ"):
        stream(digits_shards / "train", targets=replay, views=other_views)
    with pytest.raises(DataError, match="not recorded"):
        stream(digits_shards / "train", targets=TargetsReplay(replay.index, ["blocks.5.attn.qkv"]))


def test_verify_finds_a_damaged_record_a_missing_shard_and_changed_weights(tmp_path, recording, weights, capsys):
    import shutil
    damaged = tmp_path / "damaged"
    shutil.copytree(recording, damaged)
    index = TargetsIndex.load(damaged)
    shards = [s.name for entry in index.raw.ranks for s in entry.shards]
    (damaged / shards[0]).unlink()
    # rewrite one record of another shard with a tensor of the wrong shape
    import tarfile, io
    from safetensors.torch import save
    path = damaged / shards[1]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[1] = (members[1][0], save({"norm": torch.zeros(3, 3, dtype=torch.float16)}))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "holds tensors ['norm']" in out and "FAILED" in out

    moved = tmp_path / "weights_changed"
    shutil.copytree(recording, moved)
    raw = json.loads((moved / "targets.json").read_text())
    changed = tmp_path / "teacher2.safetensors"
    changed.write_bytes(weights.read_bytes() + b" ")
    raw["teacher"]["weights"] = str(changed)
    (moved / "targets.json").write_text(json.dumps(raw))
    assert main(["verify", str(moved)]) == 1
    assert "changed since the recording" in capsys.readouterr().out


def test_verify_of_an_unfinished_recording_says_so(tmp_path, digits_shards, weights, capsys):
    directory = tmp_path / "unfinished"
    record(directory, digits_shards / "train", weights, 0, stop_after=3)
    assert main(["verify", str(directory)]) == 2
    assert "unfinished recording" in capsys.readouterr().err
