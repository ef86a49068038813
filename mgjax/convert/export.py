"""`mgjax export`: an mgjax checkpoint folder -> the released layout (config.json, indexed safetensors,
tokenizer files), one parameter in host memory at a time."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
from flax import traverse_util

from mgjax.checkpoint import saved_shapes
from mgjax.convert.mgjax_ckpt import PARAMS, SIDE_FILES, atomic_output, read_meta, restore_leaf
from mgjax.convert.names import ParamSpec, param_specs
from mgjax.errors import MGJaxError
from mgjax.progress import Progress

_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}


def _export_order(spec: ParamSpec) -> int:
    """Towers, mining and projector first: the original loader needs CLIP's tensors in the shard
    that holds `vlm_uni_*` (it strict-loads CLIP from the shards that contain a vlm_uni key)."""
    return 1 if spec.path[0] == "llm" else 0


def export(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
           max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> Path:
    """mgjax checkpoint folder -> released layout: config.json, indexed safetensors, tokenizer files."""
    ckpt, out = Path(ckpt), Path(out)
    config, meta = read_meta(ckpt)
    saved = saved_shapes(ckpt / PARAMS)
    dt = np.dtype(dtype or meta["dtype"])
    if dt not in _ST_NAMES:
        raise MGJaxError(f"export dtype {dt.name} is not one of float32, float16, bfloat16")
    specs = sorted(param_specs(saved["params"], config), key=_export_order)
    unused = sorted(traverse_util.flatten_dict(saved.get("unused", {}), sep=".").items())

    # Units are written whole into one shard: a parameter (all its stacked tensors) or an unused tensor.
    units = [("param", s, [(k, s.torch_shape()) for k in s.torch_keys]) for s in specs]
    units += [("unused", k, [(k, tuple(a.shape))]) for k, a in unused]
    shards: list[list] = [[]]
    size = 0
    for u in units:
        nbytes = sum(int(np.prod(shape)) for _, shape in u[2]) * dt.itemsize
        first_shard_unit = u[0] == "unused" or _export_order(u[1]) == 0
        if shards[-1] and size + nbytes > max_shard_bytes and not first_shard_unit:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += nbytes

    total_bytes = sum(int(np.prod(shape)) for u in units for _, shape in u[2]) * dt.itemsize
    with atomic_output(out, overwrite) as tmp, Progress(f"export {ckpt.name}", len(units), total_bytes,
                                                        "parameters") as progress:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            entries = [(k, shape) for u in shard for k, shape in u[2]]
            written = _write_safetensors(tmp / name, entries, dt, _tensors(ckpt, shard, dt))
            total += written
            progress.update(len(shard), written)
            weight_map.update({k: name for k, _ in entries})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = dict(meta["hf_config"])
        hf["torch_dtype"] = dt.name
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for name in SIDE_FILES:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
    return out


def _tensors(ckpt: Path, shard: list, dt) -> Iterator[np.ndarray]:
    """The shard's tensors in order, restoring one parameter at a time."""
    for kind, what, entries in shard:
        if kind == "param":
            yield from what.to_torch(restore_leaf(ckpt, ("params", *what.path), what.shape, dt))
        else:
            yield restore_leaf(ckpt, ("unused", *what.split(".")), entries[0][1], dt)


def _write_safetensors(path: Path, entries: list[tuple[str, tuple]], dt, tensors: Iterator[np.ndarray]) -> int:
    """Streams `tensors` (in `entries` order) into a safetensors file; returns the data size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, shape in entries:
        n = int(np.prod(shape)) * dt.itemsize
        header[k] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (k, shape), t in zip(entries, tensors, strict=True):
            if tuple(t.shape) != tuple(shape):
                raise MGJaxError(f"export: tensor {k} has shape {t.shape}, planned {shape}")
            f.write(np.ascontiguousarray(t, dtype=dt).tobytes())
    return offset
