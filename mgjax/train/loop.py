"""`mgjax train`: the MGM training loop (stage 1 or 2) on a mesh, resumable to the bit.

Per optimizer step each host pulls `grad_accum` micro-batches from its grain iterator, pads them to one
text length, stacks them and feeds them as global arrays; one jitted step (`train.step`) accumulates and
applies the update. Compiled programs are keyed by (text length, merged length), both from a few
buckets. Checkpoints (`train.checkpoints`) hold the trainable state and the data iterator, the frozen
parameters are written once beside them; a run restarted on the same `run_dir` resumes from the newest
readable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mgjax.config import LMConfig, MGMConfig, config_to_dict
from mgjax.convert import load_params
from mgjax.convert.mgjax_ckpt import MGJAX_CONFIG, FORMAT_VERSION, is_mgjax_checkpoint, read_meta
from mgjax.convert.readers import Checkpoint, View
from mgjax.convert.names import CLIP_PREFIX
from mgjax.convert.source import STAGE1_FILE, TOWERS, Source, open_source
from mgjax.data.pipeline import DataConfig, make_dataset, pad_to
from mgjax.data.tokenize import checkpoint_template, load_tokenizer
from mgjax.errors import MGJaxError
from mgjax.lora import adapted, check_targets, init_adapters, is_adapter
from mgjax.model import MGM, abstract_params, init_params, merged_lengths
from mgjax.plan import model_flops, peak_flops
from mgjax.presets import preset
from mgjax.pretrained import TRAIN_PER_OCTAVE, length_bucket
from mgjax.progress import Progress
from mgjax.quant import matrix_layout, quantize_params
from mgjax.sharding import activate, batch_sharding, batch_shards, make_mesh, param_shardings, rules_for
from mgjax.train.checkpoints import (RUN_FORMAT, RunCheckpoints, has_frozen, is_run_dir, load_frozen,
                                     restore_run_params, save_frozen)
from mgjax.train.config import TrainConfig, train_config_to_dict
from mgjax.train.demo import DEMO_CONFIG, save_demo_tokenizer
from mgjax.train.step import TrainState, has_prefix, make_train_step, merge_params, split_params

STAGE1_PREFIXES = ("mm_projector", "vlm_uni_")  # what stage 1 trains and stage 2 takes from it


# --- the model ---------------------------------------------------------------------------------------

def _replace(obj, changes: dict, where: str):
    """A dataclass with `changes` (nested dicts for nested dataclasses) applied."""
    fields = {f.name for f in dataclasses.fields(obj)}
    out = {}
    for k, v in changes.items():
        if k not in fields:
            raise MGJaxError(f"train config: model.config{where}.{k} is not a field of {type(obj).__name__}")
        current = getattr(obj, k)
        out[k] = _replace(current, v, f"{where}.{k}") if dataclasses.is_dataclass(current) else \
            tuple(v) if isinstance(current, tuple) else v
    return dataclasses.replace(obj, **out)


@dataclass
class Model:
    config: MGMConfig
    tokenizer_dir: Path
    init: Source | Path | None  # where the initial weights come from (None: random)
    hf_config: dict  # the released config.json behind `init` ({} without one), for `mgjax export`
    towers: dict  # per tower, where its weights come from (`Pretrained.tower_sources`), for `mgjax export`
    stage1_clip: bool = False  # stage 2 takes CLIP from the stage-1 release file, as the original does


def build_model(cfg: TrainConfig, run_dir: Path) -> Model:
    m = cfg.model
    init: Source | Path | None = None
    hf: dict = {}
    towers: dict = {}
    if m.base_llm is not None and m.init is not None:
        raise MGJaxError("train config: model.base_llm builds the model from its parts; it does not go with "
                         "model.init")
    if m.init is not None:
        path = Path(m.init).expanduser().resolve()
        if is_run_dir(path) or is_mgjax_checkpoint(path):  # an earlier run, or a converted release
            if m.vision_tower or m.vision_tower_aux or m.towers_from_checkpoint:
                raise MGJaxError(f"train config: model.init {path} holds its towers already; model.vision_tower, "
                                 "vision_tower_aux and towers_from_checkpoint apply to released checkpoints")
            config, meta = read_meta(path)
            if config.lm.lora is not None or config.lm.quant != "none":
                raise MGJaxError(f"train config: model.init {path} is a LoRA run; start from its merged model: "
                                 f"mgjax export {path} MERGED --merge-lora, then model.init=MERGED")
            init, hf, tokenizer_dir = path, meta.get("hf_config", {}), Path(meta.get("tokenizer", path))
            towers = meta.get("towers", {})
        else:  # released: the tower folders, if given, are where the original reads the towers from
            init = open_source(path, _folder(m.vision_tower), _folder(m.vision_tower_aux),
                               towers_from_checkpoint=m.towers_from_checkpoint)
            template = checkpoint_template(init.config.lm.family, path, (path, path.parent))[0]
            config, hf, tokenizer_dir = dataclasses.replace(init.config, template=template), init.hf_config, path
            towers = init.tower_sources
    elif m.preset is not None:
        config = DEMO_CONFIG if m.preset == "demo" else preset(m.preset)
        tokenizer_dir = None
        towers = {t.arg: {"weights": "folder", "folder": str(_folder(getattr(m, t.arg)).resolve()),
                          "why": f"model.{t.arg}"} if getattr(m, t.arg) else
                  {"weights": "random", "folder": None, "why": f"no model.{t.arg}: initialised at random"}
                  for t in TOWERS}
    else:
        raise MGJaxError("train config: set model.preset (a released model or 'demo') or model.init (weights)")
    config = _replace(config, m.config, "")
    if isinstance(init, Path) and config.lm.scan_layers != m.scan_layers:
        raise MGJaxError(f"{init} was converted with scan_layers={config.lm.scan_layers}, the run asks for "
                         f"model.scan_layers={m.scan_layers}; set it to match or re-convert with the other layout")
    config = dataclasses.replace(
        config, lm=dataclasses.replace(config.lm, scan_layers=m.scan_layers, remat=m.remat, moe_impl=m.moe_impl,
                                       attention_impl=m.attention_impl, loss_chunk=m.loss_chunk, lora=m.lora,
                                       quant=m.quantize),
        vision_aux=dataclasses.replace(config.vision_aux, depthwise_impl=m.depthwise_impl))
    if m.tokenizer == "demo":
        tokenizer_dir = save_demo_tokenizer(run_dir / "tokenizer")
    elif m.tokenizer is not None or m.base_llm is not None:
        tokenizer_dir = Path(m.tokenizer or m.base_llm).expanduser().resolve()
    if tokenizer_dir is None:
        raise MGJaxError("train config: set model.tokenizer (a tokenizer folder, or 'demo')")
    # Only a release file that is there already is looked into: a dry run may precede stage 1.
    stage1 = None if m.stage1 is None else _stage1_file(Path(m.stage1).expanduser().resolve(), must_exist=False)
    stage1_clip = stage1 is not None and any(k.startswith(CLIP_PREFIX) for k in Checkpoint.from_file(stage1).keys())
    if stage1_clip:
        towers["vision_tower"] = {**towers.get("vision_tower", {}), "weights": "stage-1 file",
                                  "why": f"as the original's stage 2: initialize_uni_modules takes CLIP from the "
                                         f"stage-1 {STAGE1_FILE} (pretrain_mm_mlp_adapter) {stage1}"}
    return Model(config, tokenizer_dir, init, hf, towers, stage1_clip)


def _folder(path: str | None) -> Path | None:
    return None if path is None else Path(path).expanduser()


def _placed(shapes: dict, shardings: dict) -> dict:
    """ShapeDtypeStructs of `shapes` with `shardings`, floats as float32 (what a run keeps its parameters as;
    a quantised LLM's integers stay integers)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
        a.shape, jnp.float32 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=s), shapes, shardings)


