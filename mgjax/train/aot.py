"""`mgjax train CONFIG --dry-run [--topology SLICE]`: the run's training step lowered and compiled ahead of time
for its mesh, at its longest length bucket, without data, weights or a single step: what XLA says the step
needs per device (memory analysis) and costs (FLOPs), and how long it takes to compile. With a TPU slice
(`mgjax.topology`) the mesh is over the slice's devices and the compiler is the TPU's: its memory figures and
its out-of-memory verdict are the chip's."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.plan import model_flops
from mgjax.pretrained import TRAIN_PER_OCTAVE, length_bucket
from mgjax.sharding import activate
from mgjax.roofline import hlo_cost, step_time
from mgjax.topology import CHIPS, Slice, hbm_bytes, read_oom
from mgjax.train.config import TrainConfig
from mgjax.train.loop import fast_paths, run_setup, stacked_sharding
from mgjax.train.step import make_train_step


def abstract_batch(cfg: TrainConfig, config, mesh, rules, text_len: int, nproc: int | None = None) -> dict:
    """ShapeDtypeStructs of one optimizer step's stacked micro-batches, all `nproc` hosts (default: this
    job's), as the loop feeds them."""
    nproc = nproc or jax.process_count()
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


def dry_run(cfg: TrainConfig, topology: Slice | None = None, hlo_file: str | Path | None = None) -> dict:
    """Lowers and compiles the step of `cfg` on this process's devices, or for a TPU slice; returns the
    report's figures.

    The text length is the longest of `data.buckets` with one image, the merged length its bucket (what
    the loop compiles for its longest batches). XLA counts the FLOPs of a loop body once, so with scanned
    layers or gradient accumulation its figure is below the step's (the roofline multiplies loops out);
    `model_flops` is `mgjax.plan.model_flops`. On a
    slice, a program the chip cannot hold is a result (`fits` False, the compiler's figures), not an error.
    `hlo_file`: where to write the compiled program's HLO text (to read it, or to re-derive the roofline)."""
    hosts = topology.hosts if topology else jax.process_count()
    cfg = cfg.for_hosts(hosts)
    with tempfile.TemporaryDirectory() as tmp:  # a demo tokenizer is written, and thrown away
        model, module, mesh, rules, _, tx, a_state, a_frozen = run_setup(
            cfg, Path(tmp), topology.devices() if topology else None, hosts)
    config = model.config
    text_len = max(cfg.data.buckets)
    length = length_bucket(text_len - 1 + config.tokens_per_image, config.max_length, TRAIN_PER_OCTAVE)
    batch = abstract_batch(cfg, config, mesh, rules, text_len, hosts)
    step = jax.jit(make_train_step(module, tx, length, jax.random.key(cfg.seed + 1)), donate_argnums=0)
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    n_params, n_train = count((a_state.params, a_frozen)), count(a_state.params)
    platform = mesh.devices.flat[0].platform
    out = {"devices": len(mesh.devices.flat), "platform": platform, "mesh": dict(mesh.shape),
           "fast_paths": fast_paths(config.lm, platform),
           "hosts": hosts, "micro_batches": batch["input_ids"].shape[0], "rows": batch["input_ids"].shape[1],
           "text_len": text_len, "merged_len": length, "params": n_params, "trainable": n_train,
           "model_flops": model_flops(config, cfg.global_batch, length, math.prod(batch["images"].shape[:2]))}
    with activate(mesh, rules):
        out.update(compile_figures(step, (a_state, a_frozen, batch), topology, hlo_file))
    return out


