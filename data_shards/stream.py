"""Streaming shards to ranks: ShardStream for training (infinite, resampled) and EvalStream (finite, exact).

Why resampled shards and a fixed batch count: with webdataset, ranks that split a shard list get
unequal sample counts, and a rank that runs out first leaves the others waiting at a collective
forever. Here every rank draws shards with replacement from the whole list (weighted by their
sample counts), so no rank ever runs short, and every rank stops an epoch after exactly
`batches_per_epoch = ceil(samples_per_epoch / (batch_size * world_size))` batches.

Determinism: a rank's epoch is split into `max(1, num_workers)` slots; slot s produces batches
s, s + W, s + 2W, ... from its own stream seeded by (seed, epoch, rank, s), and DataLoader
worker w serves the slot of batch `start + w`, so the round-robin order of the loader is exactly
the batch order. Augmentation is seeded per sample by (seed, epoch, rank, slot, position). So a
batch is a pure function of (seed, epoch, rank, num_workers, batch position), and resuming
replays the slot streams up to the saved positions without decoding anything.
"""

import logging
import math
import os
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.filters import _shuffle as shuffle_buffer
from webdataset.shardlists import expand_urls

from .decode import MAX_IMAGE_PIXELS, BadSample, Decoded, decode_sample
from .errors import DataError
from .index import ShardIndex
from .keys import derive_seed
from .safety import ShardError, check_url_allowed, read_shard
from .text import TextConfig, load_tokenizer, tokenize
from .targets import order_problems
from .views import GeometryConfig, ViewParams, ViewsConfig, apply_views, draw_view_params, make_views, text_params

log = logging.getLogger("data_shards")


def resolve_urls(urls: str | os.PathLike | Sequence[str], allow_pipe: bool) -> tuple[list[str], ShardIndex | None]:
    """A directory with an index, an index JSON, a brace pattern ('a-{000..004}.tar', '::'-joined), or a list."""
    index = None
    if isinstance(urls, (str, os.PathLike)):
        text = str(urls)
        if os.path.isdir(text) or text.endswith(".json"):
            index = ShardIndex.load(text)
            shard_urls = index.urls
        else:
            shard_urls = expand_urls(text)
    else:
        shard_urls = [str(url) for url in urls]
    if not shard_urls:
        raise DataError(f"No shard URLs in {urls!r}: pass a shard directory with index.json, a brace pattern or a list of URLs.")
    for url in shard_urls:
        check_url_allowed(url, allow_pipe)
    missing = [url for url in shard_urls if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url)]
    if missing:
        raise DataError(f"Shard {missing[0]} does not exist ({len(missing)} of {len(shard_urls)} shards missing).")
    return shard_urls, index


@dataclass
class TargetsReplay:
    """A stream that replays a recording (``data_shards.targets``): epoch ``e`` streams the
    samples and views of recorded epoch ``e mod epochs`` and hands out the recorded taps.
    ``taps``: the recorded taps to read; ``views``: the views to make (default: all)."""

    index: "TargetsIndex"
    taps: list[str]
    views: list[str] | None = None

    @property
    def stores(self) -> list:
        return [store for store in self.index.raw.taps if store.tap in self.taps]

    @property
    def epochs(self) -> int:
        return self.index.raw.epochs


class _Mismatch(Exception):
    """The stream and its records disagree: the data changed since the recording."""


class _RecordCursor:
    """One slot's records, read front to back beside its samples."""

    def __init__(self, replay: TargetsReplay, rank: int, epoch: int, slot: int, after: int, allow_pipe: bool):
        from .targets import read_records

        self.where = f"rank {rank}, recorded epoch {epoch}, slot {slot}"
        self.records = read_records(replay.index.directory, replay.index.shards_of(rank, epoch, slot), after, allow_pipe)
        self.pending = None

    def take(self, position: int, key: str):
        """The record of the sample at ``position``; None when there is none (a sample that
        was bad when the targets were recorded). A record for another key is a mismatch."""
        while self.pending is None or self.pending.position < position:  # records of samples bad now
            self.pending = next(self.records, None)
            if self.pending is None:
                raise _Mismatch(f"the records of {self.where} end before stream position {position} (sample '{key}')")
        if self.pending.position > position:
            return None
        record, self.pending = self.pending, None
        if record.key != key:
            raise _Mismatch(f"at {self.where}, position {position} the stream has sample '{key}' but the record is for '{record.key}'")
        return record


