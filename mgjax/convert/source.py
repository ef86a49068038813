"""Released MGM checkpoints as a `Source`: config.json, the weights and the two vision towers.

A released checkpoint saves the whole state dict, towers included, but the original's loader does
not take every tower from it: each tower part comes from where the original takes it, the checkpoint
or the tower folder that config.json names (`mm_vision_tower`, `mm_vision_tower_aux`); see
`Tower.folder_reason`. A stage-1 release holds only the projector, mining and tower weights and takes
its LLM from the base model (`base_llm`).
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
                                 CONVNEXT_STAGES, CONVNEXT_STEM, ParamSpec, ignored, is_buffer, param_specs)
from mgjax.convert.readers import Checkpoint, Reader, View
from mgjax.errors import MGJaxError
from mgjax.lora import PEFT_PREFIX, read_peft_config

STAGE1_FILE = "mm_projector.bin"
# The original's LoRA training output (LLaVA's layout): PEFT's adapters, the model's config.json, and the other
# trained weights (projector, mining) in a torch pickle; its loader takes the LLM from `--model-base`.
LORA_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"
# The original's `MGMMetaModel.initialize_uni_modules` (mgm/model/mgm_arch.py) reads tower weights only
# from the shards (found through the index) that hold a key containing one of these, its
# `trainable_module`; from a stage-1 file (`pretrain_mm_mlp_adapter`) when there is one.
UNI_MODULES = ("vlm_uni", "vision_fpn", "vision_stages")


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
    name: str  # for messages
    hf_key: str  # the config.json key naming its folder
    prefix: str  # its names in the released state dict
    parts: tuple[str, ...]  # name prefixes the original loads from a checkpoint as one unit (one `get_w`)
    flag: str | None  # the config.json flag without which the original never takes it from a checkpoint
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

    def folder_reason(self, hf: dict, ckpt: Reader, part: str) -> str | None:
        """Why the original takes `part` from the tower folder although the checkpoint holds it; None when
        it takes the checkpoint's copy.

        The original's `load_pretrained_model` (mgm/model/builder.py) first builds both towers from their
        folders (`CLIPVisionTower.load_model`, `OpenCLIPVisionTower.load_model`); `initialize_uni_modules`
        then opens the shards that hold a `UNI_MODULES` key and its `get_w` overwrites CLIP with the copy
        found there whatever `optimize_vision_tower` says, and the ConvNeXt's `vision_stem` and
        `vision_stages` (one by one) only when `optimize_vision_tower_aux` is true. The HD models load the
        same way (nothing in that path reads `image_grid`).
        """
        if self.flag and not hf.get(self.flag, False):
            return f"config.json's {self.flag} is false"
        opened = {ckpt.source(k) for k in ckpt.keys() if any(m in k for m in UNI_MODULES)}
        if not any(ckpt.source(k) in opened for k in ckpt.keys() if k.startswith(part)):
            return "its copy is not in the shards holding vlm_uni_* / vision_stages, the only ones the original reads"
        return None


TOWERS = (
    Tower("vision_tower", "CLIP", "mm_vision_tower", CLIP_PREFIX, (CLIP_PREFIX,), None, "config.json",
          Checkpoint.SINGLES, CLIP_FOLDER_PREFIXES, lambda cfg, weights: CLIPConfig.from_hf(cfg),
          _clip_from_checkpoint),
    Tower("vision_tower_aux", "ConvNeXt", "mm_vision_tower_aux", CONVNEXT_PREFIX, (CONVNEXT_STEM, CONVNEXT_STAGES),
          "optimize_vision_tower_aux", "open_clip_config.json",
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


def _peft_names(reader: Reader) -> View:
    """A PEFT save's tensors under the model's own names, as the original's loader renames them: without
    `base_model.model.` (then `model.model.` -> `model.`) and without an adapter name (`lora_A.default.`)."""
    def name(k: str) -> str:
        k = k.removeprefix(PEFT_PREFIX)
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        return k[len("model."):] if k.startswith("model.model.") else k
    return View({name(k): (reader, k) for k in reader.keys()}, reader.where)


def open_adapters(ckpt_dir: Path) -> tuple[Reader, float] | None:
    """(adapter tensors under the model's names, their scale alpha / r) of an original LoRA folder, or None."""
    if not (ckpt_dir / LORA_CONFIG).is_file():
        return None
    try:
        peft = json.loads((ckpt_dir / LORA_CONFIG).read_text())
    except ValueError as e:
        raise MGJaxError(f"{ckpt_dir / LORA_CONFIG}: invalid JSON ({e})") from None
    scale = read_peft_config(peft, str(ckpt_dir / LORA_CONFIG))[1]
    file = next((ckpt_dir / f for f in ADAPTER_FILES if (ckpt_dir / f).is_file()), None)
    if file is None:
        raise MGJaxError(f"{ckpt_dir} has {LORA_CONFIG} but no {' or '.join(ADAPTER_FILES)}: the adapters are "
                         "missing (copy the whole LoRA output folder)")
    return _peft_names(Checkpoint.from_file(file)), scale


def open_weights(ckpt_dir: Path, base_llm: str | os.PathLike | None) -> Reader:
    """The checkpoint's tensors. A stage-1 release (`mm_projector.bin`: projector, mining and tower
    weights) is combined with the LLM of `base_llm`, a plain HF LLM checkpoint folder. So is an original LoRA
    folder's `non_lora_trainables.bin` (its adapters: `open_adapters`), whose tensors replace the base's, as the
    original's loader does with `load_state_dict(non_lora_trainables, strict=False)`."""
    if (ckpt_dir / LORA_CONFIG).is_file():
        if base_llm is None:
            raise MGJaxError(f"{ckpt_dir} is a LoRA checkpoint ({LORA_CONFIG}: adapters only): pass base_llm=PATH "
                             "(CLI: --base-llm PATH) with the model it was trained on, as the original's --model-base")
        layers = [Checkpoint.from_folder(Path(base_llm))]
        if (ckpt_dir / NON_LORA_FILE).is_file():
            layers.append(_peft_names(Checkpoint.from_file(ckpt_dir / NON_LORA_FILE)))
        return View({k: (r, k) for r in layers for k in r.keys()}, ckpt_dir)
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

    Tower parts come from the checkpoint or from their folders as `open_source` decided: `towers` maps
    a released name prefix read from a folder to the folder's reader; the checkpoint's own copy under
    such a prefix is shadowed (never read, not an unexpected tensor). `tower_sources` says, per tower,
    where its weights came from and why (recorded by `convert`, shown by `Pretrained.tower_sources`).
    """

    config: MGMConfig
    ckpt: Reader
    towers: dict[str, Reader] = field(default_factory=dict)
    hf_config: dict = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    tower_sources: dict = field(default_factory=dict)
    # LoRA adapters merged into the weights they adapt as they are read (`open_adapters`): (reader, scale)
    adapters: tuple[Reader, float] | None = None

    def reader(self, key: str) -> Reader:
        for prefix, r in self.towers.items():
            if key.startswith(prefix):
                return r
        return self.ckpt

    def _shadowed(self, key: str) -> bool:
        return key.startswith(tuple(self.towers))

    def plan(self, shapes: dict) -> list[ParamSpec]:
        """The spec of every parameter of `shapes`, after checking that every tensor exists with the
        right shape and that no checkpoint tensor is left over (beyond `names.ignored`)."""
        specs = param_specs(shapes, self.config)
        missing = [k for s in specs for k in s.torch_keys if k not in self.reader(k)]
        if missing:
            hint = ""
            if any(k.startswith(("model.vision_tower", "model.vlm_uni", "model.mm_projector")) for k in missing):
                hint = " (a stage-1 or LLM-only checkpoint lacks the towers or the mining weights)"
            where = sorted({str(self.reader(k).where) for k in missing})
            raise MGJaxError(f"{', '.join(where)}: {len(missing)} tensor(s) the model needs are missing{hint}: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; the download may be "
                             "incomplete (re-download it), or config.json is not from this checkpoint")
        used = {k for s in specs for k in s.torch_keys}
        unexpected = [k for k in self.ckpt.keys()
                      if k not in used and not ignored(k, self.config) and not self._shadowed(k)]
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
        if self.adapters is not None:
            self._check_adapters(used)
        return specs

    def _check_adapters(self, used: set[str]) -> None:
        """Every adapter pairs lora_A [r, in] with lora_B [out, r] on a weight [out, in] the model reads."""
        adapters = self.adapters[0]
        for k in adapters.keys():
            stem, _, leaf = k.rpartition(".lora_")
            weight, pair = stem + ".weight", (stem + ".lora_A.weight", stem + ".lora_B.weight")
            if leaf not in ("A.weight", "B.weight") or weight not in used or any(p not in adapters for p in pair):
                why = "is not one" if weight not in used else "is, but its lora_A / lora_B pair is incomplete"
                raise MGJaxError(f"{adapters.source(k)}: adapter tensor {k!r} does not adapt a weight of this model "
                                 f"({weight!r} {why}); is the adapter from a model with this config.json and base?")
            out, inp = self.reader(weight).shape(weight)
            (r, a_in), (b_out, b_r) = adapters.shape(pair[0]), adapters.shape(pair[1])
            if (a_in, b_out, b_r) != (inp, out, r):
                raise MGJaxError(f"{adapters.source(k)}: adapters of {weight!r} [{out}, {inp}] have shapes lora_A "
                                 f"[{r}, {a_in}] and lora_B [{b_out}, {b_r}]; they belong to another model")

    def _tensor(self, key: str) -> np.ndarray:
        """A released tensor, with its LoRA adapters merged in float32 (W + scale B A) when it has some."""
        t = self.reader(key).get(key)
        if self.adapters is None or (a_key := key.removesuffix(".weight") + ".lora_A.weight") not in self.adapters[0]:
            return t
        adapters, scale = self.adapters
        b = adapters.get(key.removesuffix(".weight") + ".lora_B.weight").astype(np.float32)
        return t.astype(np.float32) + scale * (b @ adapters.get(a_key).astype(np.float32))

    def unused(self, specs: list[ParamSpec]) -> list[str]:
        """Tensors of the model's parts that mgjax never reads (CLIP's last layer, ...), kept by `convert`
        so that `export` writes whole towers, as the original's training saves them: the checkpoint's
        (beyond the shadowed copies) and, for a part read from its folder, the folder's (beyond buffers)."""
        used = {k for s in specs for k in s.torch_keys}
        keys = [k for k in self.ckpt.keys() if not self._shadowed(k)]
        for reader in {id(r): r for r in self.towers.values()}.values():
            keys += [k for k in reader.keys() if self._shadowed(k) and self.reader(k) is reader and not is_buffer(k)]
        return [k for k in keys if k not in used]

    def array(self, spec: ParamSpec, dtype) -> np.ndarray:
        """The parameter in mgjax layout and `dtype`; stacked ones are filled one tensor at a time."""
        if not spec.stack:
            return np.asarray(spec.one_to_flax(self._tensor(spec.torch_keys[0])), dtype=dtype)
        out = np.empty(spec.shape, dtype)
        slices = out.reshape(-1, *spec.shape[len(spec.stack):])
        for i, k in enumerate(spec.torch_keys):
            slices[i] = spec.one_to_flax(self._tensor(k))
        return out

    def load(self, shapes: dict, dtype, shardings: dict | None = None) -> dict:
        """Every parameter of `shapes` (a tree of ShapeDtypeStructs), checked (see `plan`), cast to
        `dtype` and placed: on the default device, or by `shardings` (a matching tree of NamedShardings;
        each process reads only what its devices hold)."""
        return self.place(self.plan(shapes), dtype, shardings)

    def place(self, specs: list[ParamSpec], dtype, shardings: dict | None = None) -> dict:
        """The parameters of `specs` (from `plan`) read, cast to `dtype` and placed as `load` places them;
        `shardings` covers at least them."""
        flat_shardings = None if shardings is None else traverse_util.flatten_dict(shardings)
        flat = {}
        for s in specs:
            host = self.array(s, dtype)
            if flat_shardings is None:
                flat[s.path] = jax.device_put(host)  # one copy (jnp.asarray makes two)
            else:
                flat[s.path] = jax.make_array_from_callback(host.shape, flat_shardings[s.path], lambda i: host[i])
        return traverse_util.unflatten_dict(flat)


