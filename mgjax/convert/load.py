"""Fill an mgjax parameter tree from a released MGM checkpoint and its tower folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from mgjax.config import CLIPConfig, ConvNextConfig, MGMConfig, convnext_from_open_clip
from mgjax.convert.names import (CLIP_FOLDER_PREFIXES, CLIP_PREFIX, CONVNEXT_FOLDER_PREFIXES, CONVNEXT_PREFIX,
                                 ignored, param_specs)
from mgjax.convert.readers import Checkpoint, Renamed
from mgjax.errors import MGJaxError


def resolve_tower(name: str, override: str | os.PathLike | None, ckpt_dir: Path) -> tuple[Path | None, list[Path]]:
    """A tower folder: the explicit override, else config.json's (relative) path tried against the
    working directory and the checkpoint's parent folder. Returns (folder or None, paths tried)."""
    if override is not None:
        p = Path(override)
        if not p.is_dir():
            raise MGJaxError(f"tower folder {p} (passed explicitly) does not exist")
        return p, [p]
    if not name:
        return None, []
    tried = [Path(name)] if Path(name).is_absolute() else [Path.cwd() / name, ckpt_dir.parent / name]
    return next((p for p in tried if p.is_dir()), None), tried


def _clip_folder(folder: Path) -> tuple[CLIPConfig, Renamed]:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise MGJaxError(f"CLIP tower folder {folder} has no config.json")
    cfg = CLIPConfig.from_hf(json.loads(cfg_file.read_text()))
    return cfg, Renamed(Checkpoint.from_folder(folder), CLIP_FOLDER_PREFIXES)


def _convnext_folder(folder: Path) -> tuple[ConvNextConfig, Renamed]:
    cfg_file = folder / "open_clip_config.json"
    if not cfg_file.is_file():
        raise MGJaxError(f"ConvNeXt tower folder {folder} has no open_clip_config.json")
    weights = Renamed(Checkpoint.from_folder(folder, singles=("open_clip_pytorch_model.bin",
                                                              "open_clip_model.safetensors")),
                      CONVNEXT_FOLDER_PREFIXES)
    shapes = {k[len(CONVNEXT_PREFIX):].replace("vision_", "", 1): weights.shape(k) for k in weights.keys()}
    return convnext_from_open_clip(json.loads(cfg_file.read_text()), shapes), weights


def _has(ckpt: Checkpoint, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in ckpt.keys())


def read_config(ckpt_dir: Path, vision_tower=None, vision_tower_aux=None):
    """config.json + towers -> (MGMConfig, checkpoint, tower readers {prefix: reader})."""
    cfg_file = ckpt_dir / "config.json"
    if not cfg_file.is_file():
        raise MGJaxError(f"{ckpt_dir}: no config.json: not a released MGM checkpoint folder")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise MGJaxError(f"{cfg_file}: invalid JSON ({e})") from None
    ckpt = Checkpoint.from_folder(ckpt_dir)
    towers = {}
    vision, vision_aux = None, None
    for prefix, key, arg, override, opener in (
            (CLIP_PREFIX, "mm_vision_tower", "vision_tower", vision_tower, _clip_folder),
            (CONVNEXT_PREFIX, "mm_vision_tower_aux", "vision_tower_aux", vision_tower_aux, _convnext_folder)):
        folder, tried = resolve_tower(hf.get(key, ""), override, ckpt_dir)
        in_ckpt = _has(ckpt, prefix)
        if folder is None and not in_ckpt:
            where = ", ".join(str(p) for p in tried) or f"(config.json has no {key!r})"
            raise MGJaxError(f"the {arg} weights are not in {ckpt_dir} and its folder was not found (tried: {where}); "
                             f"pass {arg}=PATH (CLI: --{arg.replace('_', '-')} PATH) pointing at the tower folder")
        tower_cfg = None
        if folder is not None:
            tower_cfg, reader = opener(folder)
            if not in_ckpt:
                towers[prefix] = reader
        if prefix == CLIP_PREFIX:
            vision = tower_cfg
        else:
            vision_aux = tower_cfg
    return MGMConfig.from_hf(hf, vision, vision_aux), ckpt, towers


def load_params(config: MGMConfig, shapes: dict, ckpt: Checkpoint, towers: dict, dtype) -> dict:
    """Every parameter of `shapes` (a tree of ShapeDtypeStructs) read, checked and cast to `dtype`.

    Tower tensors come from the checkpoint when it has them, else from the tower folder readers.
    Missing tensors, unexpected tensors and shape mismatches are errors naming the keys.
    """
    specs = param_specs(shapes, config)

    def source(key):
        for prefix, reader in towers.items():
            if key.startswith(prefix):
                return reader
        return ckpt

    missing = [k for s in specs for k in s.torch_keys if k not in source(k)]
    if missing:
        hint = ""
        if any(k.startswith(("model.vision_tower", "model.vlm_uni", "model.mm_projector")) for k in missing):
            hint = " (a stage-1 or LLM-only checkpoint lacks the towers or the mining weights)"
        raise MGJaxError(f"{ckpt.where}: {len(missing)} parameters have no tensor{hint}: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    used = {k for s in specs for k in s.torch_keys}
    unexpected = [k for k in ckpt.keys() if k not in used and not ignored(k, config)]
    if unexpected:
        raise MGJaxError(f"{ckpt.where}: {len(unexpected)} tensors do not map to any mgjax parameter: "
                         f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}; "
                         "is config.json from the same model?")

    flat = {}
    for s in specs:
        shape = _get(shapes, s.path).shape
        tensors = [source(k).get(k) for k in s.torch_keys]
        try:
            arr = s.to_flax(tensors, shape)
        except ValueError:
            arr = None
        if arr is None or arr.shape != shape:
            k = s.torch_keys[0]
            raise MGJaxError(f"{source(k).source(k)}: tensor {k!r} has shape {tuple(tensors[0].shape)}, "
                             f"which does not fit mgjax parameter {'/'.join(s.path)} {shape}; "
                             "is config.json (or the tower folder's config) from the same model?")
        flat[s.path] = np.asarray(arr, dtype=dtype)
    return _unflatten(flat)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = jax.numpy.asarray(v)
    return out
