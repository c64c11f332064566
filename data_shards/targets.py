"""Teacher targets: what a frozen teacher computed for every sample and epoch of a stream,
recorded once, so that any number of students can be distilled from the records without the
teacher.

A targets directory holds

    targets.json                             the index, written once the recording is complete
    progress-r00000.json                     one rank's progress while it records (resume)
    targets-r00000-e0000-s000-000000.tar     rank 0, data epoch 0, loader slot 0, part 0, ...

Shards are per (rank, epoch, slot): one slot's records in the order its stream yields its
samples. A student's loader worker that serves that slot of that epoch reads them front to
back beside the data shards it decodes, so joining a sample with its record is a sequential
read, never a lookup. A record is two tar members:

    {position:010d}_{key}.json               key, epoch, rank, slot, position and the view
                                              parameters (crop box, flip, colour jitter, mask seed)
    {position:010d}_{key}.taps.safetensors   the stored tensors of every recorded tap

How a tap is stored (``TapStore.store``):

- ``tokens``: the whole tensor ([N, C] tokens, [H, W, C] grids, [C] logits), in fp16, bf16 or
  fp32; or, where the objective allows it (feature distillation), int8 with one fp32 scale per
  token (``max |x| / 127`` over its channels; the value is ``q * scale``).
- ``top_k``: the ``k`` largest logits (fp32: they are few, and a logit's rounding error is
  its probability's relative error; indices int16/int32) and one fp32 ``fill`` per sample. Read back, every other class gets the logit ``fill =
  logsumexp(other logits) - log(C - k)``: the classes outside the top k share the teacher's
  remaining probability mass equally, so the top-k probabilities and the total mass outside
  them are the teacher's exactly (at temperature 1).
- ``token``: one token of a [N, D] sequence, the first (CLS) or the mean of all, as [D].
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import DataError
from .safety import ShardError, read_shard
from .views import ViewParams

TARGETS_INDEX = "targets.json"
TARGETS_FORMAT = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
BYTES_PER = {"fp16": 2, "bf16": 2, "fp32": 4, "int8": 1}
Store = Literal["tokens", "top_k", "token"]
DEFAULT_RECORDS_PER_SHARD = 10_000
_SHARD_NAME = re.compile(r"^targets-r(\d{5})-e(\d{4})-s(\d{3})-(\d{6})\.tar$")


class TapStore(BaseModel):
    """How one teacher tap is recorded; ``shape`` is the tap's per-sample shape as traced
    (``None`` for a dimension that varies from batch to batch, a text batch's length)."""

    model_config = ConfigDict(extra="forbid")
    tap: str
    store: Store
    dtype: Literal["fp16", "bf16", "fp32", "int8"]
    shape: list[int | None]
    k: int | None = Field(None, ge=1)
    token: Literal["first", "mean"] | None = None

    def stored_bytes(self) -> int:
        """Bytes of one sample's tensors (variable dimensions counted at their traced size,
        which the caller passes as a number)."""
        dims = [d or 1 for d in self.shape]
        if self.store == "top_k":
            return self.k * (BYTES_PER[self.dtype] + (2 if dims[-1] <= 32767 else 4)) + 4
        if self.store == "token":
            return dims[-1] * BYTES_PER[self.dtype]
        scale = math.prod(dims[:-1]) * 4 if self.dtype == "int8" else 0
        return math.prod(dims) * BYTES_PER[self.dtype] + scale

    def describe(self) -> str:
        if self.store == "top_k":
            return f"{self.tap}: top-{self.k} of {self.shape[-1]} logits, {self.dtype}"
        if self.store == "token":
            return f"{self.tap}: {self.token} token [{self.shape[-1]}], {self.dtype}"
        scale = " + a per-token fp32 scale" if self.dtype == "int8" else ""
        return f"{self.tap}: all of {self.shape}, {self.dtype}{scale}"


def record_bytes(stores: Sequence[TapStore], views: int = 1) -> int:
    """What one record takes in a shard, estimated: its two tar members (a 512-byte header
    each, data padded to 512 bytes), the JSON (key, where, view parameters) and the
    safetensors blob (a header of about 80 bytes per tensor, then the tensors)."""
    tensors = sum(store.stored_bytes() + 80 * (3 if store.store == "top_k" else 1 + (store.dtype == "int8"))
                  for store in stores)
    meta = 160 + 90 * views

    def member(size: int) -> int:
        return 512 + math.ceil(size / 512) * 512

    return member(meta) + member(tensors + 8)


def store_problem(recorded: TapStore, store: Store, token: str | None = None,
                  int8_ok: bool = False) -> str | None:
    """Why a tap recorded as ``recorded`` cannot serve an objective that needs ``store``
    (and ``token``), or None. Whole tokens serve every need; a top-k record serves only
    soft labels, a single token only the same token choice; int8 only where allowed."""
    what = recorded.describe()
    if recorded.dtype == "int8" and not int8_ok:
        return (f"tap {recorded.tap!r} was recorded in int8 ({what}), which only feature "
                f"distillation reads (its whitening absorbs the per-token scale); record it "
                f"in fp16, bf16 or fp32")
    if recorded.store == "tokens" or recorded.store == store == "top_k":
        return None
    if recorded.store == store == "token" and recorded.token == token:
        return None
    need = {"tokens": "all of its tokens", "top_k": "its logits",
            "token": f"its {token} token"}[store]
    return f"the objective needs {need} of tap {recorded.tap!r}, but the recording holds {what}"


def plan_stores(needs: Sequence[tuple[str, Store, str | None, bool]], shapes: dict[str, list[int | None]],
                dtype: str, top_k: int | None = None, int8_features: bool = False) -> list[TapStore]:
    """One store per tap from what the objectives need of it (``(tap, store, token,
    int8_ok)`` each): the smallest form that serves them all. Top-k logits when every reader
    wants logits and ``top_k`` is set (fewer than the classes; else all logits); one token
    when every reader wants the same token; else all tokens, int8 when ``int8_features``
    and every reader takes int8. ``shapes``: per-sample shape of each tap."""
    stores = []
    for tap in dict.fromkeys(need[0] for need in needs):
        mine = [need for need in needs if need[0] == tap]
        kinds = {need[1] for need in mine}
        tokens = {need[2] for need in mine}
        shape = list(shapes[tap])
        if kinds == {"top_k"} and top_k is not None and top_k < (shape[-1] or 0):
            stores.append(TapStore(tap=tap, store="top_k", dtype="fp32", shape=shape, k=top_k))
        elif kinds == {"token"} and len(tokens) == 1:
            stores.append(TapStore(tap=tap, store="token", dtype=dtype, shape=shape, token=tokens.pop()))
        else:
            int8 = int8_features and all(need[3] for need in mine)
            stores.append(TapStore(tap=tap, store="tokens", dtype="int8" if int8 else dtype, shape=shape))
    return stores


# ---------------------------------------------------------------------------- encoding

def encode_batch(taps: dict[str, torch.Tensor], stores: Sequence[TapStore]) -> list[bytes]:
    """The teacher's taps of one batch ([B, ...] each) -> one safetensors blob per sample.
    The conversion (cast, quantisation, top-k, token choice) runs batched on the taps'
    device; only what is stored is copied to the host."""
    from safetensors.torch import save

    columns: dict[str, torch.Tensor] = {}
    for store in stores:
        x = taps[store.tap].detach()
        if store.store == "tokens" and store.dtype == "int8":
            xf = x.float()
            scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
            columns[store.tap] = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
            columns[f"{store.tap}/scale"] = scale.squeeze(-1)
        elif store.store == "tokens":
            columns[store.tap] = _cast(x, store)
        elif store.store == "top_k":
            xf = x.float()
            classes = xf.shape[-1]
            if store.k > classes:
                raise DataError(f"top_k {store.k} for tap {store.tap!r} exceeds its {classes} classes; record at most {classes}.")
            values, indices = xf.topk(store.k, dim=-1)
            if store.k < classes:
                fill = xf.scatter(-1, indices, -math.inf).logsumexp(dim=-1, keepdim=True) - math.log(classes - store.k)
            else:
                fill = xf.new_zeros(*xf.shape[:-1], 1)
            columns[f"{store.tap}/values"] = _cast(values, store)
            columns[f"{store.tap}/indices"] = indices.to(torch.int16 if classes <= 32767 else torch.int32)
            columns[f"{store.tap}/fill"] = fill
        else:
            selected = x[:, 0] if store.token == "first" else x.float().mean(dim=1)
            columns[store.tap] = _cast(selected, store)
    host = {name: column.cpu().contiguous() for name, column in columns.items()}
    batch = len(next(iter(host.values())))
    return [save({name: column[i] for name, column in host.items()}) for i in range(batch)]


def _cast(x: torch.Tensor, store: TapStore) -> torch.Tensor:
    out = x.to(DTYPES[store.dtype])
    if store.dtype == "fp16" and not torch.isfinite(out).all() and torch.isfinite(x).all():
        peak = float(x.float().abs().max())
        raise DataError(f"tap {store.tap!r} holds values up to {peak:.4g}, beyond fp16's range (65504); record it in bf16 or fp32.")
    return out


def decode_batch(records: Sequence[dict[str, torch.Tensor]], stores: Sequence[TapStore]) -> dict[str, torch.Tensor]:
    """Per-sample stored tensors -> one [B, ...] tensor per tap, as the objective reads the
    live teacher's tap: whole tokens (int8 dequantised to fp32), logits with the top-k
    fill, or the chosen token [B, D]."""
    out = {}
    for store in stores:
        tap = store.tap
        if store.store == "top_k":
            values = torch.stack([r[f"{tap}/values"] for r in records]).float()
            indices = torch.stack([r[f"{tap}/indices"] for r in records]).long()
            fill = torch.stack([r[f"{tap}/fill"] for r in records]).float()
            classes = store.shape[-1]
            out[tap] = fill.expand(*fill.shape[:-1], classes).clone().scatter_(-1, indices, values)
        elif store.dtype == "int8":
            quantised = torch.stack([r[tap] for r in records]).float()
            out[tap] = quantised * torch.stack([r[f"{tap}/scale"] for r in records]).unsqueeze(-1)
        else:
            out[tap] = torch.stack([r[tap] for r in records])
    return out


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- the index

class TargetShard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    epoch: int
    slot: int
    samples: int
    bytes: int
    first_position: int
    last_position: int


class RankShards(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int
    shards: list[TargetShard]


class StreamOrder(BaseModel):
    """What fixes a stream's sample order: a student must stream the same to meet its records."""

    model_config = ConfigDict(extra="forbid")
    train: str
    data_index_sha256: str | None
    seed: int
    world_size: int
    num_workers: int
    micro_batch_size: int
    samples_per_epoch: int
    batches_per_epoch: int
    shuffle_buffer: int


class TeacherRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str
    kwargs: dict = Field(default_factory=dict)
    weights: str
    sha256: str
    weights_bytes: int


class TargetsHeader(BaseModel):
    """Everything a recording was made from; a resumed recording must have the same."""

    model_config = ConfigDict(extra="forbid")
    teacher: TeacherRecord
    taps: list[TapStore]
    views: dict
    epochs: int = Field(ge=1)
    dtype: Literal["fp16", "bf16", "fp32"]
    int8_features: bool = False
    data: StreamOrder


class TargetsIndexFile(TargetsHeader):
    format: Literal[1] = TARGETS_FORMAT
    kind: Literal["teacher_targets"] = "teacher_targets"
    samples: int
    bytes: int
    ranks: list[RankShards]


@dataclass
class TargetsIndex:
    """A complete recording: ``raw`` is the validated index, ``directory`` where it lives."""

    directory: Path
    raw: TargetsIndexFile

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TargetsIndex":
        directory = Path(directory)
        path = directory / TARGETS_INDEX if directory.is_dir() or not directory.name.endswith(".json") else directory
        if not path.is_file():
            partial = sorted(path.parent.glob("progress-r*.json")) if path.parent.is_dir() else []
            state = (f"; it holds the progress of an unfinished recording ({len(partial)} rank(s)): run "
                     f"the recording stage again to finish it") if partial else ""
            raise DataError(f"No teacher targets at {path.parent}: expected {TARGETS_INDEX}, which a "
                            f"recording stage writes when it is complete{state}.")
        try:
            raw = TargetsIndexFile.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise DataError(f"Cannot read the targets index {path}: {exn}.") from None
        except ValidationError as exn:
            first = exn.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise DataError(f"The targets index {path} is malformed: field '{where}': {first['msg']}; "
                            f"record the targets again.") from None
        return cls(path.parent, raw)

    def tap(self, name: str) -> TapStore | None:
        return next((store for store in self.raw.taps if store.tap == name), None)

    def shards_of(self, rank: int, epoch: int, slot: int) -> list[TargetShard]:
        for entry in self.raw.ranks:
            if entry.rank == rank:
                return sorted((s for s in entry.shards if s.epoch == epoch and s.slot == slot), key=lambda s: s.first_position)
        return []


def order_problems(recorded: StreamOrder, order: StreamOrder) -> list[str]:
    """How a stream would differ from the recorded one (its samples would then not meet their
    records), one phrase each. The data index's sha256 identifies the data where both have
    one; the shards' location may differ (a copy elsewhere)."""
    names = {"train": "the training shards", "data_index_sha256": "the data index's sha256 (the shards were re-packed or changed)",
             "seed": "the data seed (job seed + data.seed)", "world_size": "the number of ranks",
             "num_workers": "data.num_workers", "micro_batch_size": "data.micro_batch_size",
             "samples_per_epoch": "data.samples_per_epoch", "batches_per_epoch": "the batches per epoch",
             "shuffle_buffer": "the shuffle buffer"}  # fmt: skip
    fields = list(StreamOrder.model_fields)
    if recorded.data_index_sha256 and order.data_index_sha256:
        fields.remove("train")
    return [f"{names[field]}: recorded with {getattr(recorded, field)!r}, this stream has {getattr(order, field)!r}"
            for field in fields if getattr(recorded, field) != getattr(order, field)]


# ---------------------------------------------------------------------------- writing

def _progress_path(directory: Path, rank: int) -> Path:
    return directory / f"progress-r{rank:05d}.json"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)


class _OpenShard:
    def __init__(self, path: Path, epoch: int, slot: int):
        self.path, self.epoch, self.slot = path, epoch, slot
        self.file = open(path, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples, self.first, self.last = 0, None, None

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed: reproducible bytes
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> TargetShard:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return TargetShard(name=self.path.name, epoch=self.epoch, slot=self.slot, samples=self.samples,
                           bytes=self.path.stat().st_size, first_position=self.first, last_position=self.last)


class TargetWriter:
    """One rank's side of a recording. Records go to a shard per (epoch, slot); a checkpoint
    closes the open shards and writes the rank's progress (its shards and the stream state)
    atomically, so a killed recording resumes from its last checkpoint with whole shards
    only: what was written after it is deleted and written again."""

    def __init__(self, directory: str | os.PathLike, rank: int, header: TargetsHeader,
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD):
        self.directory, self.rank, self.header = Path(directory), rank, header
        self.records_per_shard = records_per_shard
        self.shards: list[TargetShard] = []
        self.open: dict[tuple[int, int], _OpenShard] = {}
        self.directory.mkdir(parents=True, exist_ok=True)

    def resume(self) -> dict | None:
        """The stream state of this rank's last checkpoint, or None to start afresh. Shards
        of this rank that the progress does not list (written after it) are deleted."""
        path = _progress_path(self.directory, self.rank)
        state = None
        if path.is_file():
            progress = json.loads(path.read_text(encoding="utf-8"))
            recorded = TargetsHeader.model_validate(progress["header"])
            if recorded != self.header:
                differing = [f for f in TargetsHeader.model_fields if getattr(recorded, f) != getattr(self.header, f)]
                raise DataError(f"The unfinished recording in {self.directory} was started with other settings "
                                f"({', '.join(differing)} differ); delete the directory to record afresh, or restore "
                                f"the settings it was started with.")
            self.shards = [TargetShard.model_validate(s) for s in progress["shards"]]
            state = progress["stream"]
        listed = {s.name for s in self.shards}
        for stale in self.directory.glob(f"targets-r{self.rank:05d}-*.tar"):
            if stale.name not in listed:
                stale.unlink()
        return state

    def write(self, epoch: int, slot: int, key: str, position: int, view: dict, blob: bytes) -> None:
        shard = self.open.get((epoch, slot))
        if shard is not None and shard.samples >= self.records_per_shard:
            self.shards.append(shard.close())
            shard = None
        if shard is None:
            part = sum(1 for s in self.shards if (s.epoch, s.slot) == (epoch, slot))
            name = f"targets-r{self.rank:05d}-e{epoch:04d}-s{slot:03d}-{part:06d}.tar"
            shard = self.open[epoch, slot] = _OpenShard(self.directory / name, epoch, slot)
        member = f"{position:010d}_{key}"
        meta = {"key": key, "epoch": epoch, "rank": self.rank, "slot": slot, "position": position, "view": view}
        shard.add(f"{member}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        shard.add(f"{member}.taps.safetensors", blob)
        shard.samples += 1
        shard.first = position if shard.first is None else shard.first
        shard.last = position

    def write_batch(self, batch: dict, blobs: Sequence[bytes]) -> None:
        """The records of one batch of a ``ShardStream(record_views=True)``: its samples' keys,
        positions and view parameters (``batch["record"]``) with their encoded taps."""
        where = batch["record"]
        for key, position, view, blob in zip(batch["key"], where["positions"], where["views"], blobs, strict=True):
            self.write(where["epoch"], where["slot"], key, position, view, blob)

    def checkpoint(self, stream_state: dict, finished: bool = False) -> None:
        for shard in self.open.values():
            self.shards.append(shard.close())
        self.open = {}
        progress = {"header": self.header.model_dump(mode="json"), "shards": [s.model_dump() for s in self.shards],
                    "stream": stream_state, "finished": finished}  # fmt: skip
        _write_atomically(_progress_path(self.directory, self.rank), json.dumps(progress, indent=1))

    def abandon(self) -> None:
        """Closes open shards without recording them (they are deleted on resume)."""
        for shard in self.open.values():
            shard.tar.close()
            shard.file.close()
        self.open = {}


def finish_recording(directory: str | os.PathLike, world_size: int) -> Path:
    """After every rank's last checkpoint (``finished``): the index of all ranks' shards,
    written last (its presence marks the recording complete); the progress files go."""
    directory = Path(directory)
    ranks, header = [], None
    for rank in range(world_size):
        path = _progress_path(directory, rank)
        if not path.is_file():
            raise DataError(f"Rank {rank} left no progress in {directory}; the recording is not complete.")
        progress = json.loads(path.read_text(encoding="utf-8"))
        if not progress.get("finished"):
            raise DataError(f"Rank {rank}'s recording in {directory} is not finished; run the recording stage again.")
        header = header or TargetsHeader.model_validate(progress["header"])
        ranks.append(RankShards(rank=rank, shards=[TargetShard.model_validate(s) for s in progress["shards"]]))
    shards = [s for entry in ranks for s in entry.shards]
    index = TargetsIndexFile(**header.model_dump(), samples=sum(s.samples for s in shards),
                             bytes=sum(s.bytes for s in shards), ranks=ranks)
    path = directory / TARGETS_INDEX
    _write_atomically(path, json.dumps(index.model_dump(mode="json"), indent=1) + "\n")
    for rank in range(world_size):
        _progress_path(directory, rank).unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- reading

@dataclass
class Record:
    key: str
    position: int
    view: ViewParams
    tensors: dict[str, torch.Tensor]


def parse_record(sample: dict, url: str) -> Record:
    """A raw tar sample -> Record; DataError naming the shard and member if it is not one."""
    from safetensors.torch import load

    try:
        meta = json.loads(sample["json"])
        return Record(meta["key"], int(meta["position"]), ViewParams.from_json(meta["view"]), load(sample["taps.safetensors"]))
    except Exception as exn:  # noqa: BLE001 - any malformed member is the same problem to the user
        raise DataError(f"Targets shard {url}, record '{sample.get('__key__')}': not a record "
                        f"({type(exn).__name__}: {exn}); run `python -m data_shards verify` on the directory.") from None


def read_records(directory: Path, shards: Sequence[TargetShard], after: int = -1,
                 allow_pipe: bool = False) -> Iterator[Record]:
    """The records of these shards in position order, from the first past ``after``; shards
    that end before it are not opened."""
    for shard in shards:
        if shard.last_position <= after:
            continue
        url = str(directory / shard.name)
        try:
            for sample in read_shard(url, allow_pipe):
                record = parse_record(sample, url)
                if record.position > after:
                    yield record
        except ShardError as exn:
            raise DataError(f"Teacher targets: {exn}") from None


# ---------------------------------------------------------------------------- verifying

@dataclass
class TargetsReport:
    """What `data_shards verify` found in a targets directory."""

    index: TargetsIndex
    shards: list  # verify.ShardReport per shard
    problems: list[str]  # about the recording as a whole
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(report.ok for report in self.shards)


def _expected_tensors(store: TapStore) -> dict[str, tuple[list[int | None], set[torch.dtype]]]:
    """Tensor name -> (shape, dtypes) that one record holds for a tap."""
    value = {DTYPES[store.dtype]}
    if store.store == "top_k":
        return {f"{store.tap}/values": ([store.k], value), f"{store.tap}/indices": ([store.k], {torch.int16, torch.int32}),
                f"{store.tap}/fill": ([1], {torch.float32})}  # fmt: skip
    if store.store == "token":
        return {store.tap: ([store.shape[-1]], value)}
    expected = {store.tap: (list(store.shape), value)}
    if store.dtype == "int8":
        expected[f"{store.tap}/scale"] = (list(store.shape[:-1]), {torch.float32})
    return expected


def _shape_fits(shape: tuple[int, ...], expected: list[int | None]) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))


def _view_problem(view: ViewParams, views) -> str | None:
    """Whether recorded view parameters could have come from these views."""
    if views.geometry.hflip == 0 and view.geometry is not None and view.geometry.flip:
        return "flipped, but the views never flip (hflip 0)"
    if set(view.jitter) != set(views.views):
        return f"view parameters for {sorted(view.jitter)}, the views are {sorted(views.views)}"
    for name, steps in view.jitter.items():
        strength = views.views[name].color_jitter
        strengths = (0.0,) * 3 if strength is None else (strength,) * 3 if isinstance(strength, (int, float)) else strength
        if sorted(which for which, _ in steps) != [i for i in range(3) if strengths[i] > 0]:
            return f"view {name!r} has colour adjustments {[w for w, _ in steps]}, its jitter {strength} gives others"
        for which, factor in steps:
            if not max(0.0, 1 - strengths[which]) <= factor <= 1 + strengths[which]:
                return f"view {name!r} has a colour factor {factor} outside [1 - {strengths[which]}, 1 + {strengths[which]}]"
    return None


def verify_targets(directory: str | os.PathLike, allow_pipe: bool = False) -> TargetsReport:
    """Reads every record of a complete recording and checks it against its index: per
    shard its size, record count and positions; per record its rank, epoch, slot, view
    parameters and the names, dtypes and shapes of its tensors; per rank and epoch the
    record count a stream of the recorded order needs; the teacher's weights (sha256) when
    the file is still there; and shards in the directory that the index does not list."""
    from .verify import ShardReport
    from .views import ViewsConfig

    index = TargetsIndex.load(directory)
    raw = index.raw
    views = ViewsConfig.model_validate(raw.views)
    expected = {}
    for store in raw.taps:
        expected.update(_expected_tensors(store))
    problems, notes, reports = [], [], []
    per_epoch = raw.data.batches_per_epoch * raw.data.micro_batch_size
    slots = max(1, raw.data.num_workers)
    ranks = sorted(entry.rank for entry in raw.ranks)
    if ranks != list(range(raw.data.world_size)):
        problems.append(f"the index lists ranks {ranks}, the recording had {raw.data.world_size}")
    for entry in raw.ranks:
        for epoch in range(raw.epochs):
            count = sum(s.samples for s in entry.shards if s.epoch == epoch)
            if count != per_epoch:
                problems.append(f"rank {entry.rank}, epoch {epoch}: {count} records, a recorded epoch has {per_epoch} "
                                f"({raw.data.batches_per_epoch} batches of {raw.data.micro_batch_size})")
            for slot in range(slots):
                if not any(s.epoch == epoch and s.slot == slot for s in entry.shards):
                    problems.append(f"rank {entry.rank}, epoch {epoch}: no shard for loader slot {slot}")
        for shard in entry.shards:
            path = index.directory / shard.name
            report = ShardReport(str(path), shard.samples)
            reports.append(report)
            if not path.is_file():
                report.bad.append(("", "missing"))
                continue
            if path.stat().st_size != shard.bytes:
                report.bad.append(("", f"{path.stat().st_size} bytes, the index says {shard.bytes}"))
            last = None
            try:
                for sample in read_shard(str(path), allow_pipe):
                    member = sample.get("__key__", "")
                    try:
                        record = parse_record(sample, str(path))
                        meta = json.loads(sample["json"])
                    except DataError as exn:
                        report.bad.append((member, str(exn)))
                        continue
                    where = (meta.get("rank"), meta.get("epoch"), meta.get("slot"))
                    problem = None
                    if where != (entry.rank, shard.epoch, shard.slot):
                        problem = f"says rank/epoch/slot {where}, the shard holds {(entry.rank, shard.epoch, shard.slot)}"
                    elif last is not None and record.position <= last:
                        problem = f"position {record.position} does not follow {last}"
                    elif not shard.first_position <= record.position <= shard.last_position:
                        problem = f"position {record.position} outside the shard's {shard.first_position}..{shard.last_position}"
                    elif set(record.tensors) != set(expected):
                        problem = f"holds tensors {sorted(record.tensors)}, the index's taps make {sorted(expected)}"
                    else:
                        for name, tensor in record.tensors.items():
                            shape, dtypes = expected[name]
                            if tensor.dtype not in dtypes or not _shape_fits(tuple(tensor.shape), shape):
                                problem = f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, the index says {shape} of {sorted(map(str, dtypes))}"
                                break
                        else:
                            problem = _view_problem(record.view, views)
                    last = record.position
                    if problem:
                        report.bad.append((record.key, problem))
                    else:
                        report.good += 1
            except ShardError as exn:
                report.bad.append((exn.key or "", exn.reason))
    listed = {s.name for entry in raw.ranks for s in entry.shards}
    for orphan in sorted(index.directory.glob("targets-r*.tar")):
        if orphan.name not in listed:
            problems.append(f"{orphan.name} is in the directory but not in the index")
    shard_bytes = sum(s.bytes for entry in raw.ranks for s in entry.shards)
    if shard_bytes != raw.bytes or sum(s.samples for e in raw.ranks for s in e.shards) != raw.samples:
        problems.append(f"the index's totals ({raw.samples} records, {raw.bytes} bytes) are not the sum of its shards")
    weights = Path(raw.teacher.weights)
    if weights.is_file():
        if sha256_of(weights) != raw.teacher.sha256:
            problems.append(f"the teacher's weights {weights} changed since the recording (sha256 "
                            f"{raw.teacher.sha256[:12]}... recorded); record the targets again")
        else:
            notes.append(f"teacher weights {weights}: sha256 matches")
    else:
        notes.append(f"teacher weights {weights} not found here: their sha256 was not checked")
    return TargetsReport(index, reports, problems, notes)