def _stage1_file(path: Path, must_exist: bool = True) -> Path | None:
    """The stage-1 release file `model.stage1` names; None for a stage-1 run dir or mgjax checkpoint (or,
    unless `must_exist`, for nothing there yet)."""
    if is_run_dir(path) or is_mgjax_checkpoint(path):
        return None
    file = path / STAGE1_FILE if path.is_dir() else path
    if not file.is_file():
        if not must_exist:
            return None
        raise MGJaxError(f"model.stage1 {path}: not a stage-1 run dir, mgjax checkpoint or {STAGE1_FILE}")
    return file


def _stage1_params(path: Path, model: Model, shapes: dict, shardings: dict) -> dict:
    """The projector and mining parameters of a stage-1 run dir, mgjax checkpoint or release (and CLIP
    from a release file that holds it, as the original's stage 2 takes it: `Model.stage1_clip`)."""
    shapes = {k: v for k, v in shapes.items()
              if k.startswith(STAGE1_PREFIXES) or model.stage1_clip and k == "vision_tower"}
    shardings = {k: v for k, v in shardings.items() if k in shapes}
    if is_run_dir(path):  # a stage-1 run of mgjax
        step, params = restore_run_params(path, _placed(shapes, shardings))
        print(f"stage 2 starts from the projector and mining of {path} (step {step})", file=sys.stderr)
        return params
    if is_mgjax_checkpoint(path):
        return load_params(path, shapes, jnp.float32, shardings)
    keep = tuple(f"model.{p}" for p in STAGE1_PREFIXES) + ((CLIP_PREFIX,) if model.stage1_clip else ())
    source = Source(model.config, View.renamed(Checkpoint.from_file(_stage1_file(path)), {p: p for p in keep}))
    return source.load(shapes, jnp.float32, shardings)


