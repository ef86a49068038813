"""Lazy tensor readers for safetensors (single or indexed) and torch `.bin` files.

Tensors are read one at a time as NumPy arrays (bfloat16 through `ml_dtypes`), so a loader never
holds more than one tensor beyond what it keeps. Safetensors files are checked against their
header when opened, so a truncated download fails with the file's name instead of bad numbers.

Every reader has the `Reader` interface: files, checkpoint folders and views (renamed, merged) alike,
so the loader never asks which one it holds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Protocol

import ml_dtypes
import numpy as np

from mgjax.errors import MGJaxError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class Reader(Protocol):
    """Named tensors, read one at a time."""

    where: Path | str  # what the reader reads, for messages

    def keys(self) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> np.ndarray: ...
    def source(self, key: str) -> Path | str: ...  # the file holding `key`, for messages


class _File:
    """A single file holding every tensor it names."""

    path: Path
    _tensors: dict  # name -> header entry or tensor

    @property
    def where(self) -> Path:
        return self.path

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def source(self, key: str) -> Path:
        return self.path


class SafetensorsFile(_File):
    """One `.safetensors` file: header parsed and checked when opened, each tensor read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MGJaxError(f"{self.path}: not a safetensors file (only {size} bytes); re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise MGJaxError(f"{self.path}: header claims {n} bytes but the file has {size}: "
                                 "truncated or not safetensors; re-download it")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise MGJaxError(f"{self.path}: unreadable safetensors header ({e}); re-download it") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._tensors = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._base + end > size:
            raise MGJaxError(f"{self.path}: truncated: its header needs {self._base + end} bytes, the file has "
                             f"{size}; re-download it")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        e = self._tensors[key]
        if e["dtype"] not in _ST_DTYPES:
            raise MGJaxError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        # A private buffer per tensor, not a view of a memory map: mapped pages of the file would stay in
        # this process's resident set (a 7B checkpoint's 14 GB) until the map is dropped.
        buf = np.empty(end - start, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(memoryview(buf)) != end - start:
                raise MGJaxError(f"{self.path}: tensor {key!r} is cut short; re-download the file")
        return buf.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])


class TorchFile(_File):
    """One torch pickle (`pytorch_model*.bin`, `open_clip_pytorch_model.bin`, `mm_projector.bin`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            import torch
        except ImportError:
            raise MGJaxError(f"{self.path}: reading .bin files needs PyTorch: pip install 'mgjax[torch]'") from None
        self._torch = torch
        try:
            sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise MGJaxError(f"{self.path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e}); "
                             "it may be truncated: re-download it") from None
        for nest in ("state_dict", "model"):  # training checkpoints nest the weights
            if isinstance(sd, dict) and isinstance(sd.get(nest), dict):
                sd = sd[nest]
        self._tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> np.ndarray:
        t = self._tensors[key].detach()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def open_file(path: Path) -> SafetensorsFile | TorchFile:
    path = Path(path)
    if not path.is_file():
        raise MGJaxError(f"{path}: file not found")
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchFile(path)


class Checkpoint:
    """All tensors of a checkpoint folder (or one file), by name, opened lazily per file."""

    INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
    SINGLES = ("model.safetensors", "pytorch_model.bin")

    def __init__(self, files: dict[str, Path], where: Path):
        self.where = where
        self._file_of = files  # key -> file path
        self._open: dict[Path, Reader] = {}

    @classmethod
    def from_folder(cls, folder: Path, singles: Iterable[str] = SINGLES) -> "Checkpoint":
        folder = Path(folder)
        for name in cls.INDEXES:
            index = folder / name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise MGJaxError(f"{index}: not a valid index file ({e})") from None
                missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
                if missing:
                    raise MGJaxError(f"{index} lists shards that are missing from {folder}: {', '.join(missing)}")
                ckpt = cls({k: folder / f for k, f in weight_map.items()}, folder)
                ckpt._check_index()
                return ckpt
        for name in singles:
            if (folder / name).is_file():
                return cls.from_file(folder / name)
        raise MGJaxError(f"{folder}: no weights found (looked for {', '.join(cls.INDEXES + tuple(singles))})")

    @classmethod
    def from_file(cls, path: Path) -> "Checkpoint":
        f = open_file(path)
        ckpt = cls({k: Path(path) for k in f.keys()}, Path(path))
        ckpt._open[Path(path)] = f
        return ckpt

    def _file(self, path: Path) -> Reader:
        if path not in self._open:
            self._open[path] = open_file(path)
        return self._open[path]

    def _check_index(self):
        """Every key the index names must be in the shard it names (catches stale or mixed downloads)."""
        by_file: dict[Path, list[str]] = {}
        for k, p in self._file_of.items():
            by_file.setdefault(p, []).append(k)
        for p, keys in by_file.items():
            have = set(self._file(p).keys())
            lost = [k for k in keys if k not in have]
            if lost:
                raise MGJaxError(f"{p}: the index says it holds {len(lost)} tensors it does not have, "
                                 f"e.g. {lost[:3]}; re-download the checkpoint")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(self._file_of[key]).shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._file(self._file_of[key]).get(key)

    def source(self, key: str) -> Path:
        return self._file_of[key]


class View:
    """Tensors of other readers under (possibly) other names: `routes` maps a view name to (reader,
    name in that reader)."""

    def __init__(self, routes: dict[str, tuple[Reader, str]], where: Path | str):
        self.where = where
        self._routes = routes

    @classmethod
    def renamed(cls, reader: Reader, prefixes: dict[str, str]) -> "View":
        """`reader` with `prefixes` (view prefix -> source prefix) swapped; names outside the mapped
        prefixes are hidden (a tower file's heads and text towers)."""
        return cls({view + k[len(src):]: (reader, k) for k in reader.keys()
                    for view, src in prefixes.items() if k.startswith(src)}, reader.where)

    @classmethod
    def merged(cls, readers: list[Reader]) -> "View":
        """Several readers as one; a tensor name present in two of them is an error."""
        routes: dict[str, tuple[Reader, str]] = {}
        for r in readers:
            for k in r.keys():
                if k in routes:
                    raise MGJaxError(f"tensor {k!r} is in both {routes[k][0].source(k)} and {r.source(k)}")
                routes[k] = (r, k)
        return cls(routes, readers[0].where)

    def keys(self) -> list[str]:
        return list(self._routes)

    def __contains__(self, key: str) -> bool:
        return key in self._routes

    def shape(self, key: str) -> tuple[int, ...]:
        reader, k = self._routes[key]
        return reader.shape(k)

    def get(self, key: str) -> np.ndarray:
        reader, k = self._routes[key]
        return reader.get(k)

    def source(self, key: str) -> Path | str:
        reader, k = self._routes[key]
        return reader.source(k)
