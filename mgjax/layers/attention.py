"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), float32 softmax."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from mgjax.layers.common import dense
from mgjax.layers.rope import apply_rope

Dtype = Any


def causal_mask(valid: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    """Bool [B, 1, T, T]: query t sees key s <= t when key s is valid (valid: bool [B, T]) and, with
    `segments` int [B, T] (packed rows), only when s and t are in the same segment."""
    t = valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None] & valid[:, None, :]
    if segments is not None:
        mask = mask & (segments[:, :, None] == segments[:, None, :])
    return mask[:, None]


class Attention(nn.Module):
    """q/k/v/out projections around scaled dot-product attention.

    `mask` is bool, broadcastable to [B, 1, Tq, Tk] (True = attend); `rope` is (cos, sin) or None.
    Kernels: q [D, H, hd], k/v [D, KV, hd], out [H, hd, D] (logical names from the *_axis fields).
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
    def __call__(self, x: jax.Array, mask: jax.Array | None, rope: tuple[jax.Array, jax.Array] | None = None):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        e, h, kv = self.embed_axis, self.heads_axis, self.kv_heads_axis
        q = dense((self.num_heads, self.head_dim), (e, h, "head_dim"), name="q_proj", **kw)(x)
        k = dense((self.num_kv_heads, self.head_dim), (e, kv, "head_dim"), name="k_proj", **kw)(x)
        v = dense((self.num_kv_heads, self.head_dim), (e, kv, "head_dim"), name="v_proj", **kw)(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = rearrange(q, "b t (k g) d -> b t k g d", k=self.num_kv_heads)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim**-0.5)
        if mask is not None:
            scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = rearrange(out, "b t k g d -> b t (k g) d")
        return dense(x.shape[-1], (h, "head_dim", e), in_axes=2, name=self.out_name, **kw)(out)
