"""`mgjax export`: an mgjax checkpoint folder or a training run -> the released layout (config.json,
indexed safetensors, tokenizer files), one parameter in host memory at a time."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from mgjax.checkpoint import saved_shapes
from mgjax.config import MGMConfig
from mgjax.convert.mgjax_ckpt import GROUP_BYTES, PARAMS, SIDE_FILES, atomic_output, read_meta, restore_leaves
from mgjax.convert.names import ParamSpec, is_buffer, param_specs
from mgjax.convert.readers import Reader
from mgjax.convert.source import NON_LORA_FILE, TOWERS
from mgjax.errors import MGJaxError
from mgjax.lora import PEFT_PREFIX, adapter_paths, is_adapter, merged_params, peft_config, peft_target_modules
from mgjax.model import MGM, abstract_params
from mgjax.quant import SCALE_SUFFIX, dequantize_params, matrix_layout
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


def _plain_reader(config: MGMConfig, read: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """`read` of a run with LoRA adapters (and a quantised base) turned into a reader of the plain model's
    parameters: each adapted weight dequantised (`quant.dequantize_params`) and merged with its adapters
    (`lora.merged_params`), in float32."""
    run_shapes = traverse_util.flatten_dict(abstract_params(MGM(config)))
    lm = config.lm

    def stored(path):  # what the run holds: quantised integers as they are, floats as float32
        a = run_shapes[path]
        return jax.ShapeDtypeStruct(a.shape, np.float32 if np.issubdtype(a.dtype, np.floating) else a.dtype)

    def read_plain(abstract: dict) -> dict:
        wanted = traverse_util.flatten_dict(abstract)
        need, floats = {}, {}  # what the run holds of them; the same as float32 (dequantised)
        for p, a in wanted.items():
            adapters = [q for q in adapter_paths(p) if q in run_shapes]
            scales = [(*p[:-1], p[-1] + SCALE_SUFFIX)] if lm.quant != "none" and matrix_layout(p) else []
            need.update({q: stored(q) for q in (p, *adapters, *scales)})
            floats.update({p: jax.ShapeDtypeStruct(a.shape, np.float32), **{q: stored(q) for q in adapters}})
        got = read(traverse_util.unflatten_dict(need))
        if lm.quant != "none":
            got = dequantize_params(got, lm.quant, traverse_util.unflatten_dict(floats))
        return jax.tree.map(lambda a, v: np.asarray(v, a.dtype), abstract, merged_params(got, lm.lora.scale))

    return read_plain


def _run_weights(run: Path, read: Callable[[dict], dict], merge_lora: bool = False) -> _Weights:
    """A run of `mgjax train`: config.json is the one of the checkpoint the run started from (if any),
    updated with the run's model config. The tower tensors mgjax never reads (CLIP's last layer, ...) come
    from the tower folders the run read its towers from, when they are still there. A LoRA run's
    adapters are merged into the weights they adapt (`merge_lora`: the run must say so)."""
    from mgjax.config import config_to_hf
    from mgjax.train.step import is_trainable

    config, meta = read_meta(run)
    if config.lm.lora is not None:
        if not merge_lora:
            raise MGJaxError(f"{run} trained LoRA adapters: pass --merge-lora for the merged model in the released "
                             "layout, or --lora-only for the adapters in PEFT's layout")
        read, config = _plain_reader(config, read), config.plain()
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
           max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False, merge_lora: bool = False,
           lora_only: bool = False) -> Path:
    """mgjax checkpoint folder, or a run_dir of `mgjax train` (its newest complete step) -> released layout:
    config.json, indexed safetensors, tokenizer files. A LoRA run: `merge_lora` writes the merged model so,
    `lora_only` the adapters in PEFT's layout (`export_adapters`)."""
    from mgjax.train.checkpoints import is_run_dir, run_param_reader

    ckpt = Path(ckpt)
    if merge_lora and lora_only:
        raise MGJaxError("export: --merge-lora and --lora-only exclude each other")
    lora = is_run_dir(ckpt) and read_meta(ckpt)[0].lm.lora is not None
    if (merge_lora or lora_only) and not lora:
        raise MGJaxError(f"export: {ckpt} holds no LoRA adapters (only a run of mgjax train with model.lora does); "
                         "drop --merge-lora / --lora-only")
    if not is_run_dir(ckpt):
        return _export(ckpt, _checkpoint_weights(ckpt), out, dtype, max_shard_bytes, overwrite)
    with run_param_reader(ckpt) as (_, read):
        if lora_only:
            return export_adapters(ckpt, read, out, dtype, overwrite)
        return _export(ckpt, _run_weights(ckpt, read, merge_lora), out, dtype, max_shard_bytes, overwrite)


