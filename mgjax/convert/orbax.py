"""`mgjax convert` (released PyTorch layout -> Orbax) and `mgjax export` (Orbax -> released layout).

An mgjax checkpoint folder holds:
  params/             Orbax checkpoint of {"params": <mgjax tree>, "unused": <tensors on the ignore list>}
  mgjax_config.json   the MGMConfig (parameter layout included), dtype, and the source config.json
  tokenizer files     and generation_config.json, copied from the source

Both directions stream: one parameter group is in host memory at a time. `unused` keeps the tensors
that mgjax never reads (CLIP's last layer, ...) so that `export` gives back every source tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mgjax.checkpoint import restore, save_streaming, saved_shapes
from mgjax.config import MGMConfig, config_from_dict, config_to_dict
from mgjax.convert.load import Source, open_source, unflatten
from mgjax.convert.names import ParamSpec, param_specs
from mgjax.data.templates import get_template
from mgjax.data.tokenize import checkpoint_template
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params
from mgjax.progress import Progress

MGJAX_CONFIG = "mgjax_config.json"
PARAMS = "params"
FORMAT_VERSION = 1
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


@contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` only when the body completes: an interruption
    at any moment (Ctrl-C, SIGTERM, an error) leaves `out` absent, or as it was, never half-written, and
    the same command can simply be re-run (a stale temporary folder from a killed run is replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MGJaxError(f"{out} exists and is a file; choose a folder path for the output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MGJaxError(f"{out} exists and is not empty; choose a new output folder, or pass --overwrite "
                         "(overwrite=True) to replace it once the new one is complete")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise MGJaxError(f"{out}: cannot write the output there ({e.strerror or e}); choose a writable "
                         "folder") from None
    try:
        yield tmp
        if out.exists():
            old = parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_mgjax_checkpoint(path: Path) -> bool:
    return (Path(path) / MGJAX_CONFIG).is_file()


def read_meta(path: Path) -> tuple[MGMConfig, dict]:
    f = Path(path) / MGJAX_CONFIG
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise MGJaxError(f"{f}: unreadable ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise MGJaxError(f"{f}: format_version {meta.get('format_version')!r}; this mgjax reads {FORMAT_VERSION}")
    return config_from_dict(meta["config"]), meta


def _nest(flat: dict[str, np.ndarray]) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}} (Orbax trees are nested dicts)."""
    return unflatten({tuple(k.split(".")): v for k, v in flat.items()})


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


GROUP_BYTES = 512 * 1024**2


def _shape(shapes: dict, path: tuple[str, ...]) -> tuple[int, ...]:
    for p in path:
        shapes = shapes[p]
    return shapes.shape


