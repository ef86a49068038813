"""The training input pipeline (grain): sampler order, per-sample processing, static-shape batches.

  source (JsonSource | PackedSource | SyntheticShapes)
  -> per-epoch order: seeded global shuffle, grouped by modality and length like the original's
     `LengthGroupedSampler(group_by_modality_length=True)`, then this host's share (every
     `process_count`-th sample of the global order, so hosts are disjoint and cover the data)
  -> per sample (threads): `<image>` to the front, template + labels (`conversation_to_ids`), images
     preprocessed; bad records marked, not raised
  -> batches of static shapes (`Batcher`): fixed rows B, fixed image slots N, text length T from a few
     buckets, optionally several samples packed per row

The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` give a small JSON-able dict, and a
restored iterator continues bitwise identically. Batch format: see `Batcher` (and README "Training data").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import threading
from collections import Counter
from typing import Any

import grain
import numpy as np

from mgjax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MGMConfig
from mgjax.data.conversation import conversation_to_ids, pad_token_id
from mgjax.data.image import preprocess_image
from mgjax.data.records import BadRecord
from mgjax.data.templates import IMAGE_MARKER
from mgjax.errors import MGJaxError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How batches are built. `batch_size` is per host (rows of each batch this host yields)."""

    batch_size: int
    # Text lengths T a batch is padded to (the smallest that holds its longest row); the last is the longest
    # text a row may hold. A few buckets = a few compiled programs.
    buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    image_capacity: int | None = None  # N image slots per batch (default: batch_size, one per row)
    pack: bool = False  # several samples per row (segment_ids tell them apart)
    seed: int = 0
    shuffle: bool = True
    group_by_modality_length: bool = True
    megabatch_size: int | None = None  # length-sorted groups; default the global batch (the original's)
    pad_images: bool | None = None  # pad to square (stage 2) or resize + crop (stage 1); default from the config
    template: str | None = None  # default: the model config's
    num_epochs: int | None = None  # None: repeat forever (stop by steps; needed with several hosts)
    max_bad_fraction: float = 0.01  # stop when more than this share of samples seen were bad ...
    bad_check_after: int = 100  # ... once at least this many were seen
    num_threads: int = 8
    prefetch: int = 32

    def capacity(self) -> int:
        return self.image_capacity or self.batch_size

    def __post_init__(self):
        checks = [(self.batch_size >= 1, f"batch_size {self.batch_size}: must be >= 1"),
                  (len(self.buckets) > 0 and list(self.buckets) == sorted(set(self.buckets)) and self.buckets[0] > 0,
                   f"buckets {self.buckets}: must be positive and strictly increasing"),
                  (self.capacity() >= self.batch_size,
                   f"image_capacity {self.image_capacity}: must be >= batch_size {self.batch_size} (every row, even "
                   "an empty or text-only one, consumes one image slot)"),
                  (0 <= self.max_bad_fraction <= 1, f"max_bad_fraction {self.max_bad_fraction}: must be in [0, 1]")]
        for ok, message in checks:
            if not ok:
                raise MGJaxError(f"data config: {message}")


