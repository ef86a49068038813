"""Random-access sources of training records: a JSON file with an image folder, or packed ArrayRecord shards.

Every source has `len(source)`, `source[i]` -> `{"id", "images", "conversations"}` and `source.lengths`
(int32 [len], the original's modality lengths: word counts, negative for text-only samples), which the
sampler groups by without reading the records.

A packed record is a `tf.train.Example` (the proto TFDS writes and reads, built here without TensorFlow):
`id` and `conversations` (JSON) as text, `image_names` and `images` (the image files' bytes, as they
were on disk) as lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mgjax.data.records import BadRecords, modality_length, read_records
from mgjax.errors import MGJaxError

METADATA = "mgjax_data.json"
LENGTHS = "lengths.npy"
DATASET_NAME = "mgm"
SPLIT = "train"
# TFDS's default file naming, so that `tfds.builder_from_directory(OUT)` finds the shards.
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def shard_name(index: int, count: int) -> str:
    return f"{DATASET_NAME}-{SPLIT}.array_record-{index:05d}-of-{count:05d}"


def encode_record(record_id: str, conversations: list, image_names: list[str], images: list[bytes]) -> bytes:
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2  # vendored by TFDS: no TensorFlow

    def feature(values: list[bytes]):
        return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=values))

    return tf_example_pb2.Example(features=tf_feature_pb2.Features(feature={
        "id": feature([record_id.encode()]),
        "conversations": feature([json.dumps(conversations, ensure_ascii=False).encode()]),
        "image_names": feature([n.encode() for n in image_names]),
        "images": feature(list(images)),
    })).SerializeToString()


def decode_record(data: bytes) -> dict:
    from tensorflow_datasets.proto import tf_example_pb2

    f = tf_example_pb2.Example.FromString(data).features.feature
    return {"id": f["id"].bytes_list.value[0].decode(),
            "conversations": json.loads(f["conversations"].bytes_list.value[0]),
            "image_names": [n.decode() for n in f["image_names"].bytes_list.value],
            "images": list(f["images"].bytes_list.value)}


class JsonSource:
    """Records of a LLaVA/MGM JSON (or JSONL) file; images are read from `image_root` when a record is loaded
    (a missing or corrupt image is then a bad record of the pipeline). Malformed records are skipped at
    construction and counted in `self.bad`."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike):
        root = Path(image_root)
        if not root.is_dir():
            raise MGJaxError(f"{root}: image folder not found")
        self.bad = BadRecords(str(path))
        self._records = list(read_records(path, self.bad))
        for r in self._records:
            r["images"] = [str(root / p) for p in r["images"]]
        self.lengths = np.asarray([modality_length(r) for r in self._records], np.int32)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[index]


class PackedSource:
    """A folder written by `mgjax data pack`, read with grain's ArrayRecordDataSource."""

    def __init__(self, folder: str | os.PathLike):
        import grain

        folder = Path(folder)
        meta_path = folder / METADATA
        if not meta_path.is_file():
            raise MGJaxError(f"{folder}: not a packed data folder (no {METADATA}); write one with `mgjax data pack`")
        self.meta = json.loads(meta_path.read_text())
        paths = [folder / s for s in self.meta["shards"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MGJaxError(f"{folder}: shard(s) missing: {', '.join(missing)}; re-run `mgjax data pack`")
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        self.lengths = np.load(folder / LENGTHS)
        if len(self.lengths) != len(self._source) or len(self._source) != self.meta["num_records"]:
            raise MGJaxError(f"{folder}: {len(self._source)} records in the shards, {len(self.lengths)} lengths and "
                             f"{self.meta['num_records']} in {METADATA}; the folder is damaged: re-run `mgjax data "
                             "pack`")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return decode_record(self._source[index % len(self)])
