"""`mgjax train CONFIG --dry-run`: the run's training step lowered and compiled ahead of time for its mesh,
at its longest length bucket, without data, weights or a single step: what XLA says the step needs per
device (memory analysis) and costs (FLOPs), and how long it takes to compile."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.pretrained import length_bucket
from mgjax.sharding import activate
from mgjax.train.config import TrainConfig
from mgjax.train.loop import run_setup, stacked_sharding
from mgjax.train.step import make_train_step


def abstract_batch(cfg: TrainConfig, config, mesh, rules, text_len: int) -> dict:
    """ShapeDtypeStructs of one optimizer step's stacked micro-batches, all hosts, as the loop feeds them."""
    nproc = jax.process_count()
    k, rows = cfg.grad_accum(nproc), cfg.micro_batch * nproc
    images = (cfg.data.image_capacity or cfg.micro_batch) * nproc
    views = () if config.num_views == 1 else (config.num_views,)
    shapes = {"input_ids": ((k, rows, text_len), jnp.int32), "labels": ((k, rows, text_len), jnp.int32),
              "attention_mask": ((k, rows, text_len), jnp.int32),
              "images": ((k, images, *views, config.image_size, config.image_size, 3), jnp.float32),
              "images_aux": ((k, images, config.image_size_aux, config.image_size_aux, 3), jnp.float32)}
    if cfg.data.pack:
        shapes["segment_ids"] = ((k, rows, text_len), jnp.int32)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=stacked_sharding(mesh, rules, len(shape)))
            for name, (shape, dtype) in shapes.items()}


def dry_run(cfg: TrainConfig) -> dict:
    """Lowers and compiles the step of `cfg` on this process's devices; returns the report's figures.

    The text length is the longest of `data.buckets` with one image, the merged length its bucket (what
    the loop compiles for its longest batches). XLA counts the FLOPs of a loop body once, so with scanned
    layers or gradient accumulation its figure is below the step's; `model_flops` is 6 N per token."""
    with tempfile.TemporaryDirectory() as tmp:  # a demo tokenizer is written, and thrown away
        model, module, mesh, rules, _, tx, a_state, a_frozen = run_setup(cfg, Path(tmp))
    config = model.config
    text_len = max(cfg.data.buckets)
    length = length_bucket(text_len - 1 + config.tokens_per_image, config.max_length)
    batch = abstract_batch(cfg, config, mesh, rules, text_len)
    step = jax.jit(make_train_step(module, tx, length, jax.random.key(cfg.seed + 1)), donate_argnums=0)
    with activate(mesh, rules):
        t0 = time.perf_counter()
        lowered = step.lower(a_state, a_frozen, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    n_params, n_train = count((a_state.params, a_frozen)), count(a_state.params)
    tokens = cfg.global_batch * length
    out = {"devices": jax.device_count(), "platform": jax.devices()[0].platform, "mesh": dict(mesh.shape),
           "micro_batches": batch["input_ids"].shape[0], "rows": batch["input_ids"].shape[1], "text_len": text_len,
           "merged_len": length, "params": n_params, "trainable": n_train, "lower_s": t1 - t0, "compile_s": t2 - t1,
           "xla_flops_per_device": float(cost.get("flops", np.nan)) if cost else None,
           "model_flops": 6 * n_params * tokens}
    if mem is not None:
        out.update({f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes")) for k in
                    ("argument", "output", "alias", "temp", "generated_code")})
        out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def report(r: dict) -> str:
    """The dry run's figures as lines for a terminal."""
    def gb(key):
        if key not in r:
            return "n/a"
        return f"{r[key] / 2**30:.2f} GB" if r[key] >= 2**30 else f"{r[key] / 2**20:.1f} MB"

    lines = [f"step compiled for {r['devices']} {r['platform']} device(s), mesh {r['mesh']}: {r['micro_batches']} "
             f"micro-batch(es) of {r['rows']} rows, text {r['text_len']} -> merged length {r['merged_len']}",
             f"parameters {r['params'] / 1e6:.2f} M ({r['trainable'] / 1e6:.2f} M trainable); lowering "
             f"{r['lower_s']:.1f} s, compiling {r['compile_s']:.1f} s",
             f"per device: arguments {gb('argument_bytes')}, outputs {gb('output_bytes')} "
             f"(donated {gb('alias_bytes')}), temporaries {gb('temp_bytes')}, code {gb('generated_code_bytes')}; "
             f"peak about {gb('peak_bytes')}",
             f"FLOPs per step: model 6·N·tokens {r['model_flops']:.3e}; XLA per device "
             + (f"{r['xla_flops_per_device']:.3e} (loop bodies counted once)" if r["xla_flops_per_device"] else "n/a")]
    return "\n".join(lines)
