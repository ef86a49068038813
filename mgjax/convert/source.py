"""Released MGM checkpoints as a `Source`: config.json, the weights and the two vision towers.

A released checkpoint may hold its towers' weights or leave them to the tower folders that
config.json names (`mm_vision_tower`, `mm_vision_tower_aux`); a stage-1 release holds only the
projector, mining and tower weights and takes its LLM from the base model (`base_llm`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import traverse_util

from mgjax.config import (CLIPConfig, ConvNextConfig, MGMConfig, convnext_from_open_clip, convnext_from_shapes,
                          family_of)
from mgjax.convert.names import (CLIP_FOLDER_PREFIXES, CLIP_PREFIX, CONVNEXT_FOLDER_PREFIXES, CONVNEXT_PREFIX,
                                 ParamSpec, ignored, param_specs)
from mgjax.convert.readers import Checkpoint, Reader, View
from mgjax.errors import MGJaxError

STAGE1_FILE = "mm_projector.bin"


def _trunk_shapes(reader: Reader) -> dict[str, tuple[int, ...]]:
    """ConvNeXt shapes by trunk-relative name (`stages.2.blocks.5.gamma`)."""
    return {k[len(CONVNEXT_PREFIX):].replace("vision_", "", 1): reader.shape(k)
            for k in reader.keys() if k.startswith(CONVNEXT_PREFIX)}


def _clip_from_checkpoint(ckpt: Reader, missing_folder: str) -> CLIPConfig:
    """The released CLIP ViT-L/14-336, after checking that the checkpoint's CLIP weights have its shape
    (the tower folder, which would say the architecture, was not found)."""
    cfg = CLIPConfig()
    p = CLIP_PREFIX + "embeddings."
    got = (ckpt.shape(p + "class_embedding")[0], ckpt.shape(p + "patch_embedding.weight")[-1],
           ckpt.shape(p + "position_embedding.weight")[0]) if p + "class_embedding" in ckpt else None
    want = (cfg.hidden_size, cfg.patch_size, cfg.grid**2 + 1)
    if got != want:
        raise MGJaxError(f"{missing_folder}, so the released CLIP ViT-L/14-336 was assumed, but the checkpoint's "
                         f"CLIP weights (hidden, patch, positions) are {got} instead of {want}; pass the tower "
                         "folder, whose config.json gives the architecture")
    return cfg


def _convnext_from_checkpoint(ckpt: Reader, missing_folder: str) -> ConvNextConfig:
    return convnext_from_shapes(_trunk_shapes(ckpt))  # the shapes determine a ConvNeXt completely


@dataclass(frozen=True)
class Tower:
    """Where one vision tower's config and weights are found."""

    arg: str  # load_pretrained argument (CLI: the same with dashes)
    hf_key: str  # the config.json key naming its folder
    prefix: str  # its names in the released state dict
    config_file: str  # in its folder
    weight_files: tuple[str, ...]  # single-file weights in its folder (indexed ones are found anyway)
    folder_prefixes: dict[str, str]  # released prefix -> prefix in its folder's weights
    from_folder: Callable[[dict, Reader], CLIPConfig | ConvNextConfig]  # (config file, weights) -> config
    from_checkpoint: Callable[[Reader, str], CLIPConfig | ConvNextConfig]  # no folder: from the MGM weights

    def open_folder(self, folder: Path) -> tuple[CLIPConfig | ConvNextConfig, Reader]:
        cfg_file = folder / self.config_file
        if not cfg_file.is_file():
            raise MGJaxError(f"{self.arg} folder {folder} has no {self.config_file}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise MGJaxError(f"{cfg_file}: invalid JSON ({e})") from None
        weights = View.renamed(Checkpoint.from_folder(folder, self.weight_files), self.folder_prefixes)
        return self.from_folder(cfg, weights), weights

    def resolve(self, hf: dict, override: str | os.PathLike | None, ckpt_dir: Path) -> tuple[Path | None, list[Path]]:
        """The tower folder: the explicit override, else config.json's (relative) path tried against the
        working directory and the checkpoint's parent folder. Returns (folder or None, paths tried)."""
        if override is not None:
            p = Path(override)
            if not p.is_dir():
                raise MGJaxError(f"{self.arg}={p}: folder not found; pass the tower folder itself (the one "
                                 "holding the tower's config and weights)")
            return p, [p]
        name = hf.get(self.hf_key, "")
        if not name:
            return None, []
        tried = [Path(name)] if Path(name).is_absolute() else [Path.cwd() / name, ckpt_dir.parent / name]
        return next((p for p in tried if p.is_dir()), None), tried


TOWERS = (
    Tower("vision_tower", "mm_vision_tower", CLIP_PREFIX, "config.json", Checkpoint.SINGLES,
          CLIP_FOLDER_PREFIXES, lambda cfg, weights: CLIPConfig.from_hf(cfg), _clip_from_checkpoint),
    Tower("vision_tower_aux", "mm_vision_tower_aux", CONVNEXT_PREFIX, "open_clip_config.json",
          ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"), CONVNEXT_FOLDER_PREFIXES,
          lambda cfg, weights: convnext_from_open_clip(cfg, _trunk_shapes(weights)), _convnext_from_checkpoint),
)


def read_hf_config(ckpt_dir: Path) -> dict:
    cfg_file = ckpt_dir / "config.json"
    if not cfg_file.is_file():
        raise MGJaxError(f"{ckpt_dir}: no config.json: not a released MGM checkpoint folder")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise MGJaxError(f"{cfg_file}: invalid JSON ({e})") from None


def open_weights(ckpt_dir: Path, base_llm: str | os.PathLike | None) -> Reader:
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
    return View.merged([Checkpoint.from_file(stage1), Checkpoint.from_folder(Path(base_llm))])


@dataclass
class Source:
    """Everything a released-layout model is made of: its config, its tensors and the tower readers.

    Tower tensors come from the checkpoint when it has them, else from the tower folders (`towers`
    maps a released name prefix to the folder's reader).
    """

    config: MGMConfig
    ckpt: Reader
    towers: dict[str, Reader] = field(default_factory=dict)
    hf_config: dict = field(default_factory=dict)
    tokenizer_dir: Path | None = None

    def reader(self, key: str) -> Reader:
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
            want = s.torch_shape()
            for k in s.torch_keys:
                got = tuple(self.reader(k).shape(k))
                if got != want:
                    raise MGJaxError(f"{self.reader(k).source(k)}: tensor {k!r} has shape {got}, expected {want} "
                                     f"for mgjax parameter {'/'.join(s.path)} {s.shape}; is config.json (or the "
                                     "tower folder's config) from the same model?")
        return specs

    def unused(self, specs: list[ParamSpec]) -> list[str]:
        """Checkpoint tensors on the ignore list (kept by `convert` so `export` writes them back)."""
        used = {k for s in specs for k in s.torch_keys}
        return [k for k in self.ckpt.keys() if k not in used]

    def array(self, spec: ParamSpec, dtype) -> np.ndarray:
        """The parameter in mgjax layout and `dtype`; stacked ones are filled one tensor at a time."""
        if not spec.stack:
            k = spec.torch_keys[0]
            return np.asarray(spec.one_to_flax(self.reader(k).get(k)), dtype=dtype)
        out = np.empty(spec.shape, dtype)
        slices = out.reshape(-1, *spec.shape[len(spec.stack):])
        for i, k in enumerate(spec.torch_keys):
            slices[i] = spec.one_to_flax(self.reader(k).get(k))
        return out

    def load(self, shapes: dict, dtype, shardings: dict | None = None) -> dict:
        """Every parameter of `shapes` (a tree of ShapeDtypeStructs), checked (see `plan`), cast to
        `dtype` and placed: on the default device, or by `shardings` (a matching tree of NamedShardings;
        each process reads only what its devices hold)."""
        flat_shardings = None if shardings is None else traverse_util.flatten_dict(shardings)
        flat = {}
        for s in self.plan(shapes):
            host = self.array(s, dtype)
            if flat_shardings is None:
                flat[s.path] = jax.device_put(host)  # one copy (jnp.asarray makes two)
            else:
                flat[s.path] = jax.make_array_from_callback(host.shape, flat_shardings[s.path], lambda i: host[i])
        return traverse_util.unflatten_dict(flat)


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
    overrides = {"vision_tower": vision_tower, "vision_tower_aux": vision_tower_aux}
    configs, towers = {}, {}
    for tower in TOWERS:
        folder, tried = tower.resolve(hf, overrides[tower.arg], ckpt_dir)
        in_ckpt = any(k.startswith(tower.prefix) for k in ckpt.keys())
        where = ", ".join(str(p) for p in tried) or f"config.json has no {tower.hf_key!r}"
        flag = f"pass {tower.arg}=PATH (CLI: --{tower.arg.replace('_', '-')} PATH) pointing at the tower folder"
        if folder is None and not in_ckpt:
            raise MGJaxError(f"the {tower.arg} weights are not in {ckpt_dir} and its folder was not found "
                             f"(tried: {where}); {flag}")
        if folder is None:
            configs[tower.arg] = tower.from_checkpoint(ckpt, f"the {tower.arg} folder was not found (tried: "
                                                             f"{where}; {flag})")
            continue
        configs[tower.arg], reader = tower.open_folder(folder)
        if not in_ckpt:
            towers[tower.prefix] = reader
    return Source(MGMConfig.from_hf(hf, configs["vision_tower"], configs["vision_tower_aux"]), ckpt, towers, hf,
                  ckpt_dir if base_llm is None else Path(base_llm))