def _collate(samples: list[Decoded], views: dict[str, list[torch.Tensor]] | None, with_labels: bool, text: TextConfig | None = None) -> dict:
    batch: dict = {"key": [sample.key for sample in samples]}
    if with_labels:
        batch["label"] = torch.tensor([sample.label for sample in samples], dtype=torch.long)
    if views is not None:
        # default_collate stacks straight into shared memory inside a DataLoader worker: one copy fewer
        batch.update({name: default_collate(tensors) for name, tensors in views.items()})
    else:
        batch["text"] = [sample.text for sample in samples]
        if text is not None:  # tokenised here, in the worker that read the samples
            batch.update(tokenize(batch["text"], text))
    return batch


@dataclass
class _Plan:
    """Everything a worker needs to produce its batches; picklable, identical on every worker."""

    urls: list[str]
    weights: list[int] | None
    modality: str | None
    labelled: bool | None
    views: ViewsConfig
    text: TextConfig | None
    batch_size: int
    rank: int
    seed: int
    batches_per_epoch: int
    num_slots: int
    shuffle_buffer: int
    max_bad_samples: int
    allow_pipe: bool
    num_classes: int | None = None
    max_image_pixels: int = MAX_IMAGE_PIXELS
    record_views: bool = False
    targets: TargetsReplay | None = None

    def data_epoch(self, epoch: int) -> int:
        """The epoch whose samples and views epoch ``epoch`` streams: itself, or when replaying
        targets recorded for E epochs, ``epoch mod E``."""
        return epoch if self.targets is None else epoch % self.targets.epochs


def _raw_samples(plan: _Plan, rng: random.Random) -> Iterator[dict]:
    """Undecoded samples from shards drawn with replacement; a failed shard becomes one error item."""
    while True:
        url = rng.choices(plan.urls, weights=plan.weights)[0]
        count = 0
        try:
            for sample in read_shard(url, plan.allow_pipe):
                count += 1
                yield sample
        except ShardError as exn:
            yield {"__error__": str(exn), "__url__": url, "__key__": exn.key}
            continue
        if count == 0:  # an empty shard would otherwise spin forever without yielding
            yield {"__error__": f"Shard {url} holds no samples", "__url__": url, "__key__": None}


