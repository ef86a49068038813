"""Weight-only quantisation of the LLM's matrices: int8 per output channel, int4 in groups of `INT4_GROUP`.

A matrix w with input axes `in` (the ones a matmul contracts) is stored as `q` and a float `scale`:
- int8: q int8, the shape of w; scale = max |w| / 127 over the input axes (one per output channel).
- int4: the input axes flattened into groups of g (`int4_group`); q uint8 [*pre, G, g / 2, *post], two
  values a byte (the even input row in the low nibble); scale = max |w| / 7 per group, [*pre, G, *post].
The model computes in its float dtype on `dequantize(q, scale)`: storage shrinks, the arithmetic does not
change (the original's bitsandbytes `load_8bit` / `load_4bit` does the same with its own formats).

Quantised: every linear layer of the LLM (attention, MLP, experts, LM head) and the embedding table (per
token row); norms, Mixtral's router and the towers stay float. The parameter `{name}` holds q and
`{name}_scale` the scales.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mgjax.config import TWO_INPUT_LINEARS
from mgjax.errors import MGJaxError

INT4_GROUP = 128
SCALE_SUFFIX = "_scale"


def int4_group(n_in: int) -> int:
    """The group size over an input of `n_in` values: 128, or for inputs it does not divide (tiny test
    models) the largest even divisor of `n_in` below it."""
    for g in range(min(INT4_GROUP, n_in), 1, -1):
        if n_in % g == 0 and g % 2 == 0:
            return g
    raise MGJaxError(f"int4: an input of {n_in} values does not split into groups of an even size")


def quantized_shapes(shape: Sequence[int], start: int, n_in: int, mode: str) -> tuple[tuple, tuple]:
    """(q shape, scale shape) of a float matrix of `shape` whose input axes are shape[start:start + n_in]."""
    pre, inp, post = tuple(shape[:start]), tuple(shape[start:start + n_in]), tuple(shape[start + n_in:])
    if mode == "int8":
        return tuple(shape), pre + post
    g = int4_group(math.prod(inp))
    groups = math.prod(inp) // g
    return pre + (groups, g // 2) + post, pre + (groups,) + post


def quantized_axes(axes: Sequence[str | None], start: int, n_in: int, mode: str) -> tuple[tuple, tuple]:
    """Logical axis names of (q, scale) for a matrix with logical `axes`. int4's group axes are not split: their
    counts (86 groups in Llama-7B's MLP, 1 in a tiny model) rarely divide a mesh axis; the output axes still are."""
    pre, post = tuple(axes[:start]), tuple(axes[start + n_in:])
    if mode == "int8":
        return tuple(axes), pre + post
    return pre + (None, None) + post, pre + (None,) + post


def quantize(w: jax.Array, start: int, n_in: int, mode: str) -> tuple[jax.Array, jax.Array]:
    """float w -> (q, scale) in the layout of the module docstring (scale float32)."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(range(start, start + n_in))
    if mode == "int8":
        amax = jnp.max(jnp.abs(w), axis=axes)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        q = jnp.round(w / jnp.expand_dims(scale, axes))
        return jnp.clip(q, -127, 127).astype(jnp.int8), scale
    q_shape, scale_shape = quantized_shapes(w.shape, start, n_in, mode)
    g = q_shape[start + 1] * 2
    grouped = w.reshape(*w.shape[:start], scale_shape[start], g, *w.shape[start + n_in:])
    amax = jnp.max(jnp.abs(grouped), axis=start + 1)
    scale = jnp.where(amax > 0, amax / 7.0, 1.0)
    q = jnp.clip(jnp.round(grouped / jnp.expand_dims(scale, start + 1)), -8, 7).astype(jnp.int8)
    pairs = q.reshape(*q.shape[:start + 1], g // 2, 2, *q.shape[start + 2:])
    lo, hi = (jnp.take(pairs, i, axis=start + 2).astype(jnp.uint8) for i in (0, 1))
    return (lo & 0xF) | (hi << 4), scale


def dequantize(q: jax.Array, scale: jax.Array, start: int, in_shape: Sequence[int], mode: str, dtype) -> jax.Array:
    """(q, scale) -> the float matrix in `dtype`, input axes `in_shape` at `start`."""
    n_in = len(in_shape)
    if mode == "int8":
        return q.astype(dtype) * jnp.expand_dims(scale, tuple(range(start, start + n_in))).astype(dtype)
    signed = jax.lax.bitcast_convert_type(q, jnp.int8)
    lo = jnp.right_shift(jnp.left_shift(signed, 4), 4)  # arithmetic shifts sign-extend the nibbles
    hi = jnp.right_shift(signed, 4)
    values = jnp.stack([lo, hi], axis=start + 2)  # [*pre, G, g / 2, 2, *post]
    values = values.reshape(*q.shape[:start + 1], -1, *q.shape[start + 2:])
    w = values.astype(dtype) * jnp.expand_dims(scale, start + 1).astype(dtype)
    return w.reshape(*q.shape[:start], *in_shape, *q.shape[start + 2:])


def matrix_param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None], init, start: int,
                 n_in: int, mode: str, param_dtype, dtype) -> jax.Array:
    """A module's matrix parameter `name` of float `shape` (input axes shape[start:start + n_in]) in `dtype`:
    stored as `param_dtype`, or with `mode` int8 / int4 as `name` (q) and `name`_scale."""
    if mode == "none":
        return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                            param_dtype).astype(dtype)
    q_shape, scale_shape = quantized_shapes(shape, start, n_in, mode)
    q_axes, scale_axes = quantized_axes(axes, start, n_in, mode)
    # The values come from `quantize_params` (or a checkpoint): initialising them is only for shapes.
    q = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros_init(), q_axes), q_shape,
                     jnp.int8 if mode == "int8" else jnp.uint8)
    scale = module.param(name + SCALE_SUFFIX, nn.with_logical_partitioning(nn.initializers.ones_init(), scale_axes),
                         scale_shape, param_dtype)
    return dequantize(q, scale, start, shape[start:start + n_in], mode, dtype)


def matrix_layout(path: Sequence[str]) -> tuple[int, int] | None:
    """(start, n_in) of a float LLM parameter that `quant` stores quantised (path as in the parameter tree,
    scanned layers' leading axis counted), or None for one that stays float."""
    if path[0] != "llm":
        return None
    lead = int(len(path) > 1 and path[1] == "layers")  # scanned layers stack a leading [L] axis
    leaf = path[-1]
    if path[-2:] == ("embed_tokens", "embedding"):
        return 1, 1  # [V, D]: a row per token
    if len(path) > 2 and path[-2] == "experts" and leaf in ("w1", "w2", "w3"):
        return lead + 1, 1  # [(L,) E, in, out]
    if leaf == "kernel" and path[-2] != "gate":  # Mixtral's router stays float
        return lead, 2 if path[-2] in TWO_INPUT_LINEARS else 1
    return None


def quantize_params(params: dict, mode: str, shardings: dict | None = None) -> dict:
    """A float parameter tree -> the tree of the same model with `LMConfig.quant` = `mode`, each matrix
    quantised on the device it is on (with `shardings`, the quantised tree's, placed there)."""
    flat = traverse_util.flatten_dict(params)
    target = None if shardings is None else traverse_util.flatten_dict(shardings)
    out = {}
    for path, value in flat.items():
        layout = matrix_layout(path)
        if layout is None:
            out[path] = value
            continue
        scale_path = (*path[:-1], path[-1] + SCALE_SUFFIX)
        out_shardings = None if target is None else (target[path], target[scale_path])
        q, scale = jax.jit(quantize, static_argnums=(1, 2, 3), out_shardings=out_shardings)(value, *layout, mode)
        out[path], out[scale_path] = q, scale.astype(value.dtype)
    return traverse_util.unflatten_dict(out)


def dequantize_params(params: dict, mode: str, abstract_float: dict) -> dict:
    """The inverse of `quantize_params` up to rounding: float matrices of `abstract_float`'s shapes and dtypes."""
    flat, out = traverse_util.flatten_dict(params), {}
    for path, a in traverse_util.flatten_dict(abstract_float).items():
        layout = matrix_layout(path)
        if layout is None:
            out[path] = flat[path]
            continue
        start, n_in = layout
        scale = flat[(*path[:-1], path[-1] + SCALE_SUFFIX)]
        out[path] = dequantize(flat[path], scale, start, a.shape[start:start + n_in], mode, a.dtype)
    return traverse_util.unflatten_dict(out)


def weight_bytes(params: Any, prefix: str = "llm") -> int:
    """Bytes of the parameters under `prefix` (quantised ones as stored)."""
    flat = traverse_util.flatten_dict(params)
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for p, a in flat.items() if p[0] == prefix)


def llm_bytes(config, mode: str, dtype: str = "bfloat16") -> int:
    """Bytes of the LLM's parameters of an MGMConfig stored as `mode` ("none", "int8", "int4"), its float
    parts (scales included) in `dtype`; from the abstract tree, nothing allocated."""
    import dataclasses

    from mgjax.lm.decoder import Decoder  # the decoder's layers import this module

    # scanned: one layer traced, the same bytes (MGM-34B's 60 layers one by one took seconds)
    lm = dataclasses.replace(config.lm, quant=mode, scan_layers=True)
    ids = jnp.zeros((1, 1), jnp.int32)
    dt = jnp.dtype(dtype)
    shapes = jax.eval_shape(lambda key: Decoder(lm, dtype=dt, param_dtype=dt).init(
        key, ids, ids, ids > -1, method=Decoder.forward_ids), jax.random.key(0))
    return weight_bytes({"llm": nn.unbox(shapes["params"])})


def weight_report(config, params: Any) -> str:
    """One line: the LLM weight bytes of a loaded model (`params` as `config.lm.quant` stores them) against the
    same LLM in bfloat16."""
    held, bf16 = weight_bytes(params), llm_bytes(config, "none")
    return (f"LLM weights: {held / 1e9:.3g} GB as {config.lm.quant} ({held / bf16:.2f}x of {bf16 / 1e9:.3g} GB "
            "in bfloat16)")
