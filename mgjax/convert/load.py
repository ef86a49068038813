"""Fill an mgjax parameter tree from a released MGM checkpoint and its tower folders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from mgjax.config import (CLIPConfig, ConvNextConfig, MGMConfig, convnext_from_open_clip, convnext_from_shapes,
                          family_of)
from mgjax.convert.names import (CLIP_FOLDER_PREFIXES, CLIP_PREFIX, CONVNEXT_FOLDER_PREFIXES, CONVNEXT_PREFIX,
                                 ParamSpec, ignored, param_specs)
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


def read_hf_config(ckpt_dir: Path) -> dict:
    cfg_file = ckpt_dir / "config.json"
    if not cfg_file.is_file():
        raise MGJaxError(f"{ckpt_dir}: no config.json: not a released MGM checkpoint folder")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise MGJaxError(f"{cfg_file}: invalid JSON ({e})") from None


STAGE1_FILE = "mm_projector.bin"


def open_weights(ckpt_dir: Path, base_llm: str | os.PathLike | None):
    """The checkpoint's tensors. A stage-1 release (`mm_projector.bin`: projector, mining and tower
    weights) is combined with the LLM of `base_llm`, a plain HF LLM checkpoint folder."""
    stage1 = ckpt_dir / STAGE1_FILE
    has_full = any((ckpt_dir / n).is_file() for n in Checkpoint.INDEXES + Checkpoint.SINGLES)
    if not stage1.is_file() or has_full:
        if base_llm is not None:
            raise MGJaxError(f"base_llm is only for stage-1 releases ({STAGE1_FILE}); {ckpt_dir} is a full checkpoint")
        return Checkpoint.from_folder(ckpt_dir)
    if base_llm is None:
        raise MGJaxError(f"{ckpt_dir} is a stage-1 release ({STAGE1_FILE} holds only the projector, mining and "
                         "tower weights): pass base_llm=PATH (CLI: --base-llm PATH) with the base LLM checkpoint "
                         "it was trained on")
    return Merged([Checkpoint.from_file(stage1), Checkpoint.from_folder(Path(base_llm))])


class Merged:
    """Several readers as one; a tensor name present in two of them is an error."""

    def __init__(self, readers):
        self.where = readers[0].where
        self._of = {}
        for r in readers:
            for k in r.keys():
                if k in self._of:
                    raise MGJaxError(f"tensor {k!r} is in both {self._of[k].source(k)} and {r.source(k)}")
                self._of[k] = r

    def keys(self):
        return list(self._of)

    def __contains__(self, key):
        return key in self._of

    def shape(self, key):
        return self._of[key].shape(key)

    def get(self, key):
        return self._of[key].get(key)

    def source(self, key):
        return self._of[key].source(key)


@dataclass
class Source:
    """Everything a released-layout model is made of: its config, its tensors and the tower readers.

    Tower tensors come from the checkpoint when it has them, else from the tower folders (`towers`
    maps a name prefix to the folder's reader).
    """

    config: MGMConfig
    hf_config: dict
    ckpt: Checkpoint | Merged
    towers: dict
    tokenizer_dir: Path

    def reader(self, key: str):
        for prefix, r in self.towers.items():
            if key.startswith(prefix):
                return r
        return self.ckpt

    def plan(self, shapes: dict) -> list[ParamSpec]:
        """The spec of every parameter of `shapes`, after checking that every tensor exists with the
        right shape and that no checkpoint tensor is left over (beyond `names.ignored`)."""
        specs = param_specs(shapes, self.config)
        missing = [k for s in specs for k in s.torch_keys if k not in self.reader(k)]
        if missing:
            hint = ""
            if any(k.startswith(("model.vision_tower", "model.vlm_uni", "model.mm_projector")) for k in missing):
                hint = " (a stage-1 or LLM-only checkpoint lacks the towers or the mining weights)"
            raise MGJaxError(f"{self.ckpt.where}: {len(missing)} tensor(s) the model needs are missing{hint}: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; the download may be "
                             "incomplete (re-download it), or config.json is not from this checkpoint")
        used = {k for s in specs for k in s.torch_keys}
        unexpected = [k for k in self.ckpt.keys() if k not in used and not ignored(k, self.config)]
        if unexpected:
            raise MGJaxError(f"{self.ckpt.where}: {len(unexpected)} tensors do not map to any mgjax parameter: "
                             f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}; "
                             "is config.json from the same model?")
        for s in specs:
            shape = _get(shapes, s.path).shape
            want = s.torch_shape(shape)
            for k in s.torch_keys:
                got = tuple(self.reader(k).shape(k))
                if got != want:
                    raise MGJaxError(f"{self.reader(k).source(k)}: tensor {k!r} has shape {got}, expected {want} "
                                     f"for mgjax parameter {'/'.join(s.path)} {shape}; is config.json (or the "
                                     "tower folder's config) from the same model?")
        return specs

    def unused(self, specs: list[ParamSpec]) -> list[str]:
        """Checkpoint tensors on the ignore list (kept by `convert` so `export` writes them back)."""
        used = {k for s in specs for k in s.torch_keys}
        return [k for k in self.ckpt.keys() if k not in used]

    def array(self, spec: ParamSpec, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The parameter in mgjax layout and `dtype`; stacked ones are filled one tensor at a time."""
        if not spec.stack:
            k = spec.torch_keys[0]
            return np.asarray(spec.one_to_flax(self.reader(k).get(k), shape), dtype=dtype)
        out = np.empty(shape, dtype)
        slices = out.reshape(-1, *shape[len(spec.stack):])
        for i, k in enumerate(spec.torch_keys):
            slices[i] = spec.one_to_flax(self.reader(k).get(k), shape)
        return out


def open_source(ckpt_dir: str | os.PathLike, vision_tower=None, vision_tower_aux=None, base_llm=None) -> Source:
    """Reads config.json, opens the weights and resolves the towers of a released-layout checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    hf = read_hf_config(ckpt_dir)
    if "mm_hidden_size" not in hf:
        raise MGJaxError(f"{ckpt_dir / 'config.json'} has no 'mm_hidden_size': this is a plain LLM config, not an "
                         "MGM checkpoint; point load_pretrained at the MGM checkpoint folder (its config.json has "
                         "the mm_* keys)")
    family_of(hf)  # an unknown model type fails before any weights or towers are looked for
    ckpt = open_weights(ckpt_dir, base_llm)
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
    tokenizer_dir = ckpt_dir if base_llm is None else Path(base_llm)
    return Source(MGMConfig.from_hf(hf, vision, vision_aux), hf, ckpt, towers, tokenizer_dir)


def load_params(config: MGMConfig, shapes: dict, ckpt, towers: dict, dtype, shardings: dict | None = None) -> dict:
    """Every parameter of `shapes` (a tree of ShapeDtypeStructs) read from `ckpt` (and the tower
    readers), checked (see `Source.plan`), cast to `dtype` and placed: on the default device, or by
    `shardings` (a matching tree of NamedShardings; each process reads only what its devices hold)."""
    source = Source(config, {}, ckpt, towers, Path())
    flat = {}
    for s in source.plan(shapes):
        host = source.array(s, _get(shapes, s.path).shape, dtype)
        if shardings is None:
            flat[s.path] = jax.device_put(host)  # one copy (jnp.asarray makes two)
        else:
            flat[s.path] = jax.make_array_from_callback(host.shape, _get(shardings, s.path), lambda i: host[i])
    return unflatten(flat)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def unflatten(flat: dict) -> dict:
    """{path tuple: leaf} -> nested dict."""
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out