TOWERS_FROM_CHECKPOINT = ("towers_from_checkpoint=True (CLI: --towers-from-checkpoint) to use the checkpoint's "
                          "copy instead (a bf16 checkpoint's copy is rounded: outputs then differ slightly from "
                          "the original's)")


def open_source(ckpt_dir: str | os.PathLike, vision_tower=None, vision_tower_aux=None, base_llm=None,
                towers_from_checkpoint: bool = False) -> Source:
    """Reads config.json, opens the weights and resolves the towers of a released-layout checkpoint.

    Each tower part comes from where the original's loader takes it (`Tower.folder_reason`): CLIP from
    the checkpoint, the ConvNeXt from its folder unless config.json's `optimize_vision_tower_aux`.
    A folder the original would read that cannot be found is an error naming it, unless
    `towers_from_checkpoint`, which takes every part the checkpoint holds from the checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    hf = read_hf_config(ckpt_dir)
    if "mm_hidden_size" not in hf:
        raise MGJaxError(f"{ckpt_dir / 'config.json'} has no 'mm_hidden_size': this is a plain LLM config, not an "
                         "MGM checkpoint; point load_pretrained at the MGM checkpoint folder (its config.json has "
                         "the mm_* keys)")
    family_of(hf)  # an unknown model type fails before any weights or towers are looked for
    ckpt = open_weights(ckpt_dir, base_llm)
    adapters = open_adapters(ckpt_dir)
    keys = ckpt.keys()
    overrides = {"vision_tower": vision_tower, "vision_tower_aux": vision_tower_aux}
    configs, towers, sources = {}, {}, {}
    for tower in TOWERS:
        folder, tried = tower.resolve(hf, overrides[tower.arg], ckpt_dir)
        held = {p for p in tower.parts if any(k.startswith(p) for k in keys)}
        rule = {p: tower.folder_reason(hf, ckpt, p) for p in held}  # None: the original takes the checkpoint's
        from_ckpt = {p for p in held if towers_from_checkpoint or rule[p] is None}
        from_folder = [p for p in tower.parts if p not in from_ckpt]
        where = ", ".join(str(p) for p in tried) or f"config.json has no {tower.hf_key!r}"
        flag = f"pass {tower.arg}=PATH (CLI: --{tower.arg.replace('_', '-')} PATH) pointing at the tower folder"
        if folder is None and from_folder:
            if any(p not in held for p in from_folder):
                raise MGJaxError(f"the {tower.arg} weights are not in {ckpt_dir} and its folder was not found "
                                 f"(tried: {where}); {flag}")
            reason = "; ".join(sorted({rule[p] for p in from_folder}))
            raise MGJaxError(f"the original MGM loader reads the {tower.name} ({tower.arg}) weights from its tower "
                             f"folder, not from the copy in {ckpt_dir} ({reason}), and that folder was not found "
                             f"(tried: {where}); {flag}, or {TOWERS_FROM_CHECKPOINT}")
        if folder is None:
            configs[tower.arg] = tower.from_checkpoint(ckpt, f"the {tower.arg} folder was not found (tried: "
                                                             f"{where}; {flag})")
        else:
            configs[tower.arg], reader = tower.open_folder(folder)
            towers.update({p: reader for p in from_folder})
        sources[tower.arg] = _sources_record(tower, folder, held, rule, from_ckpt)
    return Source(MGMConfig.from_hf(hf, configs["vision_tower"], configs["vision_tower_aux"]), ckpt, towers, hf,
                  ckpt_dir if base_llm is None else Path(base_llm), sources, adapters)


def _sources_record(tower: Tower, folder: Path | None, held: set, rule: dict, from_ckpt: set) -> dict:
    """Where a tower's weights came from, for mgjax_config.json: {"weights": "checkpoint" | "folder" (or
    {part: either} when its parts differ), "folder": absolute path or None, "why": the rule that decided}."""
    def why(p: str) -> str:
        if p not in held:
            return "not in the checkpoint"
        if p not in from_ckpt:
            return f"as the original: {rule[p]}"
        if rule[p]:
            return f"towers_from_checkpoint=True (the original reads the folder: {rule[p]})"
        return "as the original: its initialize_uni_modules takes it from the checkpoint"

    kinds = {p[len(tower.prefix):].rstrip(".") or tower.arg: "checkpoint" if p in from_ckpt else "folder"
             for p in tower.parts}
    weights = next(iter(kinds.values())) if len(set(kinds.values())) == 1 else kinds
    return {"weights": weights, "folder": None if folder is None else str(folder.resolve()),
            "why": "; ".join(sorted({why(p) for p in tower.parts}))}
