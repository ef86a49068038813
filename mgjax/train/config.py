"""Training configs: YAML files loaded into frozen dataclasses, with `key=value` overrides.

A YAML file may name a `base:` file (relative to itself) whose keys it extends; dotted overrides on the
command line (`optim.lr=1e-4`, `data.buckets=[64,128]`) are parsed as YAML values and applied last.
Unknown keys and wrong types are errors naming the key, so a typo never trains with a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mgjax.config import (ATTENTION_IMPLS, DEPTHWISE_IMPLS, MOE_IMPLS, QUANT_MODES, REMAT_POLICIES, LoraConfig,
                          MeshConfig)
from mgjax.errors import MGJaxError


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train and from what weights."""

    preset: str | None = None  # a released model's config (mgjax.presets), or "demo"
    config: dict = field(default_factory=dict)  # MGMConfig fields overriding the preset (nested dicts)
    init: str | None = None  # start from these weights: an mgjax or released checkpoint folder (its config wins)
    stage1: str | None = None  # stage 2: projector + mining weights of a stage-1 run dir or release
    tokenizer: str | None = None  # tokenizer folder (default: `init`'s); "demo" builds the demo's word tokenizer
    # Stage 1 from the parts (no `init`): a plain HF LLM checkpoint folder and the two tower folders. With a
    # released `init`, the tower folders are where its towers are read from as the original reads them
    # (load_pretrained's vision_tower / vision_tower_aux / towers_from_checkpoint).
    base_llm: str | None = None
    vision_tower: str | None = None  # HF CLIP folder (config.json + weights)
    vision_tower_aux: str | None = None  # OpenCLIP ConvNeXt folder (open_clip_config.json + weights)
    towers_from_checkpoint: bool = False
    compute_dtype: str = "bfloat16"  # activations; weights and optimizer state stay float32
    remat: str = "dots"  # none | dots | full: what the backward pass recomputes
    scan_layers: bool = True
    # Mixtral's experts: auto (ragged on a GPU or TPU, else dense) | dense (the reference) | ragged (top-k only)
    moe_impl: str = "auto"
    # auto (splash on a TPU, cudnn on a GPU, else xla) | xla (the reference) | cudnn | splash: mgjax.config.LMConfig
    attention_impl: str = "auto"
    loss_chunk: int = 0  # LM head + loss over chunks of this many positions (0: one [B, L, V] head)
    depthwise_impl: str = "shifted"  # ConvNeXt's 7x7 depthwise: shifted (reference, CPU) | grouped (GPU / TPU)
    # LoRA ({rank, alpha, dropout, targets}: mgjax.config.LoraConfig): adapters on the LLM's linear layers train,
    # the weights they adapt stay frozen; `trainable` names what else trains fully (the projector, mining).
    lora: LoraConfig | None = None
    # QLoRA: the frozen LLM's matrices stored int8 / int4 (mgjax.quant) under float adapters; needs `lora`.
    quantize: str = "none"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with cosine decay after a linear warm-up (the original's recipe: docs/mgm_spec.md section 9)."""

    lr: float = 2e-5
    # Parameter-path prefix -> lr multiplier (Mixtral / Yi stage 2: projector and mining at 2x the LLM's).
    lr_multipliers: dict = field(default_factory=dict)
    warmup_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # the original does not clip


@dataclass(frozen=True)
class DataSection:
    """Where samples come from and how batches are built (mgjax.data.pipeline.DataConfig fields)."""

    source: str = "json"  # json (LLaVA JSON/JSONL + image_root) | packed (`mgjax data pack` output) | synthetic
    path: str | None = None
    image_root: str | None = None
    num_samples: int = 2000  # synthetic only
    stage: int = 2  # synthetic only: captions (1) or question answering (2)
    buckets: tuple = (128, 256, 512, 1024, 2048)
    image_capacity: int | None = None
    pack: bool = False
    shuffle: bool = True
    group_by_modality_length: bool = True
    max_bad_fraction: float = 0.01
    num_threads: int = 8
    prefetch: int = 32


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    steps: int  # optimizer steps
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    global_batch: int = 128  # samples (rows) per optimizer step, all hosts together
    micro_batch: int = 8  # rows per host per forward pass; global / (micro * hosts) steps are accumulated
    trainable: tuple = ("llm", "mm_projector", "vlm_uni_")  # parameter-path prefixes; the rest is frozen
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataSection = field(default_factory=DataSection)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rules: str = "fsdp_tp_ep"
    skip_nonfinite: int = 0  # batches with a non-finite loss or gradient to skip (each logged) before stopping

    def __post_init__(self):
        checks = [(self.steps >= 1, f"steps {self.steps}: must be >= 1"),
                  (self.checkpoint_every >= 1, f"checkpoint_every {self.checkpoint_every}: must be >= 1"),
                  (self.keep_checkpoints >= 1, f"keep_checkpoints {self.keep_checkpoints}: must be >= 1"),
                  (self.log_every >= 1, f"log_every {self.log_every}: must be >= 1"),
                  (self.skip_nonfinite >= 0, f"skip_nonfinite {self.skip_nonfinite}: must be >= 0"),
                  (self.micro_batch >= 1 and self.global_batch >= self.micro_batch,
                   f"global_batch {self.global_batch} / micro_batch {self.micro_batch}: need global >= micro >= 1"),
                  (self.model.remat in REMAT_POLICIES, f"model.remat {self.model.remat!r}: {'|'.join(REMAT_POLICIES)}"),
                  (self.model.moe_impl in MOE_IMPLS, f"model.moe_impl {self.model.moe_impl!r}: {'|'.join(MOE_IMPLS)}"),
                  (self.model.attention_impl in ATTENTION_IMPLS,
                   f"model.attention_impl {self.model.attention_impl!r}: {'|'.join(ATTENTION_IMPLS)}"),
                  (self.model.loss_chunk >= 0, f"model.loss_chunk {self.model.loss_chunk}: must be >= 0"),
                  (self.model.quantize in QUANT_MODES,
                   f"model.quantize {self.model.quantize!r}: {'|'.join(QUANT_MODES)}"),
                  (self.model.quantize == "none" or self.model.lora is not None,
                   f"model.quantize {self.model.quantize}: a quantised LLM trains through LoRA adapters only; set "
                   "model.lora (e.g. model.lora={rank: 16})"),
                  (self.model.depthwise_impl in DEPTHWISE_IMPLS,
                   f"model.depthwise_impl {self.model.depthwise_impl!r}: {'|'.join(DEPTHWISE_IMPLS)}"),
                  (self.data.source in ("json", "packed", "synthetic"),
                   f"data.source {self.data.source!r}: json|packed|synthetic"),
                  (len(self.trainable) > 0 or self.model.lora is not None,
                   "trainable: name at least one parameter-path prefix (or set model.lora)")]
        for ok, message in checks:
            if not ok:
                raise MGJaxError(f"train config: {message}")

    def for_hosts(self, process_count: int) -> "TrainConfig":
        """This config for a job of `process_count` hosts: micro_batch is a per-host ceiling, so when the hosts
        together would take more rows than `global_batch` (a config written for fewer hosts), each takes its
        share, global_batch / hosts rows; the step's rows stay `global_batch`."""
        share = max(1, self.global_batch // process_count)
        return self if self.micro_batch <= share else dataclasses.replace(self, micro_batch=share)

    def grad_accum(self, process_count: int) -> int:
        """Micro-batches per optimizer step on each host."""
        per_step = self.micro_batch * process_count
        if self.global_batch % per_step:
            raise MGJaxError(f"train config: global_batch {self.global_batch} is not a multiple of micro_batch "
                             f"{self.micro_batch} x {process_count} host(s)")
        return self.global_batch // per_step


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise MGJaxError(f"{path}: `base:` files form a cycle")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise MGJaxError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise MGJaxError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise MGJaxError(f"{path}: a config is a mapping of keys to values")
    base = d.pop("base", None)
    return _merge(_read_yaml(path.parent / base, (*seen, path)), d) if base else d


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _override(d: dict, item: str) -> dict:
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise MGJaxError(f"override {item!r}: write key=value (dotted keys, e.g. optim.lr=1e-4)")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    nested: Any = parsed
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return _merge(d, nested)


def _build(cls, d: Any, where: str):
    """A dataclass from a dict, checking every key and (simple) type."""
    if not isinstance(d, dict):
        raise MGJaxError(f"train config: {where or 'the config'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise MGJaxError(f"train config: unknown key {where + '.' if where else ''}{unknown[0]}; "
                         f"known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        kwargs[k] = _coerce(hints[k], v, f"{where}.{k}" if where else k)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise MGJaxError(f"train config: {where or 'top level'}: {e}") from None


def _coerce(hint, v, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, v, where)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if v is None and type(None) in options:
        return None
    for t in options:
        if dataclasses.is_dataclass(t):
            return _build(t, v, where)
        t = typing.get_origin(t) or t  # tuple[str, ...] -> tuple
        if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if t is float and isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
        if t is tuple and isinstance(v, (list, tuple)):
            return tuple(v)
        if t in (int, str, bool, dict) and isinstance(v, t) and not (t is int and isinstance(v, bool)):
            return v
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise MGJaxError(f"train config: {where} = {v!r} should be {names}")


def load_train_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """The config of `path` (YAML, with its `base:` chain) and `overrides` (`a.b=value`)."""
    d = _read_yaml(Path(path))
    for item in overrides:
        d = _override(d, item)
    return _build(TrainConfig, d, "")


def train_config_to_dict(config: TrainConfig) -> dict:
    """JSON/YAML-ready (tuples as lists); `load_train_config` of its YAML gives the same config."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(config))))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