def compile_figures(fn, args: tuple, topology: Slice | None, hlo_file: str | Path | None = None) -> dict:
    """Lowers and compiles jitted `fn` for `args` (placed ShapeDtypeStructs). Figures: times, XLA's FLOPs and
    memory per device, and, for a TPU slice, the chip's HBM, whether the program fits it (a compile the chip
    cannot hold is read from the compiler's error: `fits` False with what it needs) and the roofline step
    (`mgjax.roofline`)."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    out = {"lower_s": t1 - t0}
    if topology is not None:
        out.update(slice=topology.name, chip=topology.chip.name, chips=topology.chips,
                   hbm_bytes=hbm_bytes(topology))
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is a result
        oom = read_oom(str(e)) if topology is not None else None
        if oom is None:
            raise
        out.update(compile_s=time.perf_counter() - t1, fits=False, xla_flops_per_device=None)
        if oom[0]:
            out["peak_bytes"] = oom[0]
        if oom[1]:
            out["hbm_bytes"] = oom[1]
        return out
    out["compile_s"] = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["xla_flops_per_device"] = float(cost.get("flops", np.nan)) if cost else None
    if mem is not None:
        out.update({f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes")) for k in
                    ("argument", "output", "alias", "temp", "generated_code")})
        # the compiler's own peak (its buffer assignment: arguments dead before the end are not held to it),
        # else the sum of the parts
        out["peak_bytes"] = int(getattr(mem, "peak_memory_in_bytes", 0)) or \
            out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    text = compiled.as_text() if topology is not None or hlo_file else None
    if hlo_file:
        Path(hlo_file).write_text(text)
    if topology is not None:
        out["fits"] = out.get("peak_bytes", 0) <= out["hbm_bytes"]
        cost = hlo_cost(text)
        chip = topology.chip
        out.update(step_flops=cost.flops, step_hbm_bytes=cost.bytes, step_collective_bytes=cost.collective_bytes,
                   **step_time(cost, chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth))
    return out


def mfu(r: dict) -> float | None:
    """Model FLOPs utilisation of the roofline step: `model_flops` over the slice's peak for `step_s`."""
    if "step_s" not in r or "model_flops" not in r:
        return None
    return r["model_flops"] / (r["devices"] * CHIPS[r["chip"]].peak_flops * r["step_s"])


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def secs(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.1f} ms"


def fits_line(r: dict) -> str:
    """The verdict for a TPU slice, the report's last line: `fits: yes (X of Y GB per chip)` or `fits: no
    (needs X of Y GB per chip)`."""
    need = f"{r['peak_bytes'] / 2**30:.2f}" if "peak_bytes" in r else "more than"
    if r["fits"]:
        return f"fits: yes ({need} of {r['hbm_bytes'] / 2**30:.2f} GB per chip)"
    return f"fits: no (needs {need} of {r['hbm_bytes'] / 2**30:.2f} GB per chip)"


def report(r: dict) -> str:
    """The dry run's figures as lines for a terminal; for a TPU slice, the chips and the `fits:` line last."""
    def size(key):
        return gb(r[key]) if key in r else "n/a"

    where = (f"{r['devices']} TPU {r['chip']} chips ({r['slice']}, {r['hosts']} host(s); micro_batch is per host)"
             if "slice" in r else f"{r['devices']} {r['platform']} device(s)")
    lines = [f"step compiled for {where}, mesh {r['mesh']}: {r['micro_batches']} "
             f"micro-batch(es) of {r['rows']} rows, text {r['text_len']} -> merged length {r['merged_len']}",
             f"parameters {r['params'] / 1e6:.2f} M ({r['trainable'] / 1e6:.2f} M trainable), {r['fast_paths']}; "
             f"lowering {r['lower_s']:.1f} s, compiling {r['compile_s']:.1f} s"]
    if r.get("fits") is False:
        lines.append(f"the TPU compiler ran out of memory: per chip {size('peak_bytes')} needed, "
                     f"{size('hbm_bytes')} of HBM")
    else:
        lines.append(f"per device: arguments {size('argument_bytes')}, outputs {size('output_bytes')} (donated "
                     f"{size('alias_bytes')}), temporaries {size('temp_bytes')}, code {size('generated_code_bytes')}; "
                     f"peak about {size('peak_bytes')}" + (f" of {size('hbm_bytes')} HBM" if "slice" in r else ""))
    lines.append(f"FLOPs per step: model 6·N·tokens {r['model_flops']:.3e}; XLA per device "
                 + (f"{r['xla_flops_per_device']:.3e} (loop bodies counted once)" if r["xla_flops_per_device"]
                    else "n/a"))
    if "step_s" in r:
        lines.append(f"roofline per step (loops multiplied out, per chip): {r['step_flops']:.3e} FLOPs, "
                     f"{gb(r['step_hbm_bytes'])} HBM traffic, {gb(r['step_collective_bytes'])} collectives -> "
                     f"compute {secs(r['compute_s'])}, HBM {secs(r['hbm_s'])}, ICI {secs(r['ici_s'])}: "
                     f"step about {secs(r['step_s'])} ({r['bound']}-bound), MFU {mfu(r):.0%}")
    if "slice" in r:
        lines.append(fits_line(r))
    return "\n".join(lines)
