"""`mgjax data pack`: LLaVA/MGM JSON + image folder -> ArrayRecord shards with the image files embedded.

The output folder is readable by grain (`PackedSource`, or `grain.sources.ArrayRecordDataSource` on the
shards + `decode_record`) and by TFDS without TensorFlow (`tfds.builder_from_directory(OUT).as_data_source()`):
it holds the shards under TFDS's file naming, TFDS's `dataset_info.json` / `features.json`, `lengths.npy`
(the sampler's modality lengths) and `mgjax_data.json` (counts, shards, what was skipped and why).
Image bytes are stored as they were on disk (no re-encoding); each is fully decoded once here so that a
corrupt file is skipped now rather than at training time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgjax.data.image import load_image
from mgjax.data.records import BadRecord, BadRecords, modality_length, read_records
from mgjax.data.sources import (DATASET_NAME, LENGTHS, METADATA, SHARD_TEMPLATE, SPLIT, encode_record,
                                shard_name)
from mgjax.errors import MGJaxError


@dataclass
class PackSummary:
    out: Path
    records: int
    shards: int
    bytes: int
    skipped: dict[str, int]

    def line(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return (f"packed {self.records} records ({self.bytes / 1e6:.1f} MB) into {self.shards} shard(s) in "
                f"{self.out}; skipped: {skipped}")


def _read_images(record: dict, root: Path) -> list[bytes]:
    """The image files' bytes, each checked to decode (raises BadRecord)."""
    out = []
    for name in record["images"]:
        path = root / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BadRecord("missing_image", f"{path}: {e.strerror or e}") from None
        try:
            load_image(data)
        except MGJaxError as e:
            raise BadRecord("corrupt_image", f"{path}: {e}") from None
        out.append(data)
    return out


def _image_bytes(records: list[dict], root: Path) -> int:
    """About what packing `records` writes: their image files, which are stored as they are."""
    return sum((root / name).stat().st_size for r in records for name in r["images"] if (root / name).is_file())


def _write_tfds_metadata(folder: Path, shard_lengths: list[int], num_bytes: int) -> None:
    """dataset_info.json + features.json, so that TFDS reads the shards (its numpy path needs no TensorFlow)."""
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "conversations": tfds.features.Text(doc="the LLaVA-format turns, as JSON"),
        "image_names": tfds.features.Sequence(tfds.features.Text()),
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_),
                                         doc="the image files' bytes, as they were on disk"),
    })
    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes, filename_template=None)
    tfds.folder_dataset.write_metadata(data_dir=folder, features=features, split_infos=[split],
                                       filename_template=SHARD_TEMPLATE, check_data=False,
                                       description="MGM training conversations with their images (mgjax data pack)")


def pack(json_path: str | os.PathLike, image_root: str | os.PathLike, out: str | os.PathLike, *,
         shard_size: int = 10000, overwrite: bool = False) -> PackSummary:
    """Writes the packed folder `out` atomically (a temporary folder beside it, renamed when complete)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from mgjax.convert.mgjax_ckpt import atomic_output
    from mgjax.progress import Progress

    root, out = Path(image_root), Path(out)
    if not root.is_dir():
        raise MGJaxError(f"{root}: image folder not found")
    if shard_size < 1:
        raise MGJaxError(f"shard size {shard_size}: must be a positive number of records")
    bad = BadRecords(f"pack {json_path}")
    records = list(read_records(json_path, bad))
    lengths, shard_lengths, total_bytes = [], [], 0
    with atomic_output(out, overwrite, needs=lambda: _image_bytes(records, root)) as tmp:
        progress = Progress(f"pack {Path(json_path).name}", len(records), unit="records")
        writer = None
        for record in records:
            try:
                images = _read_images(record, root)
            except BadRecord as e:
                bad.add(record["id"], e.reason, e.detail)
                progress.update(1)
                continue
            if writer is None or shard_lengths[-1] == shard_size:
                if writer is not None:
                    writer.close()
                # Final names need the shard count: numbered now, renamed once it is known.
                writer = ArrayRecordWriter(str(tmp / f"shard-{len(shard_lengths):05d}"), "group_size:1")
                shard_lengths.append(0)
            data = encode_record(record["id"], record["conversations"], record["images"], images)
            writer.write(data)
            shard_lengths[-1] += 1
            total_bytes += len(data)
            lengths.append(modality_length(record))
            progress.update(1, len(data))
        progress.close()
        if writer is None:
            raise MGJaxError(f"{json_path}: no usable record (skipped: {bad.summary()}); see the log for each id")
        writer.close()
        shards = [shard_name(i, len(shard_lengths)) for i in range(len(shard_lengths))]
        for i, name in enumerate(shards):
            (tmp / f"shard-{i:05d}").rename(tmp / name)
        np.save(tmp / LENGTHS, np.asarray(lengths, np.int32))
        _write_tfds_metadata(tmp, shard_lengths, total_bytes)
        meta = {"format": "mgjax-data", "version": 1, "name": DATASET_NAME, "split": SPLIT,
                "num_records": len(lengths), "shards": shards, "shard_lengths": shard_lengths,
                "source": str(Path(json_path).resolve()), "image_root": str(root.resolve()),
                "skipped": dict(sorted(bad.counts.items()))}
        (tmp / METADATA).write_text(json.dumps(meta, indent=1))
    return PackSummary(out, len(lengths), len(shards), total_bytes, dict(bad.counts))