def epoch_order(lengths: np.ndarray, epoch: int, seed: int, megabatch: int, group: bool = True,
                shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch (the same on every host).

    Grouped like the original's `get_modality_length_grouped_indices`: image (length > 0) and text-only
    (length < 0) samples are shuffled apart and cut into mega-batches, each sorted by length, longest
    first; the mega-batches are shuffled, and the two last (partial) ones are merged and put at the end.
    """
    n = len(lengths)
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch])
    if not group:
        return rng.permutation(n)

    def megabatches(idx: np.ndarray) -> list[np.ndarray]:
        idx = idx[rng.permutation(len(idx))]
        return [m[np.argsort(-np.abs(lengths[m]), kind="stable")]
                for m in np.split(idx, range(megabatch, len(idx), megabatch))]

    image, text = np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)
    if len(image) == 0 or len(text) == 0:
        return np.concatenate(megabatches(np.arange(n)))
    img_mb, txt_mb = megabatches(image), megabatches(text)
    body = img_mb[:-1] + txt_mb[:-1]
    body = [body[i] for i in rng.permutation(len(body))]
    return np.concatenate(body + [np.sort(np.concatenate([img_mb[-1], txt_mb[-1]]))])


class HostOrder:
    """Step i of this host's stream -> record index: epoch i // per_host, this host's share of its order."""

    def __init__(self, lengths: np.ndarray, data: DataConfig, process_index: int, process_count: int):
        if not 0 <= process_index < process_count:
            raise MGJaxError(f"process index {process_index} is not in [0, {process_count})")
        self.per_host = len(lengths) // process_count  # equal shares: hosts step in lockstep
        if self.per_host == 0:
            raise MGJaxError(f"{len(lengths)} records cannot be shared by {process_count} hosts")
        self._lengths, self._data = lengths, data
        self._index, self._count = process_index, process_count
        self._megabatch = data.megabatch_size or data.batch_size * process_count

    @functools.lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> np.ndarray:
        d = self._data
        order = epoch_order(self._lengths, epoch, d.seed, self._megabatch, d.group_by_modality_length, d.shuffle)
        return order[self._index::self._count][:self.per_host]

    def __call__(self, step: int) -> int:
        return int(self.epoch(step // self.per_host)[step % self.per_host])


class SampleProcessor:
    """One record -> a sample dict (`id`, `input_ids`, `labels`, `images`, `images_aux`, `text_len`,
    `n_images`, `merged_len`), or `{"bad": reason, "id", "detail"}`: never raises for bad data."""

    def __init__(self, tokenizer, config: MGMConfig, data: DataConfig):
        self.tokenizer, self.config, self.data = tokenizer, config, data
        self.template = data.template or config.template
        # HF fast tokenizers are not safe to call from several threads when truncation settings change
        # (text-only samples truncate): "Already borrowed". Images are still preprocessed in parallel.
        self._lock = threading.Lock()

    def __call__(self, record: dict) -> dict:
        rid = str(record.get("id", "?"))
        try:
            return self._process(record)
        except BadRecord as e:
            return {"bad": e.reason, "id": rid, "detail": e.detail}
        except Exception as e:  # noqa: BLE001 - one odd record must not stop an epoch; it is counted and logged
            return {"bad": "error", "id": rid, "detail": f"{type(e).__name__}: {e}"}

    def _process(self, record: dict) -> dict:
        c, d = self.config, self.data
        images = record["images"]
        markers = sum(t["value"].count(IMAGE_MARKER) for t in record["conversations"])
        if markers != len(images):  # a text-only sample must not carry one either
            raise BadRecord("image_count", f"{len(images)} image(s) but {markers} {IMAGE_MARKER} marker(s)")
        try:
            with self._lock:
                ids, labels = conversation_to_ids(self.tokenizer, record["conversations"], self.template,
                                                  bool(images), c.max_length)
        except MGJaxError as e:
            raise BadRecord("conversation", str(e)) from None
        ids, labels = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
        n_img = int((ids == IMAGE_TOKEN_INDEX).sum())
        if n_img != len(images):
            raise BadRecord("image_count", f"{len(images)} image(s) but {n_img} placeholder(s) after tokenization")
        if n_img > d.capacity() - d.batch_size + 1:
            raise BadRecord("too_many_images", f"{n_img} images; a batch of {d.batch_size} rows with "
                                               f"{d.capacity()} image slots holds at most "
                                               f"{d.capacity() - d.batch_size + 1} in one row")
        merged = len(ids) + n_img * (c.tokens_per_image - 1)
        if len(ids) > d.buckets[-1] or merged > c.max_length:
            raise BadRecord("too_long", f"{len(ids)} text ids, {merged} with visual tokens; the limits are "
                                        f"{d.buckets[-1]} (largest bucket) and {c.max_length} (max_length)")
        if (labels == IGNORE_INDEX).all():
            raise BadRecord("no_supervised", "no supervised token (nothing to learn, or a tokenization mismatch)")
        pix, aux = [], []
        for im in images:
            try:
                p, a = preprocess_image(im, c, d.pad_images)
            except MGJaxError as e:
                raise BadRecord("image", str(e)) from None
            pix.append(p)
            aux.append(a)
        return {"id": str(record["id"]), "input_ids": ids, "labels": labels, "images": pix, "images_aux": aux,
                "text_len": len(ids), "n_images": n_img, "merged_len": merged}


class _Row:
    def __init__(self):
        self.samples: list[dict] = []
        self.text = self.n_images = self.merged = 0

    def slots(self, extra_images: int = 0) -> int:
        """Image slots the row consumes: its images, or one (zero) image when it has none."""
        return max(self.n_images + extra_images, 1)

    def add(self, s: dict) -> None:
        self.samples.append(s)
        self.text += s["text_len"]
        self.n_images += s["n_images"]
        self.merged += s["merged_len"]


class BatchIterator(grain.DatasetIterator):
    """Builds static-shape batches from processed samples; counts and logs bad ones.

    State: the parent's state from which the samples not yet in a batch are re-read (a sample that did not
    fit the last batch is read again after a restore), and the counters.
    """

    def __init__(self, parent: grain.DatasetIterator, batcher: "Batcher"):
        super().__init__(parent)
        self._b = batcher
        self._pending: dict | None = None
        self._pending_state: dict | None = None
        self._good, self._bad = 0, Counter()

    def _pull(self) -> tuple[dict, dict]:
        """The next good sample and the parent state before it; StopIteration at the end."""
        if self._pending is not None:
            out = self._pending, self._pending_state
            self._pending = self._pending_state = None
            return out
        while True:
            state = self._parent.get_state()
            s = next(self._parent)
            if "bad" not in s:
                return s, state
            self._bad[s["bad"]] += 1
            log.warning("skipped record %s: %s (%s)", s["id"], s["bad"], s["detail"])
            self._check_bad_fraction()

    def _check_bad_fraction(self) -> None:
        bad = sum(self._bad.values())
        seen = bad + self._good
        d = self._b.data
        if seen >= d.bad_check_after and bad > d.max_bad_fraction * seen:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self._bad.items()))
            raise MGJaxError(f"training data: {bad} of {seen} samples were bad ({reasons}), more than "
                             f"max_bad_fraction {d.max_bad_fraction}; fix the data (the log names each record id) "
                             "or raise max_bad_fraction")

    def __next__(self) -> dict:
        rows: list[_Row] = []
        while True:
            try:
                s, state = self._pull()
            except StopIteration:
                if not rows:
                    raise
                break
            if not self._b.place(rows, s):
                self._pending, self._pending_state = s, state
                break
            self._good += 1
            if not self._b.data.pack and len(rows) == self._b.data.batch_size:
                break
        return self._b.assemble(rows)

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "good": self._good, "bad": dict(sorted(self._bad.items()))}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self._good, self._bad = int(state["good"]), Counter({k: int(v) for k, v in state["bad"].items()})


class Batcher(grain.IterDataset):
    """Processed samples -> batches, dicts of NumPy arrays with static shapes:

    input_ids int32 [B, T] (-200 at image placeholders, the pad id at padding), labels int32 [B, T]
    (-100 = ignored), attention_mask int32 [B, T], segment_ids int32 [B, T] (0 = padding, 1..k = the k-th
    sample of the row; all 1 without packing), images float32 [N, h, w, 3] (HD: [N, V, h, w, 3]) and
    images_aux float32 [N, S, S, 3], sample_ids str [samples] (the records' ids, row by row: what a log names,
    never fed to the model). Rows consume image slots in order: a row's images, or one zero slot
    when it has none (text-only or empty rows); unused trailing slots are zeros. T is the smallest bucket
    holding the longest row; every row's merged length (text + visual tokens) is <= config.max_length.
    """

    def __init__(self, parent: grain.IterDataset, config: MGMConfig, data: DataConfig, pad_id: int):
        super().__init__(parent)
        self.config, self.data, self.pad_id = config, data, pad_id

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), self)

    def place(self, rows: list[_Row], s: dict) -> bool:
        """Put `s` into the first row it fits (a new one if none), keeping the image slots within capacity."""
        d, c = self.data, self.config
        used = sum(r.slots() for r in rows) + (d.batch_size - len(rows))  # empty rows take one slot each
        for row in rows if d.pack else ():
            if (row.text + s["text_len"] <= d.buckets[-1] and row.merged + s["merged_len"] <= c.max_length
                    and used - row.slots() + row.slots(s["n_images"]) <= d.capacity()):
                row.add(s)
                return True
        if len(rows) < d.batch_size and used - 1 + max(s["n_images"], 1) <= d.capacity():
            rows.append(_Row())
            rows[-1].add(s)
            return True
        return False

    def image_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        c = self.config
        views = () if c.num_views == 1 else (c.num_views,)
        return (*views, c.image_size, c.image_size, 3), (c.image_size_aux, c.image_size_aux, 3)

    def assemble(self, rows: list[_Row]) -> dict[str, np.ndarray]:
        d = self.data
        B, N = d.batch_size, d.capacity()
        T = next(b for b in d.buckets if b >= max(r.text for r in rows))
        img_shape, aux_shape = self.image_shapes()
        out = {"input_ids": np.full((B, T), self.pad_id, np.int32), "labels": np.full((B, T), IGNORE_INDEX, np.int32),
               "attention_mask": np.zeros((B, T), np.int32), "segment_ids": np.zeros((B, T), np.int32),
               "images": np.zeros((N, *img_shape), np.float32), "images_aux": np.zeros((N, *aux_shape), np.float32),
               "sample_ids": np.array([s["id"] for row in rows for s in row.samples], dtype=str)}
        slot = 0
        for i, row in enumerate(rows):
            pos = 0
            for k, s in enumerate(row.samples, 1):
                n = s["text_len"]
                out["input_ids"][i, pos:pos + n] = s["input_ids"]
                out["labels"][i, pos:pos + n] = s["labels"]
                # The shifted loss predicts a sample's first label from the previous sample's last token:
                # never supervised (the original masks BOS anyway).
                out["labels"][i, pos] = IGNORE_INDEX
                out["attention_mask"][i, pos:pos + n] = 1
                out["segment_ids"][i, pos:pos + n] = k
                pos += n
                for p, a in zip(s["images"], s["images_aux"]):
                    out["images"][slot], out["images_aux"][slot] = p, a
                    slot += 1
            slot += row.n_images == 0  # a row without images consumes one zero slot
        return out


def pad_to(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch re-padded to a longer text length (e.g. the largest T among hosts, which must agree)."""
    extra = length - batch["input_ids"].shape[1]
    if extra < 0:
        raise MGJaxError(f"cannot pad a batch of text length {batch['input_ids'].shape[1]} to {length}")
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "segment_ids": 0}
    return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fill[k]) if k in fill else v for k, v in batch.items()}


def make_dataset(source, tokenizer, config: MGMConfig, data: DataConfig, *, process_index: int = 0,
                 process_count: int = 1) -> Batcher:
    """The batches of this host (`iter(...)` gives a checkpointable iterator). `source`: a JsonSource,
    PackedSource, SyntheticShapes or anything with `len`, `[i]` -> record and `lengths`."""
    order = HostOrder(np.asarray(source.lengths), data, process_index, process_count)
    steps = sys.maxsize if data.num_epochs is None else order.per_host * data.num_epochs
    process = SampleProcessor(tokenizer, config, data)
    samples = (grain.MapDataset.range(steps)
               .map(lambda step: process(source[order(step)]))
               .to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)))
    return Batcher(samples, config, data, pad_token_id(tokenizer, data.template or config.template))

