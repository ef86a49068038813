"""mgjax checkpoint folders: `mgjax convert` (released PyTorch layout -> Orbax) writes them, loaders read them.

An mgjax checkpoint folder holds:
  params/             Orbax checkpoint of {"params": <mgjax tree>, "unused": <tensors on the ignore list>}
  mgjax_config.json   the MGMConfig (parameter layout included), dtype, and the source config.json
  tokenizer files     and generation_config.json, copied from the source

`convert` streams: one parameter group is in host memory at a time. `unused` keeps the tensors that
mgjax never reads (CLIP's last layer, ...) so that `export` gives back every source tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mgjax import interrupt
from mgjax.checkpoint import restore, save_streaming
from mgjax.config import MGMConfig, config_from_dict, config_to_dict
from mgjax.convert.names import ParamSpec
from mgjax.convert.source import Source, open_source
from mgjax.data.templates import get_template
from mgjax.data.tokenize import checkpoint_template
from mgjax.errors import MGJaxError, no_space, stop_when_full
from mgjax.model import MGM, abstract_params
from mgjax.progress import Progress

MGJAX_CONFIG = "mgjax_config.json"
PARAMS = "params"
FORMAT_VERSION = 1
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


@contextmanager
def atomic_output(out: Path, overwrite: bool = False, *, needs: Callable[[], int]) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` only when the body completes: an interruption
    at any moment (Ctrl-C, SIGTERM, an error) leaves `out` absent, or as it was, never half-written, and
    the same command can simply be re-run (a stale temporary folder from a killed run is replaced). A disk
    that fills up stops it with `DiskFull`, naming `out` and `needs()`, about the bytes the output takes."""
    out = Path(out)
    with stop_when_full(out, needs, "nothing half-written is left: free space and run the same command again"), \
            _atomic_output(out, overwrite) as tmp:
        yield tmp


@contextmanager
def _atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    if out.exists() and not out.is_dir():
        raise MGJaxError(f"{out} exists and is a file; choose a folder path for the output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MGJaxError(f"{out} exists and is not empty; choose a new output folder, or pass --overwrite "
                         "(overwrite=True) to replace it once the new one is complete")
    parent = out.absolute().parent
    tmp = parent / f".{out.name}.partial"
    try:  # from before the folder exists: a signal that lands just after its mkdir must remove it too
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            if no_space(e) is not None:  # reported by atomic_output
                raise
            raise MGJaxError(f"{out}: cannot write the output there ({e.strerror or e}); choose a writable "
                             "folder") from None
        yield tmp
        interrupt.check()  # a Ctrl-C / SIGTERM swallowed while the body ran still stops the rename
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


GROUP_BYTES = 512 * 1024**2


def _groups(source: Source, specs: list[ParamSpec], dtype, progress: Progress,
            group_bytes: int = GROUP_BYTES) -> Iterator[dict]:
    """Parameters in groups of about `group_bytes` (a stacked parameter may be larger), then the
    unused tensors. Each Orbax partial save has a fixed cost, so groups should not be tiny; host
    memory holds one group as jax arrays, plus the NumPy array of the parameter being read."""
    flat, size = {}, 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * np.dtype(dtype).itemsize
        if flat and size + nbytes > group_bytes:
            yield {"params": traverse_util.unflatten_dict(flat)}
            flat, size = {}, 0
        # A jax array at once (one copy, waited for): a group of NumPy arrays converted only when saved
        # peaks higher (7B scanned layout: 8.3 GB instead of 6.1 GB).
        flat[s.path] = jax.block_until_ready(jax.device_put(source.array(s, dtype)))
        size += nbytes
        progress.update(1, nbytes)
    if flat:
        yield {"params": traverse_util.unflatten_dict(flat)}
    unused = source.unused(specs)
    if unused:
        yield {"unused": traverse_util.unflatten_dict(
            {k: jax.block_until_ready(jax.device_put(np.asarray(source.reader(k).get(k), dtype))) for k in unused},
            sep=".")}


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16", vision_tower=None,
            vision_tower_aux=None, base_llm=None, towers_from_checkpoint: bool = False, scan_layers: bool = False,
            template: str | None = None, overwrite: bool = False) -> Path:
    """Released-layout MGM checkpoint (or stage-1 release + `base_llm`) -> mgjax checkpoint folder. The
    towers come from where `load_pretrained` takes them (`source.open_source`); mgjax_config.json records
    where each came from (`towers`) and the conversation template (`template`, else read from the
    checkpoint like `load_pretrained` does)."""
    src, out = Path(src).resolve(), Path(out)
    source = open_source(src, vision_tower, vision_tower_aux, base_llm, towers_from_checkpoint)
    if template is None:
        template = checkpoint_template(source.config.lm.family, source.tokenizer_dir, (src, base_llm, src.parent))[0]
    get_template(template)
    config = dataclasses.replace(source.config, template=template,
                                 lm=dataclasses.replace(source.config.lm, scan_layers=scan_layers))
    source.config = config
    dt = jnp.dtype(dtype)
    shapes = abstract_params(MGM(config, dtype=dt, param_dtype=dt))
    specs = source.plan(shapes)
    total = sum(int(np.prod(s.shape)) for s in specs) * dt.itemsize
    with atomic_output(out, overwrite, needs=lambda: total) as tmp, \
            Progress(f"convert {src.name}", len(specs), total, "parameters") as progress:
        save_streaming(tmp / PARAMS, _groups(source, specs, dt, progress))
        for name in SIDE_FILES:
            for folder in (src, source.tokenizer_dir):
                if (folder / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(folder / name, tmp / name)
        meta = {"format": "mgjax", "format_version": FORMAT_VERSION, "dtype": dt.name,
                "config": config_to_dict(config), "hf_config": source.hf_config, "source": str(src),
                "towers": source.tower_sources}
        (tmp / MGJAX_CONFIG).write_text(json.dumps(meta, indent=1))
    return out


def restore_params(path: Path, shapes: dict, dtype, shardings: dict | None = None) -> dict:
    """The parameters of `shapes` from an mgjax checkpoint folder, cast to `dtype`; with `shardings`
    each process reads only its shards, whatever mesh the checkpoint was saved from."""
    if shardings is None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), shapes)
    else:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), shapes, shardings)
    return restore(Path(path) / PARAMS, {"params": abstract}, partial=True)["params"]


def restore_leaves(path: Path, leaves: list[tuple[tuple[str, ...], tuple[int, ...]]], dtype) -> list[np.ndarray]:
    """Leaves of an mgjax checkpoint folder's saved tree (each a path from its root, e.g. ("params",
    "mm_projector", "0", "kernel") or ("unused", ...), with its shape), cast to `dtype`, in one read."""
    abstract = traverse_util.unflatten_dict({leaf: jax.ShapeDtypeStruct(shape, dtype) for leaf, shape in leaves})
    flat = traverse_util.flatten_dict(restore(Path(path) / PARAMS, abstract, partial=True))
    return [np.asarray(flat[leaf]) for leaf, _ in leaves]