def _slot_batches(plan: _Plan, epoch: int, slot: int, first_batch: int, skip: int) -> Iterator[dict]:
    """Batches first_batch, first_batch + num_slots, ... of one slot, after skipping `skip` stream items."""
    data_epoch = plan.data_epoch(epoch)
    stream_seed = derive_seed(plan.seed, data_epoch, plan.rank, slot)
    raw = _raw_samples(plan, random.Random(derive_seed(stream_seed, "shards")))
    # Start yielding after 100 items (webdataset's default) while the buffer fills up to its full size.
    shuffle_rng = random.Random(derive_seed(stream_seed, "shuffle"))
    items = shuffle_buffer(raw, plan.shuffle_buffer, min(100, plan.shuffle_buffer), rng=shuffle_rng)
    for _ in range(skip):  # replay without decoding: positions, not pixels, decide what comes next
        next(items)
    records = None if plan.targets is None else _RecordCursor(plan.targets, plan.rank, data_epoch, slot, skip, plan.allow_pipe)
    view_names = None if plan.targets is None else plan.targets.views
    position, bad, last_bad = skip, 0, ""
    for batch_number in range(first_batch, plan.batches_per_epoch, plan.num_slots):
        samples: list[Decoded] = []
        views: dict[str, list[torch.Tensor]] | None = None
        params: list[ViewParams] = []
        positions: list[int] = []
        taps: list[dict] = []
        while len(samples) < plan.batch_size:
            item = next(items)
            position += 1
            try:
                if "__error__" in item:
                    raise BadSample(item["__error__"])
                decoded = decode_sample(item, plan.modality, plan.num_classes, plan.max_image_pixels)
                if plan.labelled and decoded.label is None:
                    raise BadSample("missing field 'cls' (the index says the samples are labelled)")
                sample_seed = derive_seed(stream_seed, "sample", position)
                if records is not None:
                    record = records.take(position, decoded.key)
                    if record is None:
                        raise BadSample("no teacher record (it was a bad sample when the targets were recorded)")
                    sample_params = record.view
                    taps.append(record.tensors)
                elif decoded.image is not None:
                    sample_params = draw_view_params(decoded.image.shape[-2], decoded.image.shape[-1], plan.views, sample_seed)
                else:
                    sample_params = text_params(sample_seed)
                if decoded.image is not None:
                    sample_views = apply_views(decoded.image, plan.views, sample_params, view_names)
                    views = views or {name: [] for name in sample_views}
                    for name, tensor in sample_views.items():
                        views[name].append(tensor)
                samples.append(decoded)
                params.append(sample_params)
                positions.append(position)
            except BadSample as exn:
                bad += 1
                last_bad = f"shard {item.get('__url__')} sample '{item.get('__key__')}': {exn}"
                log.warning("rank %d skipped a bad sample (%d on this worker): %s", plan.rank, bad, last_bad)
                if bad > plan.max_bad_samples:
                    yield {"__error__": f"rank {plan.rank}: more than max_bad_samples={plan.max_bad_samples} bad samples; the last was {last_bad}"}
                    return
            except _Mismatch as exn:
                yield {"__error__": f"rank {plan.rank}: the teacher targets in {plan.targets.index.directory} do not belong to this data: {exn}. "
                                    f"The data shards changed since the recording; record the targets again."}
                return
        with_labels = plan.labelled if plan.labelled is not None else all(s.label is not None for s in samples)
        batch = _collate(samples, views, with_labels, plan.text)
        if plan.record_views or plan.targets is not None:
            # Where each sample came from and the views it got: what a recording writes down.
            batch["record"] = {"epoch": data_epoch, "slot": slot, "positions": positions,
                               "views": [p.to_json() for p in params]}  # fmt: skip
        if plan.targets is not None:
            from .targets import decode_batch

            batch["targets"] = decode_batch(taps, plan.targets.stores)
            batch["mask_seed"] = torch.tensor([p.mask_seed for p in params], dtype=torch.long)
        batch.update(_slot=slot, _batch=batch_number, _position=position, _bad=bad, _last_bad=last_bad)
        yield batch


class _EpochOfSlots(IterableDataset):
    """One epoch from batch `start` on; DataLoader worker w serves the slot of batch start + w."""

    def __init__(self, plan: _Plan, epoch: int, start: int, positions: list[int | None]):
        self.plan, self.epoch, self.start, self.positions = plan, epoch, start, positions

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # the workers are the parallelism; don't oversubscribe the cores
        if self.start + worker >= self.plan.batches_per_epoch:
            return  # fewer batches left in this epoch than workers
        slot = (self.start + worker) % self.plan.num_slots
        skip = self.positions[slot]
        if skip is None:  # position unknown (a minimal state dict): assume no bad samples so far
            skip = len(range(slot, self.start, self.plan.num_slots)) * self.plan.batch_size
        yield from _slot_batches(self.plan, self.epoch, slot, self.start + worker, skip)