def _parts(cfg: TrainConfig) -> dict[str, Any]:
    """Readers of the pretrained parts a run without `model.init` starts from, by top-level parameter name."""
    m, out = cfg.model, {}
    if m.init is not None:
        return out
    if m.base_llm is not None:
        out["llm"] = Checkpoint.from_folder(Path(m.base_llm).expanduser())
    for tower, top in zip(TOWERS, ("vision_tower", "vision_tower_aux")):
        folder = getattr(m, tower.arg)
        if folder is not None:
            out[top] = tower.open_folder(Path(folder).expanduser())[1]
    return out


def initial_params(cfg: TrainConfig, model: Model, module: MGM, mesh, rules, shardings: dict) -> dict:
    """Random (seeded), or read from `model.init`; stage 2 takes the projector and mining from `model.stage1`.
    With `model.lora`, the adapters start as PEFT's (B = 0: the base model's outputs), and with
    `model.quantize` the LLM's matrices are quantised after loading."""
    lm = model.config.lm
    if lm.lora is None and lm.quant == "none":
        return _initial_base_params(cfg, model, module, mesh, rules, shardings)
    base = MGM(model.config.plain(), dtype=module.dtype, param_dtype=module.param_dtype)
    base_shardings = param_shardings(abstract_params(base, boxed=True), mesh, rules)
    params = _initial_base_params(cfg, dataclasses.replace(model, config=base.config), base, mesh, rules,
                                  base_shardings)
    if lm.lora is not None:
        adapters, _ = split_params(_placed(abstract_params(module), shardings), ())
        params = merge_params(params, init_adapters(adapters, jax.random.key(cfg.seed + 2),
                                                    jax.tree.map(lambda a: a.sharding, adapters)))
    return params if lm.quant == "none" else quantize_params(params, lm.quant, shardings)


def _initial_base_params(cfg: TrainConfig, model: Model, module: MGM, mesh, rules, shardings: dict) -> dict:
    shapes = abstract_params(module)
    if model.init is None:
        params = init_params(module, jax.random.key(cfg.seed), mesh, rules)
    else:
        if isinstance(model.init, Source):
            model.init.config = model.config
        if isinstance(model.init, Path) and is_run_dir(model.init):
            params = restore_run_params(model.init, _placed(shapes, shardings))[1]
        else:
            params = load_params(model.init, shapes, jnp.float32, shardings)
    for top, reader in _parts(cfg).items():
        part = Source(model.config, reader).load({top: shapes[top]}, jnp.float32, {top: shardings[top]})
        params = {**params, **part}
    if cfg.model.stage1 is not None:
        stage1 = _stage1_params(Path(cfg.model.stage1).expanduser().resolve(), model, shapes, shardings)
        params = {**params, **stage1}
    return params


# --- the optimizer ---------------------------------------------------------------------------------

def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0 (HF's cosine schedule)."""
    warmup = math.ceil(cfg.optim.warmup_ratio * cfg.steps)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.optim.lr, warmup),
                                 optax.cosine_decay_schedule(cfg.optim.lr, max(cfg.steps - warmup, 1))], [warmup])


