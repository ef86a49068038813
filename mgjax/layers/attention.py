"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), float32 softmax."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from mgjax.layers.common import dense
from mgjax.layers.rope import apply_rope
from mgjax.sharding import constrain

Dtype = Any
_CACHE_AXES = ("cache_batch", "cache_len", "cache_heads", "head_dim")


def causal_mask(valid: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    """Bool [B, 1, T, T]: query t sees key s <= t when key s is valid (valid: bool [B, T]) and, with
    `segments` int [B, T] (packed rows), only when s and t are in the same segment."""
    t = valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None] & valid[:, None, :]
    if segments is not None:
        mask = mask & (segments[:, :, None] == segments[:, None, :])
    return mask[:, None]


class KVCache(NamedTuple):
    """One attention layer's keys and values for generation: k, v [B, S, KV, hd] (S cache slots; with
    scanned layers a leading [L] axis)."""

    k: jax.Array
    v: jax.Array


def cached_mask(valid: jax.Array, index: jax.Array, queries: int) -> jax.Array:
    """Bool [B, 1, Tq, S] for `queries` new tokens written at cache slots index .. index + Tq - 1: a query
    sees the slots up to its own that are valid (valid: bool [B, S], False at prompt padding)."""
    slots = jnp.arange(valid.shape[-1])
    causal = slots[None, :] <= index + jnp.arange(queries)[:, None]
    return (causal[None] & valid[:, None, :])[:, None]


class Attention(nn.Module):
    """q/k/v/out projections around scaled dot-product attention.

    `mask` is bool, broadcastable to [B, 1, Tq, Tk] (True = attend); `rope` is (cos, sin) or None.
    Kernels: q [D, H, hd], k/v [D, KV, hd], out [H, hd, D] (logical names from the *_axis fields).
    With a `cache`, this call's keys and values are written into it at slot `index` and attention runs
    over all its slots (`mask` then [B, 1, Tq, S], see `cached_mask`); the call returns (out, cache).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool
    out_name: str = "o_proj"
    embed_axis: str = "embed"
    heads_axis: str = "heads"
    kv_heads_axis: str = "kv_heads"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, rope: tuple[jax.Array, jax.Array] | None = None,
                 cache: KVCache | None = None, index: jax.Array | None = None):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        e, h, kv = self.embed_axis, self.heads_axis, self.kv_heads_axis
        q = dense((self.num_heads, self.head_dim), (e, h, "head_dim"), name="q_proj", **kw)(x)
        k = dense((self.num_kv_heads, self.head_dim), (e, kv, "head_dim"), name="k_proj", **kw)(x)
        v = dense((self.num_kv_heads, self.head_dim), (e, kv, "head_dim"), name="v_proj", **kw)(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, axis=1)
            cache = KVCache(constrain(k, _CACHE_AXES), constrain(v, _CACHE_AXES))
        q = rearrange(q, "b t (k g) d -> b t k g d", k=self.num_kv_heads)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim**-0.5)
        if mask is not None:
            scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = rearrange(out, "b t k g d -> b t (k g) d")
        out = dense(x.shape[-1], (h, "head_dim", e), in_axes=2, name=self.out_name, **kw)(out)
        return out if cache is None else (out, cache)