class ShardStream:
    """An endless stream of batches for one rank; see the module docstring for the guarantees."""

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int = 2,
        seed: int = 0,
        views: ViewsConfig | None = None,
        text: TextConfig | None = None,
        samples_per_epoch: int | None = None,
        max_bad_samples: int = 100,
        allow_pipe: bool = False,
        shuffle_buffer: int = 1000,
        num_classes: int | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        record_views: bool = False,
        targets: TargetsReplay | None = None,
    ):
        """num_classes: labels outside 0..num_classes-1 are bad samples (counted, skipped,
        named in the log) instead of reaching the loss. max_image_pixels: larger images are
        bad samples, refused before they are decoded. record_views: each batch carries
        ``record`` (data epoch, slot, stream positions and the view parameters of its
        samples), what a recording of teacher targets writes down. targets: replay a
        recording (see TargetsReplay); batches then carry ``targets`` (tap -> [B, ...]) and
        ``mask_seed`` too, and the stream must be the one recorded (same data, seed, ranks,
        workers, batch size, views), or it refuses."""
        _check_rank(batch_size, rank, world_size)
        if num_workers < 0 or shuffle_buffer < 1 or max_bad_samples < 0:
            raise DataError(f"num_workers ({num_workers}) and max_bad_samples ({max_bad_samples}) must be >= 0, shuffle_buffer ({shuffle_buffer}) >= 1.")
        self.urls, self.index = resolve_urls(urls, allow_pipe)
        if samples_per_epoch is None:
            if self.index is None:
                raise DataError(f"samples_per_epoch is required for {urls!r}: without an index.json the stream cannot know how many samples an epoch has.")
            samples_per_epoch = self.index.total
        if samples_per_epoch < 1:
            raise DataError(f"samples_per_epoch must be positive, not {samples_per_epoch}.")
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.samples_per_epoch = samples_per_epoch
        self.batches_per_epoch = math.ceil(samples_per_epoch / (batch_size * world_size))
        self.max_bad_samples = max_bad_samples
        for directory in (text.entries().values() if text is not None else ()):
            load_tokenizer(directory)  # fails here, not in a worker; forked workers inherit it
        self._plan = _Plan(
            urls=self.urls,
            weights=[count for _, count in self.index.shards] if self.index else None,
            modality=self.index.modality if self.index else None,
            labelled=self.index.labelled if self.index else None,
            views=views or ViewsConfig(), text=text,
            batch_size=batch_size, rank=rank, seed=seed, batches_per_epoch=self.batches_per_epoch,
            num_slots=max(1, num_workers), shuffle_buffer=shuffle_buffer, max_bad_samples=max_bad_samples, allow_pipe=allow_pipe,
            num_classes=num_classes, max_image_pixels=max_image_pixels,
            record_views=record_views, targets=targets,
        )  # fmt: skip
        self.urls_given = urls
        if targets is not None:
            self._check_targets(targets)
        self.epoch, self.batch = 0, 0
        self._new_epoch_counters()
        self._bad_before_epoch = 0

    def order(self) -> "StreamOrder":
        """What fixes this stream's sample order (a recording keeps it; a replay must match it)."""
        return stream_order(self.urls_given, self.index, batch_size=self.batch_size, world_size=self.world_size,
                            num_workers=self.num_workers, seed=self._plan.seed, samples_per_epoch=self.samples_per_epoch,
                            shuffle_buffer=self._plan.shuffle_buffer)  # fmt: skip

    def _check_targets(self, targets: TargetsReplay) -> None:
        index = targets.index
        problems = order_problems(index.raw.data, self.order())
        if ViewsConfig.model_validate(index.raw.views) != self._plan.views:
            problems.append(f"the views differ: recorded {index.raw.views}, this stream has {self._plan.views.model_dump(mode='json')}")
        unknown = [name for name in targets.views or () if name not in self._plan.views.views]
        if unknown:
            problems.append(f"views {unknown} are not among the stream's views {sorted(self._plan.views.views)}")
        missing = [tap for tap in targets.taps if index.tap(tap) is None]
        if missing:
            problems.append(f"taps {missing} were not recorded (recorded: {[s.tap for s in index.raw.taps]})")
        if problems:
            raise DataError(f"The teacher targets in {index.directory} were recorded from another stream than this one: "
                            + "; ".join(problems) + ". A student reads its records in the recorded order, so it must stream "
                            "the same data with the same seed, ranks, workers, batch size and views.")

    def _new_epoch_counters(self) -> None:
        self._positions: list[int | None] = [None] * self._plan.num_slots
        self._slot_bad = [0] * self._plan.num_slots

    @property
    def bad_samples(self) -> int:
        return self._bad_before_epoch + sum(self._slot_bad)

    def state_dict(self) -> dict:
        """Position in the stream. `epoch` and `batch` suffice on clean data; `positions` keeps it exact past bad samples."""
        return {"epoch": self.epoch, "batch": self.batch, "positions": list(self._positions),
                "bad_samples": self.bad_samples, "num_workers": self.num_workers}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"A stream state needs integer 'epoch' and 'batch'; got {state!r}.") from None
        if not 0 <= batch <= self.batches_per_epoch or epoch < 0:
            raise DataError(f"Stream state epoch {epoch} batch {batch} is out of range: an epoch has {self.batches_per_epoch} batches.")
        if state.get("num_workers", self.num_workers) != self.num_workers:
            raise DataError(f"The stream state was saved with num_workers={state['num_workers']}, this stream has {self.num_workers}; the sample order depends on it, so use the same.")
        self.epoch, self.batch = epoch, batch
        self._new_epoch_counters()
        positions = state.get("positions")
        if positions is not None and len(positions) == len(self._positions):
            self._positions = list(positions)
        self._bad_before_epoch = int(state.get("bad_samples", 0))
        if self.batch == self.batches_per_epoch:
            self._finish_epoch()

    def __iter__(self) -> Iterator[dict]:
        while True:
            epoch_data = _EpochOfSlots(self._plan, self.epoch, self.batch, list(self._positions))
            if self.num_workers == 0:
                loader = epoch_data
            else:
                # An own generator: DataLoader would otherwise draw its base seed from the global
                # torch RNG, shifting the trainer's dropout/drop-path stream at every epoch and
                # resume (our workers' randomness comes from derive_seed, not from that seed).
                loader = DataLoader(epoch_data, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                                    generator=torch.Generator().manual_seed(self.epoch),
                                    worker_init_fn=_leave_stop_signals_to_the_main_process)
            for batch in loader:
                if "__error__" in batch:
                    raise DataError(batch["__error__"])
                slot, batch_number = batch.pop("_slot"), batch.pop("_batch")
                if batch_number != self.batch:
                    raise RuntimeError(f"data_shards bug: got batch {batch_number}, expected {self.batch}")
                self._positions[slot] = batch.pop("_position")
                self._slot_bad[slot] = batch.pop("_bad")
                last_bad = batch.pop("_last_bad")
                if self.bad_samples > self.max_bad_samples:
                    raise DataError(f"rank {self.rank}: {self.bad_samples} bad samples, more than max_bad_samples={self.max_bad_samples}; the last was {last_bad}")
                batch["bad_samples"] = self.bad_samples
                self.batch += 1
                if self.batch == self.batches_per_epoch:
                    self._finish_epoch()  # before the yield, so a state saved now points at the next epoch
                yield batch

    def _finish_epoch(self) -> None:
        self._bad_before_epoch = self.bad_samples
        self.epoch, self.batch = self.epoch + 1, 0
        self._new_epoch_counters()


