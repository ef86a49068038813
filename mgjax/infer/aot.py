"""`mgjax generate|eval ... --dry-run --topology SLICE`: generation's two programs compiled ahead of time with the
TPU compiler for a slice's chips, without weights: the prompt pass (towers, mining, the LLM over the merged
prompts into a fresh KV cache) and one decode step over that cache (donated, as the decode loop updates it in
place). Per chip: weights, KV cache, each program's peak against the chip's HBM, and a roofline time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mgjax.config import MeshConfig, MGMConfig
from mgjax.infer.generate import prefill
from mgjax.model import MGM, abstract_params
from mgjax.pretrained import _budget, length_bucket
from mgjax.layers.attention import CACHE_AXES
from mgjax.sharding import (activate, batch_sharding, batch_shards, bytes_per_device, make_mesh, mesh_rules,
                            param_shardings)
from mgjax.topology import Slice
from mgjax.train.aot import compile_figures, fits_line, gb, secs
from mgjax.errors import MGJaxError

# The batch over every chip, weights gathered per layer. tensor=-1 keeps the weights still while decoding but
# leaves every image of the batch to every chip's towers: at batch 32 it fits no v5e slice (README, TPU slices).
INFERENCE_MESH = "fsdp=-1"


@dataclass(frozen=True)
class Workload:
    batch: int  # prompts per jitted batch
    max_new_tokens: int  # the token budget (the cache gets the compiled room: a power of two >= it)
    prompt_tokens: int  # text tokens of the longest prompt, image tokens not counted
    dtype: str = "bfloat16"


def dry_run(config: MGMConfig, topology: Slice, work: Workload, mesh: str = INFERENCE_MESH) -> dict:
    """Compiles the prompt pass and the decode step of `work` over `mesh` on the slice's chips (one host's worth:
    each host answers its own share of the questions); returns both programs' figures and `fits`."""
    devices = topology.devices()[:topology.chips_per_host]
    mesh = make_mesh(MeshConfig.parse(mesh), devices)
    dt = jnp.dtype(work.dtype)
    module = MGM(config, dtype=dt, param_dtype=dt)
    shardings = param_shardings(abstract_params(module, boxed=True), mesh)
    # floats in the workload's dtype; a quantised LLM's integers as they are stored
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dt if jnp.issubdtype(a.dtype, jnp.floating)
                                                            else a.dtype, sharding=s), abstract_params(module),
                          shardings)
    length = length_bucket(work.prompt_tokens + config.tokens_per_image, config.max_length)
    room = _budget(work.max_new_tokens)
    b = work.batch
    if b % batch_shards(mesh):
        raise MGJaxError(f"--batch-size {b} does not split over the batch axes of mesh {dict(mesh.shape)}")

    def placed(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))

    views = () if config.num_views == 1 else (config.num_views,)
    inputs = (placed((b, length), jnp.int32), placed((b, *views, config.image_size, config.image_size, 3), dt),
              placed((b, config.image_size_aux, config.image_size_aux, 3), dt), placed((b, length), jnp.int32))
    out = {"devices": len(devices), "mesh": dict(mesh.shape), "batch": b, "merged_len": length, "room": room,
           "weights_bytes": bytes_per_device(params, shardings)}
    with activate(mesh):
        prompt = jax.jit(lambda p, *x: prefill(module, p, *x, length, room))
        out["prompt"] = compile_figures(prompt, (params, *inputs), topology)
        _, cache, valid, _ = jax.eval_shape(prompt, params, *inputs)
        cache_shardings = jax.tree.map(lambda a: _cache_sharding(a.shape, mesh), cache)
        cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, cache_shardings)
        out["cache_bytes"] = bytes_per_device(cache, cache_shardings)
        decode = jax.jit(lambda p, t, pos, v, c, i: module.apply({"params": p}, t, pos, v, c, i, method=MGM.decode),
                         donate_argnums=4)
        out["decode"] = compile_figures(decode, (params, placed((b,), jnp.int32), placed((b,), jnp.int32),
                                                 placed(valid.shape, jnp.bool_), cache,
                                                 jax.ShapeDtypeStruct((), jnp.int32)), topology)
    out["fits"] = out["prompt"]["fits"] and out["decode"]["fits"]
    return out


def _cache_sharding(shape: tuple, mesh) -> NamedSharding:
    """A cache array [(L,) B, S, KV, hd] laid out by the rule table's cache axes, as the attention layers
    constrain it (a dimension its axes do not divide, e.g. one KV head over tensor, stays whole)."""
    names = (None,) * (len(shape) - len(CACHE_AXES)) + CACHE_AXES
    spec = nn.logical_to_mesh_axes(names, mesh_rules(mesh))
    spec = [None if axes is not None and d % math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple)
                                                                           else (axes,))) else axes
            for d, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))]
    return NamedSharding(mesh, PartitionSpec(*spec))


def report(r: dict, what: str) -> str:
    """The inference dry run for a terminal; the `fits:` line last (the larger of the two programs' peaks)."""
    p, d = r["prompt"], r["decode"]
    lines = [f"{what} compiled for {r['devices']} TPU {p['chip']} chips of {p['slice']} (one host: each answers its "
             f"share), mesh {r['mesh']}: batch {r['batch']}, prompts padded to {r['merged_len']} merged tokens, "
             f"cache room {r['room']} new tokens",
             f"per chip: weights {gb(r['weights_bytes'])}, KV cache {gb(r['cache_bytes'])}"]
    for name, x in (("prompt pass", p), ("decode step", d)):
        line = f"{name}: compiling {x['compile_s']:.1f} s; "
        if x["fits"]:
            line += (f"peak {gb(x['peak_bytes'])} (temporaries {gb(x['temp_bytes'])}); roofline "
                     f"{secs(x['step_s'])} ({x['bound']}-bound)")
        else:
            line += f"out of memory: needs {gb(x['peak_bytes']) if 'peak_bytes' in x else 'more than HBM'}"
        lines.append(line)
    worst = max((p, d), key=lambda x: (not x["fits"], x.get("peak_bytes", 0)))
    lines.append(fits_line({**worst, "fits": r["fits"]}))
    return "\n".join(lines)
