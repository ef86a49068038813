"""Fill an mgjax parameter tree from a released MGM checkpoint and its tower folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from mgjax.config import CLIPConfig, ConvNextConfig, MGMConfig, convnext_from_open_clip, convnext_from_shapes
from mgjax.convert.names import (CLIP_FOLDER_PREFIXES, CLIP_PREFIX, CONVNEXT_FOLDER_PREFIXES, CONVNEXT_PREFIX,
                                 ignored, param_specs)
from mgjax.convert.readers import Checkpoint, Renamed
from mgjax.errors import MGJaxError


def resolve_tower(name: str, override: str | os.PathLike | None, ckpt_dir: Path,
                  arg: str = "vision_tower") -> tuple[Path | None, list[Path]]:
    """A tower folder: the explicit override, else config.json's (relative) path tried against the
    working directory and the checkpoint's parent folder. Returns (folder or None, paths tried)."""
    if override is not None:
        p = Path(override)
        if not p.is_dir():
            raise MGJaxError(f"{arg}={p}: folder not found; pass the tower folder itself (the one holding the "
                             "tower's config and weights)")
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
    return convnext_from_open_clip(json.loads(cfg_file.read_text()), _trunk_shapes(weights)), weights


def _trunk_shapes(reader) -> dict[str, tuple[int, ...]]:
    """ConvNeXt shapes by trunk-relative name (`stages.2.blocks.5.gamma`)."""
    return {k[len(CONVNEXT_PREFIX):].replace("vision_", "", 1): reader.shape(k)
            for k in reader.keys() if k.startswith(CONVNEXT_PREFIX)}


def _clip_preset_fits(ckpt: Checkpoint, arg: str, tried: list[Path]) -> CLIPConfig:
    """The released CLIP ViT-L/14-336, after checking that the checkpoint's CLIP weights have its shape
    (the tower folder, which would say the architecture, was not found)."""
    cfg = CLIPConfig()
    p = CLIP_PREFIX + "embeddings."
    got = (ckpt.shape(p + "class_embedding")[0], ckpt.shape(p + "patch_embedding.weight")[-1],
           ckpt.shape(p + "position_embedding.weight")[0]) if p + "class_embedding" in ckpt else None
    want = (cfg.hidden_size, cfg.patch_size, cfg.grid**2 + 1)
    if got != want:
        where = ", ".join(str(t) for t in tried) or "config.json names none"
        raise MGJaxError(f"the {arg} folder was not found (tried: {where}), so the released CLIP ViT-L/14-336 "
                         f"was assumed, but the checkpoint's CLIP weights (hidden, patch, positions) are {got} "
                         f"instead of {want}; pass {arg}=PATH (CLI: --{arg.replace('_', '-')} PATH) pointing at "
                         "the tower folder, whose config.json gives the architecture")
    return cfg


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
    if "mm_hidden_size" not in hf:
        raise MGJaxError(f"{cfg_file} has no 'mm_hidden_size': this is a plain LLM config, not an MGM checkpoint; "
                         "point load_pretrained at the MGM checkpoint folder (its config.json has the mm_* keys)")
    ckpt = Checkpoint.from_folder(ckpt_dir)
    towers = {}
    vision, vision_aux = None, None
    for prefix, key, arg, override, opener in (
            (CLIP_PREFIX, "mm_vision_tower", "vision_tower", vision_tower, _clip_folder),
            (CONVNEXT_PREFIX, "mm_vision_tower_aux", "vision_tower_aux", vision_tower_aux, _convnext_folder)):
        folder, tried = resolve_tower(hf.get(key, ""), override, ckpt_dir, arg)
        in_ckpt = _has(ckpt, prefix)
        if folder is None and not in_ckpt:
            where = ", ".join(str(p) for p in tried) or f"(config.json has no {key!r})"
            raise MGJaxError(f"the {arg} weights are not in {ckpt_dir} and its folder was not found (tried: {where}); "
                             f"pass {arg}=PATH (CLI: --{arg.replace('_', '-')} PATH) pointing at the tower folder")
        if folder is not None:
            tower_cfg, reader = opener(folder)
            if not in_ckpt:
                towers[prefix] = reader
        elif prefix == CLIP_PREFIX:
            tower_cfg = _clip_preset_fits(ckpt, arg, tried)
        else:
            tower_cfg = convnext_from_shapes(_trunk_shapes(ckpt))
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
        raise MGJaxError(f"{ckpt.where}: {len(missing)} tensor(s) the model needs are missing{hint}: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; the download may be "
                         "incomplete (re-download it), or config.json is not from this checkpoint")
    used = {k for s in specs for k in s.torch_keys}
    unexpected = [k for k in ckpt.keys() if k not in used and not ignored(k, config)]
    if unexpected:
        raise MGJaxError(f"{ckpt.where}: {len(unexpected)} tensors do not map to any mgjax parameter: "
                         f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}; "
                         "is config.json from the same model?")

    for s in specs:
        shape = _get(shapes, s.path).shape
        want = s.torch_shape(shape)
        for k in s.torch_keys:
            if tuple(source(k).shape(k)) != want:
                raise MGJaxError(f"{source(k).source(k)}: tensor {k!r} has shape {tuple(source(k).shape(k))}, "
                                 f"expected {want} for mgjax parameter {'/'.join(s.path)} {shape}; "
                                 "is config.json (or the tower folder's config) from the same model?")
    flat = {}
    for s in specs:
        tensors = [source(k).get(k) for k in s.torch_keys]
        flat[s.path] = np.asarray(s.to_flax(tensors, _get(shapes, s.path).shape), dtype=dtype)
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