def optimizer(cfg: TrainConfig, trainable: dict) -> optax.GradientTransformation:
    """AdamW per lr group: parameters under a prefix of `optim.lr_multipliers` get lr x multiplier."""
    o = cfg.optim
    lr = schedule(cfg)

    def adamw(mult: float):
        return optax.adamw(lambda step: lr(step) * mult, o.b1, o.b2, o.eps, weight_decay=o.weight_decay)

    groups = {"base": adamw(1.0)} | {p: adamw(float(mult)) for p, mult in o.lr_multipliers.items()}
    labels = traverse_util.path_aware_map(
        lambda path, _: next((p for p in o.lr_multipliers if has_prefix(path, (p,))), "base"), trainable)
    tx = optax.multi_transform(groups, labels)
    return optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx) if o.clip_grad_norm else tx


def check_batch_split(cfg: TrainConfig, mesh, nproc: int) -> None:
    if (cfg.micro_batch * nproc) % batch_shards(mesh):
        raise MGJaxError(f"train config: micro_batch {cfg.micro_batch} x {nproc} host(s) rows do not split over the "
                         f"{batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)}; make it a multiple")


def abstract_state(cfg: TrainConfig, module: MGM, tx: optax.GradientTransformation, mesh, shardings: dict
                   ) -> tuple[TrainState, dict]:
    """The run's state (step, trainable float32 parameters, optimizer state) and frozen parameters as
    placed ShapeDtypeStructs."""
    a_train, a_frozen = split_params(_placed(abstract_params(module), shardings), cfg.trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    # A state leaf is a parameter's moment when its path ends with that parameter's path and the shapes
    # agree: laid out like it. The rest (step counters) is replicated. (XLA gives tx.init's zeros no
    # sharding of their own: they came out replicated, a full float32 copy of both moments per device.)
    params = {tuple(k.key for k in path): a for path, a in jax.tree_util.tree_leaves_with_path(a_train)}

    def placed(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        param = next((params[keys[n:]] for n in range(len(keys)) if keys[n:] in params), None)
        sharding = param.sharding if param is not None and param.shape == leaf.shape else replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    a_opt = jax.tree_util.tree_map_with_path(placed, jax.eval_shape(tx.init, a_train))
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), a_train, a_opt), a_frozen


class Setup(NamedTuple):
    """What a run builds before it touches data or weights: shared by `train` and the dry run."""
    model: Model
    module: MGM
    mesh: Any
    rules: Any
    shardings: dict  # every parameter's sharding
    tx: optax.GradientTransformation
    a_state: TrainState  # `abstract_state`'s placed ShapeDtypeStructs
    a_frozen: dict


def fast_paths(lm: LMConfig, platform: str) -> str:
    """The attention (and MoE) implementation the step runs on `platform`, and whether "auto" chose it."""
    attention, moe = lm.impls(platform)
    parts = [f"attention {attention}" + (" (auto)" if lm.attention_impl == "auto" else "")]
    if lm.num_experts:
        parts.append(f"experts {moe}" + (" (auto)" if lm.moe_impl == "auto" else ""))
    return f"on {platform}: {', '.join(parts)}"


def run_setup(cfg: TrainConfig, run_dir: Path, devices=None, hosts: int | None = None) -> Setup:
    """The model of `cfg` (`build_model`, writing a demo tokenizer under `run_dir`), its module, the mesh and
    rules (checking the batch splits over them), the parameters' shardings, the optimizer and the abstract
    state. `devices` and `hosts` default to this job's; a dry run names a TPU slice's."""
    model = build_model(cfg, run_dir)
    module = MGM(model.config, dtype=jnp.dtype(cfg.model.compute_dtype), param_dtype=jnp.float32)
    mesh, rules = make_mesh(cfg.mesh, devices), rules_for(cfg.rules)
    check_batch_split(cfg, mesh, hosts or jax.process_count())
    shardings = param_shardings(abstract_params(module, boxed=True), mesh, rules)
    _check_adapted(cfg, model.config, abstract_params(module))
    tx = optimizer(cfg, split_params(shardings, cfg.trainable)[0])
    a_state, a_frozen = abstract_state(cfg, module, tx, mesh, shardings)
    return Setup(model, module, mesh, rules, shardings, tx, a_state, a_frozen)