def _groups(source: Source, specs: list[ParamSpec], shapes: dict, dtype, progress: Progress,
            group_bytes: int = GROUP_BYTES) -> Iterator[dict]:
    """Parameters in groups of about `group_bytes` (a stacked parameter may be larger), then the
    unused tensors. Each Orbax partial save has a fixed cost, so groups should not be tiny; host
    memory holds one group as jax arrays, plus the NumPy array of the parameter being read."""
    flat, size = {}, 0
    for s in specs:
        shape = _shape(shapes, s.path)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if flat and size + nbytes > group_bytes:
            yield {"params": unflatten(flat)}
            flat, size = {}, 0
        # A jax array at once (one copy, waited for): a group of NumPy arrays converted only when saved
        # peaks higher (7B scanned layout: 8.3 GB instead of 6.1 GB).
        flat[s.path] = jax.block_until_ready(jax.device_put(source.array(s, shape, dtype)))
        size += nbytes
        progress.update(1, nbytes)
    if flat:
        yield {"params": unflatten(flat)}
    unused = source.unused(specs)
    if unused:
        yield {"unused": _nest({k: jax.block_until_ready(jax.device_put(np.asarray(source.ckpt.get(k), dtype)))
                                for k in unused})}


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16", vision_tower=None,
            vision_tower_aux=None, base_llm=None, scan_layers: bool = False, template: str | None = None,
            overwrite: bool = False) -> Path:
    """Released-layout MGM checkpoint (or stage-1 release + `base_llm`) -> mgjax checkpoint folder. The
    conversation template (`template`, else read from the checkpoint like `load_pretrained` does) is
    recorded in mgjax_config.json."""
    src, out = Path(src).resolve(), Path(out)
    source = open_source(src, vision_tower, vision_tower_aux, base_llm)
    if template is None:
        template = checkpoint_template(source.config.lm.family, source.tokenizer_dir, (src, base_llm, src.parent))[0]
    get_template(template)
    config = dataclasses.replace(source.config, template=template,
                                 lm=dataclasses.replace(source.config.lm, scan_layers=scan_layers))
    source.config = config
    dt = jnp.dtype(dtype)
    shapes = abstract_params(MGM(config, dtype=dt, param_dtype=dt))
    specs = source.plan(shapes)
    total = sum(int(np.prod(_shape(shapes, s.path))) for s in specs) * dt.itemsize
    with atomic_output(out, overwrite) as tmp, Progress(f"convert {src.name}", len(specs), total,
                                                        "parameters") as progress:
        save_streaming(tmp / PARAMS, _groups(source, specs, shapes, dt, progress))
        for name in SIDE_FILES:
            for folder in (src, source.tokenizer_dir):
                if (folder / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(folder / name, tmp / name)
        meta = {"format": "mgjax", "format_version": FORMAT_VERSION, "dtype": dt.name,
                "config": config_to_dict(config), "hf_config": source.hf_config, "source": str(src)}
        (tmp / MGJAX_CONFIG).write_text(json.dumps(meta, indent=1))
    return out


def load_params(path: Path, config: MGMConfig, dtype, shardings: dict | None = None) -> dict:
    """The parameter tree of an mgjax checkpoint folder, cast to `dtype`; with `shardings` each
    process reads only its shards, whatever mesh the checkpoint was saved from."""
    shapes = abstract_params(MGM(config, dtype=dtype, param_dtype=dtype))
    if shardings is not None:
        shapes = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return restore(Path(path) / PARAMS, {"params": shapes}, partial=True)["params"]


# --- export -------------------------------------------------------------------------------------

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
    unused = sorted(_flatten(saved.get("unused", {})).items())

    # Units are written whole into one shard: a parameter (all its stacked tensors) or an unused tensor.
    units = [("param", s, [(k, s.torch_shape(_shape(saved["params"], s.path))) for k in s.torch_keys]) for s in specs]
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
            written = _write_safetensors(tmp / name, entries, dt, _tensors(ckpt, shard, saved, dt))
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


def _tensors(ckpt: Path, shard: list, saved: dict, dt) -> Iterator[np.ndarray]:
    """The shard's tensors in order, restoring one parameter at a time."""
    for kind, what, _ in shard:
        if kind == "param":
            leaf = {"params": unflatten({what.path: np.zeros(())})}
            abstract = _abstract_like(leaf, saved, dt)
            value = restore(ckpt / PARAMS, abstract, partial=True)["params"]
            for p in what.path:
                value = value[p]
            yield from what.to_torch(np.asarray(value))
        else:
            abstract = _abstract_like({"unused": _nest({what: np.zeros(())})}, saved, dt)
            value = restore(ckpt / PARAMS, abstract, partial=True)["unused"]
            for p in what.split("."):
                value = value[p]
            yield np.asarray(value)


def _abstract_like(tree: dict, saved: dict, dt) -> dict:
    """The ShapeDtypeStructs of `saved` at the leaves present in `tree`, with dtype `dt`."""
    out = {}
    for k, v in tree.items():
        out[k] = _abstract_like(v, saved[k], dt) if isinstance(v, dict) else \
            type(saved[k])(saved[k].shape, dt)
    return out


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