def stream_order(urls, index: ShardIndex | None, *, batch_size: int, world_size: int, num_workers: int, seed: int,
                 samples_per_epoch: int | None = None, shuffle_buffer: int = 1000) -> "StreamOrder":
    """The order a ShardStream with these settings would stream in, without building one (a
    plan checks a student's stream against a recording with it)."""
    from .targets import StreamOrder, sha256_of

    samples = samples_per_epoch if samples_per_epoch is not None else index.total
    local_index = index is not None and "://" not in index.location
    return StreamOrder(
        train=str(urls) if isinstance(urls, (str, os.PathLike)) else "::".join(map(str, urls)),
        data_index_sha256=sha256_of(index.location) if local_index else None,
        seed=seed, world_size=world_size, num_workers=num_workers, micro_batch_size=batch_size,
        samples_per_epoch=samples, batches_per_epoch=math.ceil(samples / (batch_size * world_size)),
        shuffle_buffer=shuffle_buffer,
    )  # fmt: skip


def _leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """SIGTERM/SIGINT reach the whole process group (a cluster preempting the job, Ctrl-C). A
    worker they killed would make torch raise in the main process wherever it is, e.g. in
    the middle of the checkpoint it is saving on its way out; the main process decides when
    to stop and shuts its workers down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"Need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; got batch_size={batch_size}, rank={rank}, world_size={world_size}.")


class EvalStream:
    """Every sample exactly once across ranks, and the same number of batches on every rank.

    Rank r gets the contiguous block of samples [r * n, (r + 1) * n) with n = ceil(total / world_size),
    so it reads only the shards that block touches. Short blocks and bad samples become padding:
    batch["valid"] is False there (key "", label -1, zero images).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        views: ViewsConfig | None = None,
        text: TextConfig | None = None,
        allow_pipe: bool = False,
        num_classes: int | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        """num_classes: a label the model cannot predict is a bad sample (padding), not a
        wrong answer; max_image_pixels as in ShardStream."""
        _check_rank(batch_size, rank, world_size)
        self.num_classes, self.max_image_pixels = num_classes, max_image_pixels
        self.urls, self.index = resolve_urls(urls, allow_pipe)
        self.text = text
        if self.index is None:
            raise DataError(f"EvalStream needs a shard index (a directory with index.json or its path), not {urls!r}: it must know every shard's sample count to give each rank an exact share.")
        self.batch_size, self.rank, self.allow_pipe = batch_size, rank, allow_pipe
        self.views = views or ViewsConfig(geometry=GeometryConfig(crop="center", hflip=0.0))
        per_rank = math.ceil(self.index.total / world_size)
        self.start, self.stop = min(rank * per_rank, self.index.total), min((rank + 1) * per_rank, self.index.total)
        self._num_batches = math.ceil(per_rank / batch_size)
        self.bad_samples = 0

    def __len__(self) -> int:
        return self._num_batches

    def _samples(self) -> Iterator[Decoded | None]:
        """This rank's samples in index order; None for a sample that is bad or missing."""
        offset = 0
        for url, count in self.index.shards:
            lo, hi = max(self.start, offset), min(self.stop, offset + count)
            if lo < hi:
                wanted = range(lo - offset, hi - offset)
                produced = 0
                try:
                    for position, sample in enumerate(read_shard(url, self.allow_pipe)):
                        if position >= wanted.stop:
                            break
                        if position >= wanted.start:
                            produced += 1
                            yield self._decode(sample, url)
                except ShardError as exn:
                    log.warning("eval rank %d: %s", self.rank, exn)
                for _ in range(len(wanted) - produced):  # samples the shard failed to deliver
                    self.bad_samples += 1
                    yield None
            offset += count

    def _decode(self, sample: dict, url: str) -> Decoded | None:
        try:
            decoded = decode_sample(sample, self.index.modality, self.num_classes, self.max_image_pixels)
            if self.index.labelled and decoded.label is None:
                raise BadSample("missing field 'cls'")
            return decoded
        except BadSample as exn:
            self.bad_samples += 1
            log.warning("eval rank %d skipped shard %s sample '%s': %s", self.rank, url, sample["__key__"], exn)
            return None

    def __iter__(self) -> Iterator[dict]:
        self.bad_samples = 0
        samples = self._samples()
        size = self.views.geometry.size
        for _ in range(self._num_batches):
            chunk = [next(samples, None) for _ in range(self.batch_size)]
            batch: dict = {"key": [s.key if s else "" for s in chunk], "valid": torch.tensor([s is not None for s in chunk])}
            if self.index.labelled:
                batch["label"] = torch.tensor([s.label if s else -1 for s in chunk], dtype=torch.long)
            if self.index.modality == "text":
                batch["text"] = [s.text if s else "" for s in chunk]
                if self.text is not None:  # padding samples are empty texts, marked not valid
                    batch.update(tokenize(batch["text"], self.text))
            else:
                per_sample = [
                    make_views(s.image, self.views, derive_seed("eval", s.key)) if s else
                    {name: torch.zeros(3, size, size) for name in self.views.views}
                    for s in chunk
                ]  # fmt: skip
                batch.update({name: torch.stack([views[name] for views in per_sample]) for name in self.views.views})
            batch["bad_samples"] = self.bad_samples
            yield batch
