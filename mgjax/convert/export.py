"""`mgjax export`: an mgjax checkpoint folder or a training run -> the released layout (config.json,
indexed safetensors, tokenizer files), one parameter in host memory at a time."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from mgjax.checkpoint import saved_shapes
from mgjax.config import MGMConfig
from mgjax.convert.mgjax_ckpt import GROUP_BYTES, PARAMS, SIDE_FILES, atomic_output, read_meta, restore_leaves
from mgjax.convert.names import ParamSpec, is_buffer, param_specs
from mgjax.convert.readers import Reader
from mgjax.convert.source import TOWERS
from mgjax.errors import MGJaxError
from mgjax.progress import Progress

_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}


def _export_order(spec: ParamSpec) -> int:
    """Towers, mining and projector first: the original loader needs CLIP's tensors in the shard
    that holds `vlm_uni_*` (it strict-loads CLIP from the shards that contain a vlm_uni key)."""
    return 1 if spec.path[0] == "llm" else 0


@dataclass
class _Weights:
    """An mgjax model's tensors as export reads them: from an mgjax checkpoint folder or a training run."""

    config: MGMConfig
    dtype: str  # what the parameters were saved as (the default export dtype)
    hf_config: dict  # config.json to write
    params: dict  # the parameter tree (anything with .shape at the leaves)
    unused: dict  # released tensors mgjax does not use: flat name -> array with .shape
    # (leaves, dtype) -> their values: a leaf is (("params", *path) or ("unused", name), shape)
    read: Callable[[list[tuple[tuple[str, ...], tuple[int, ...]]], np.dtype], list[np.ndarray]]
    side_dir: Path  # where the tokenizer files are
    towers: dict  # where each tower's weights came from (`Source.tower_sources`; {} from older mgjax)
    trained: frozenset = frozenset()  # the towers (top-level names) a training run changed


def _tower_flags(weights: _Weights) -> dict:
    """The config.json flags, set as the original's training sets them, that make a loader (the original's
    or mgjax's) take each tower from where the exported weights are, so that export -> load gives them
    back: `optimize_vision_tower_aux` is false only for a ConvNeXt read from its folder and not trained
    (the loader reads that folder again: config.json keeps naming it); CLIP is read from the checkpoint
    whatever the flags say (its copy goes into the vlm_uni_* shard)."""
    out = {}
    for tower in TOWERS:
        record = weights.towers.get(tower.arg)
        if record is None:  # a checkpoint converted before mgjax recorded tower sources: as it was
            continue
        from_folder = record.get("weights") == "folder" and tower.arg not in weights.trained
        if tower.flag:
            out[tower.flag] = not from_folder
        elif tower.arg in weights.trained:
            out["optimize_vision_tower"] = True
    return out


def _checkpoint_weights(ckpt: Path) -> _Weights:
    config, meta = read_meta(ckpt)
    saved = saved_shapes(ckpt / PARAMS)
    unused = traverse_util.flatten_dict(saved.get("unused", {}), sep=".")
    def read(leaves, dt):  # unused names are dotted paths of the saved tree
        return restore_leaves(ckpt, [((kind, *(rest if kind == "params" else rest[0].split("."))), shape)
                                     for (kind, *rest), shape in leaves], dt)

    return _Weights(config, meta["dtype"], meta["hf_config"], saved["params"], unused, read, ckpt,
                    meta.get("towers", {}))