def _check_adapted(cfg: TrainConfig, config: MGMConfig, shapes: dict) -> None:
    """With LoRA, the weights the adapters adapt (and, with QLoRA, the quantised ones) stay frozen: a
    `trainable` prefix that covers one is a config mistake (PEFT would freeze it silently)."""
    lm = config.lm
    if lm.lora is None:
        return
    check_targets(shapes, lm.lora)
    frozen = set(adapted(shapes))
    if lm.quant != "none":
        frozen |= {p for p in traverse_util.flatten_dict(shapes) if matrix_layout(p) is not None}
    covered = sorted(p for p in frozen if has_prefix(p, cfg.trainable) and not is_adapter(p))
    if covered:
        prefix = next(t for t in cfg.trainable if has_prefix(covered[0], (t,)))
        what = "adapts" if covered[0] in adapted(shapes) else "keeps quantised"
        raise MGJaxError(f"train config: trainable {prefix!r} covers {'/'.join(covered[0])}, a weight that model.lora "
                         f"{what} (it stays frozen; its adapters train anyway): name only what trains fully besides "
                         "them, e.g. trainable=[mm_projector, vlm_uni_]")


# --- batches ---------------------------------------------------------------------------------------

def data_source(cfg: TrainConfig):
    from mgjax.data.sources import JsonSource, PackedSource
    from mgjax.data.synthetic import SyntheticShapes

    d = cfg.data
    if d.source == "synthetic":
        return SyntheticShapes(d.num_samples, split="train", stage=d.stage, seed=cfg.seed)
    if d.path is None:
        raise MGJaxError(f"train config: data.source {d.source} needs data.path")
    if d.source == "packed":
        return PackedSource(d.path)
    if d.image_root is None:
        raise MGJaxError("train config: data.source json needs data.image_root (the folder image paths start from)")
    return JsonSource(d.path, d.image_root)


def data_config(cfg: TrainConfig, config: MGMConfig) -> DataConfig:
    d = cfg.data
    return DataConfig(batch_size=cfg.micro_batch, buckets=tuple(d.buckets), image_capacity=d.image_capacity,
                      pack=d.pack, seed=cfg.seed, shuffle=d.shuffle,
                      group_by_modality_length=d.group_by_modality_length, megabatch_size=cfg.global_batch,
                      template=config.template, max_bad_fraction=d.max_bad_fraction, num_threads=d.num_threads,
                      prefetch=d.prefetch)


def batch_lengths(micro: list[dict], config: MGMConfig) -> tuple[int, int]:
    """(text length T, merged length L) that hold all of `micro`: the longest text bucket and a bucket of
    the longest merged row (capped at max_length). Every host must use the same: take the maximum."""
    t = max(b["input_ids"].shape[1] for b in micro)
    merged = max(int(np.max(merged_lengths(b["input_ids"], b["attention_mask"], config.tokens_per_image)))
                 for b in micro)
    return t, length_bucket(merged, config.max_length, TRAIN_PER_OCTAVE)