def export_adapters(run: Path, read: Callable[[dict], dict], out: str | os.PathLike, dtype: str | None,
                    overwrite: bool) -> Path:
    """A LoRA run's adapters as the original's LoRA training saves them (`write_adapters`)."""
    config, meta = read_meta(run)
    return write_adapters(out, config, read, meta.get("trainable", ()), meta.get("hf_config", {}), _base_model(run),
                          dtype, overwrite)


def write_adapters(out: str | os.PathLike, config: MGMConfig, read: Callable[[dict], dict], trainable: Sequence[str],
                   hf_config: dict, base: str, dtype: str | None = None, overwrite: bool = False) -> Path:
    """The adapters of a model with `config.lm.lora` in PEFT's layout, as the original's LoRA training saves them:
    adapter_config.json and adapter_model.safetensors (`base_model.model.{name}.lora_A.weight` [r, in],
    `...lora_B.weight` [out, r]) that HF PEFT loads onto the base model, the model's config.json (`hf_config`
    updated), and non_lora_trainables.bin with the other parameters under a `trainable` prefix (projector,
    mining; written with torch), which the original's loader and `load_pretrained` (with `base_llm`) read with
    the base model. `read(abstract)` gives the parameters of an abstract subtree; `base` names the base model."""
    from mgjax.config import config_to_hf
    from mgjax.train.step import has_prefix

    dt = np.dtype(dtype or "float32")
    if dt not in _ST_NAMES:
        raise MGJaxError(f"export dtype {dt.name} is not one of float32, float16, bfloat16")
    shapes = traverse_util.flatten_dict(abstract_params(MGM(config)))
    adapters = traverse_util.unflatten_dict({p: a for p, a in shapes.items() if is_adapter(p)})
    others = traverse_util.unflatten_dict({p: a for p, a in shapes.items()
                                           if not is_adapter(p) and has_prefix(p, trainable)})

    def tensors(tree):  # released name -> value (torch layout) of the leaves of `tree`, one read
        values = traverse_util.flatten_dict(read(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32),
                                                              tree)))
        return {PEFT_PREFIX + k: t for s in param_specs(tree, config)
                for k, t in zip(s.torch_keys, s.to_torch(np.asarray(values[s.path])))}

    nbytes = sum(int(np.prod(a.shape)) for a in jax.tree.leaves((adapters, others))) * dt.itemsize
    with atomic_output(Path(out), overwrite, needs=lambda: nbytes) as tmp:
        lora = tensors(adapters)
        _write_safetensors(tmp / "adapter_model.safetensors", [(k, t.shape) for k, t in lora.items()], dt,
                           iter(lora.values()))
        (tmp / "adapter_config.json").write_text(json.dumps(
            peft_config(config.lm.lora, peft_target_modules(adapters, config), base), indent=2))
        hf = {**hf_config, **config_to_hf(config.plain()), "torch_dtype": dt.name}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if jax.tree.leaves(others):
            _save_torch(tmp / NON_LORA_FILE, tensors(others), dt)
    return Path(out)


def _base_model(run: Path) -> str:
    """What a run's adapters apply to: its train config's model.init or model.base_llm ("" when neither)."""
    import yaml

    try:
        model = yaml.safe_load((run / "train_config.yaml").read_text()).get("model", {})
    except (OSError, ValueError, AttributeError):
        return ""
    return str(model.get("init") or model.get("base_llm") or "")


def _save_torch(path: Path, tensors: dict[str, np.ndarray], dt: np.dtype) -> None:
    try:
        import torch
    except ImportError:
        raise MGJaxError(f"writing {path.name} (the run's trained projector and mining, as the original saves them) "
                         "needs PyTorch: pip install 'mgjax[torch]'") from None
    to = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dt.name]
    torch.save({k: torch.from_numpy(np.array(t, np.float32)).to(to) for k, t in tensors.items()}, path)


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