def _run_weights(run: Path, read: Callable[[dict], dict]) -> _Weights:
    """A run of `mgjax train`: config.json is the one of the checkpoint the run started from (if any),
    updated with the run's model config. The tower tensors mgjax never reads (CLIP's last layer, ...) come
    from the tower folders the run read its towers from, when they are still there."""
    from mgjax.config import config_to_hf
    from mgjax.model import MGM, abstract_params
    from mgjax.train.step import is_trainable

    config, meta = read_meta(run)
    params = abstract_params(MGM(config))
    used = {k for s in param_specs(params, config) for k in s.torch_keys}
    unused: dict[str, Reader] = {}
    for tower in TOWERS:
        folder = meta.get("towers", {}).get(tower.arg, {}).get("folder")
        if folder and Path(folder).is_dir():
            reader = tower.open_folder(Path(folder))[1]
            unused.update({k: reader for k in reader.keys() if k not in used and not is_buffer(k)})
    trained = frozenset(top for top in params for p in traverse_util.flatten_dict(params[top])
                        if is_trainable((top, *p), meta.get("trainable", ())))

    def read_leaves(leaves, dt):
        wanted = {tuple(path): shape for (kind, *path), shape in leaves if kind == "params"}
        abstract = traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(s, dt) for p, s in wanted.items()})
        got = traverse_util.flatten_dict(read(abstract)) if wanted else {}
        return [np.asarray(got[tuple(path)]) if kind == "params" else np.asarray(unused[path[0]].get(path[0]), dt)
                for (kind, *path), _ in leaves]

    return _Weights(config, meta["dtype"], {**meta.get("hf_config", {}), **config_to_hf(config)}, params,
                    {k: jax.ShapeDtypeStruct(r.shape(k), np.float32) for k, r in unused.items()}, read_leaves,
                    Path(meta["tokenizer"]), meta.get("towers", {}), trained)


def export(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
           max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> Path:
    """mgjax checkpoint folder, or a run_dir of `mgjax train` (its newest complete step) -> released layout:
    config.json, indexed safetensors, tokenizer files."""
    from mgjax.train.checkpoints import is_run_dir, run_param_reader

    ckpt = Path(ckpt)
    if not is_run_dir(ckpt):
        return _export(ckpt, _checkpoint_weights(ckpt), out, dtype, max_shard_bytes, overwrite)
    with run_param_reader(ckpt) as (_, read):
        return _export(ckpt, _run_weights(ckpt, read), out, dtype, max_shard_bytes, overwrite)


def _export(ckpt: Path, weights: _Weights, out: str | os.PathLike, dtype: str | None, max_shard_bytes: int,
            overwrite: bool) -> Path:
    out = Path(out)
    dt = np.dtype(dtype or weights.dtype)
    if dt not in _ST_NAMES:
        raise MGJaxError(f"export dtype {dt.name} is not one of float32, float16, bfloat16")
    specs = sorted(param_specs(weights.params, weights.config), key=_export_order)
    unused = sorted(weights.unused.items())

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
    with atomic_output(out, overwrite, needs=lambda: total_bytes) as tmp, \
            Progress(f"export {ckpt.name}", len(units), total_bytes, "parameters") as progress:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            entries = [(k, shape) for u in shard for k, shape in u[2]]
            written = _write_safetensors(tmp / name, entries, dt, _tensors(weights, shard, dt))
            total += written
            progress.update(len(shard), written)
            weight_map.update({k: name for k, _ in entries})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = {**weights.hf_config, **_tower_flags(weights), "torch_dtype": dt.name}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for name in SIDE_FILES:
            if (weights.side_dir / name).is_file():
                shutil.copy2(weights.side_dir / name, tmp / name)
    return out


def _tensors(weights: _Weights, shard: list, dt) -> Iterator[np.ndarray]:
    """The shard's tensors in order, read about GROUP_BYTES at a time (one read per group: a read has a
    fixed cost, which small models would otherwise pay per tensor)."""
    group, size = [], 0
    for i, (kind, what, entries) in enumerate(shard):
        shape = what.shape if kind == "param" else entries[0][1]
        group.append((kind, what, shape))
        size += int(np.prod(shape)) * dt.itemsize
        if size < GROUP_BYTES and i < len(shard) - 1:
            continue
        values = weights.read([(("params", *what.path) if kind == "param" else ("unused", what), shape)
                               for kind, what, shape in group], dt)
        for (kind, what, _), value in zip(group, values):
            yield from what.to_torch(value) if kind == "param" else (value,)
        group, size = [], 0


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