def stacked_sharding(mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of k stacked micro-batches [k, B, ...]: each split over the batch axes like `act_batch`."""
    return NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh, ndim - 1, rules).spec))


def stack(micro: list[dict], t: int, pad_id: int) -> dict:
    """k host batches -> one dict of [k, ...] arrays of text length `t`."""
    micro = [pad_to(b, t, pad_id) for b in micro]
    return {k: np.stack([b[k] for b in micro]) for k in micro[0]}


# --- the loop --------------------------------------------------------------------------------------

class _Stop:
    """SIGTERM (preemption) sets a flag: the loop saves the current step and exits 0."""

    def __init__(self):
        self.event = threading.Event()

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) the training of `cfg`; returns {"step", "run_dir", "checkpoint", "stopped"}."""
    from mgjax.train.tensorboard import EventWriter

    run_dir = Path(cfg.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pid, nproc = jax.process_index(), jax.process_count()
    cfg = cfg.for_hosts(nproc)
    accum = cfg.grad_accum(nproc)
    model, module, mesh, rules, shardings, tx, a_state, a_frozen = run_setup(cfg, run_dir)
    config = model.config
    if pid == 0:
        print(fast_paths(config.lm, mesh.devices.flat[0].platform), file=sys.stderr)
    if not jax.tree.leaves(a_state.params):  # the trainable parameters
        raise MGJaxError(f"train config: trainable {list(cfg.trainable)} matches no parameter; top-level names: "
                         f"{', '.join(sorted(shardings))}")
    tokenizer = load_tokenizer(model.tokenizer_dir)
    if len(tokenizer) > config.lm.vocab_size:
        raise MGJaxError(f"the tokenizer in {model.tokenizer_dir} has {len(tokenizer)} tokens, the model's vocabulary "
                         f"{config.lm.vocab_size}")
    dataset = make_dataset(data_source(cfg), tokenizer, config, data_config(cfg, config), process_index=pid,
                           process_count=nproc)
    data_iter = iter(dataset)

    ckpts = RunCheckpoints(run_dir / "checkpoints", cfg.checkpoint_every, cfg.keep_checkpoints)
    opt_init = jax.jit(tx.init, out_shardings=jax.tree.map(lambda a: a.sharding, a_state.opt_state))
    restored = ckpts.restore_latest(a_state)
    if restored is None or (jax.tree.leaves(a_frozen) and not has_frozen(run_dir)):
        trainable, frozen = split_params(initial_params(cfg, model, module, mesh, rules, shardings), cfg.trainable)
        save_frozen(run_dir, frozen)  # once: they never change
    if restored is None:
        state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), a_state.step.sharding), trainable,
                           opt_init(trainable))
        start = 0
    else:
        start, state, data_state = restored
        state = TrainState(*state) if not isinstance(state, TrainState) else state
        frozen = load_frozen(run_dir, a_frozen)
        data_iter.set_state(data_state)
        print(f"resumed {run_dir} from step {start}", file=sys.stderr)
    _write_run_files(run_dir, cfg, config, model)

    lr = schedule(cfg)
    pad_id = dataset.pad_id
    steps: dict[int, Any] = {}  # merged length -> jitted step
    tb = EventWriter(run_dir / "tensorboard") if pid == 0 else None
    if pid == 0:
        _metrics_upto(run_dir / "metrics.jsonl", start)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if pid == 0 else None
    # MFU: `mgjax.plan.model_flops` (every row at the merged length) over the chips' bf16 peak
    peak = peak_flops(jax.devices()[0].device_kind)
    peak = peak * jax.device_count() if peak else None
    result = {"run_dir": str(run_dir), "stopped": False}
    step = start
    skipped = 0 if restored is None else int(data_state.get(SKIPPED, 0))  # non-finite batches skipped so far
    unchecked: list[tuple[int, jax.Array, list[str]]] = []  # (step, its `nonfinite` flag not read yet, sample ids)
    try:
        with _Stop() as stop, activate(mesh, rules), \
                Progress(f"train {run_dir.name}", cfg.steps, unit="steps", done=start) as bar:
            while step < cfg.steps:
                t0 = time.perf_counter()
                micro = [next(data_iter) for _ in range(accum)]
                t, length = batch_lengths(micro, config)
                if nproc > 1:
                    t, length = (int(x) for x in multihost_utils.process_allgather(np.array([t, length])).max(0))
                ids = [str(i) for b in micro for i in b.pop("sample_ids")]
                host = stack(micro, t, pad_id)
                if not cfg.data.pack:  # one sample per row: the attention mask says it all
                    del host["segment_ids"]
                data_state = data_iter.get_state()
                batch = {k: jax.make_array_from_process_local_data(stacked_sharding(mesh, rules, v.ndim), v)
                         for k, v in host.items()}
                if length not in steps:
                    rng = jax.random.key(cfg.seed + 1)
                    steps[length] = jax.jit(make_train_step(module, tx, length, rng), donate_argnums=0)
                state, metrics = steps[length](state, frozen, batch)
                step += 1
                bar.update(1)
                stopping = stop.event.is_set()  # read once: a signal between save and break must not skip the save
                logged = step % cfg.log_every == 0 or step == cfg.steps
                unchecked.append((step, metrics["nonfinite"], ids))
                # A step's flag is read before a checkpoint or a log line holds it, else one step late: reading
                # it at once would wait for the step, leaving the device idle while the next batch is prepared.
                if logged or stopping or step == cfg.steps or step % cfg.checkpoint_every == 0:
                    checked, unchecked = unchecked, []
                else:
                    checked, unchecked = unchecked[:-1], unchecked[-1:]
                for s, flag, sample_ids in checked:
                    if int(flag):
                        skipped = _nonfinite(s, sample_ids, skipped, cfg, ckpts, metrics_file)
                        logged = logged and s != step
                if logged:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    dt = time.perf_counter() - t0
                    rows = host["input_ids"].shape[0] * host["input_ids"].shape[1] * nproc
                    record = {"step": step, "loss": m["loss"], "lr": float(lr(step - 1)), "grad_norm": m["grad_norm"],
                              "tokens_per_s": m["tokens"] / dt, "step_s": dt, "supervised_tokens": int(m["tokens"]),
                              "rows": rows, "seq_len": length,
                              "model_flops_per_s": model_flops(config, cfg.global_batch, length,
                                                              host["images"].shape[1] * accum * nproc) / dt}
                    if peak:
                        record["mfu"] = record["model_flops_per_s"] / peak
                    if metrics_file:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        tb.scalars(step, {k: v for k, v in record.items() if k != "step"})
                if ckpts.save(step, state, {**data_state, SKIPPED: skipped}, force=step == cfg.steps or stopping):
                    result["checkpoint"] = str(ckpts.directory / str(step))
                if stopping:
                    result["stopped"] = True
                    break
        ckpts.wait()
    finally:
        ckpts.close()
        if metrics_file:
            metrics_file.close()
            tb.close()
    result["step"] = step
    if result["stopped"]:
        print(f"terminated: saved step {step} in {ckpts.directory / str(step)}; run the same command to resume",
              file=sys.stderr)
    return result


SKIPPED = "nonfinite_skipped"  # in a checkpoint's data state: the run's count of skipped batches


def _nonfinite(step: int, sample_ids: list[str], skipped: int, cfg: TrainConfig, ckpts: RunCheckpoints,
               metrics_file) -> int:
    """A step whose loss or gradient was not finite (the step applied no update): counted, logged and skipped
    while `skip_nonfinite` allows, else the run stops naming the step, its samples and where to resume.
    Returns the new count."""
    where = "this host's share of the batch" if jax.process_count() > 1 else "the batch"
    shown = ", ".join(sample_ids[:16]) + (f" and {len(sample_ids) - 16} more" if len(sample_ids) > 16 else "")
    if skipped >= cfg.skip_nonfinite:
        last = ckpts.steps()
        raise MGJaxError(
            f"step {step}: the loss or gradient is not finite (samples of {where}: {shown}); the update was not "
            f"applied and the run stops. Its last checkpoint is "
            f"{f'step {last[-1]} in {ckpts.directory}' if last else 'none (the run starts afresh)'}: re-run with "
            f"skip_nonfinite={cfg.skip_nonfinite + 1} to skip such a batch, fix those samples, or lower optim.lr")
    skipped += 1
    print(f"step {step}: the loss or gradient is not finite; skipped the batch (samples of {where}: {shown}), "
          f"{skipped} of skip_nonfinite {cfg.skip_nonfinite}", file=sys.stderr)
    if metrics_file:
        metrics_file.write(json.dumps({"step": step, SKIPPED: skipped, "sample_ids": sample_ids}) + "\n")
        metrics_file.flush()
    return skipped


def _metrics_upto(path: Path, step: int) -> None:
    """Keeps the rows of steps <= `step` (where a resumed run continues), so replayed steps are not logged
    twice; a line cut short by a kill is dropped."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(rows))
    tmp.replace(path)


def _write_run_files(run_dir: Path, cfg: TrainConfig, config: MGMConfig, model: Model) -> None:
    """The run's config (YAML) and what `mgjax export` needs to read its checkpoints."""
    if jax.process_index() != 0:
        return
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False))
    meta = {"format": RUN_FORMAT, "format_version": FORMAT_VERSION, "dtype": "float32",
            "config": config_to_dict(config), "tokenizer": str(model.tokenizer_dir), "trainable": list(cfg.trainable),
            "hf_config": model.hf_config, "towers": model.towers}
    (run_dir / MGJAX_CONFIG).write_text(json.dumps(meta, indent=1))
