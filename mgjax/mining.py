"""Patch info mining (MGM's `unified_resampler`), HD grid/global assembly, and the projector."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from mgjax.layers.common import LayerNorm, activation, dense

Dtype = Any


class UniProjector(nn.Module):
    """`vlm_uni_*_projector`: LayerNorm (index 0, eps 1e-5) then Linear (index 1); `axes` are the
    Linear's logical (in, out) names."""

    features: int
    axes: tuple[str, str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(1e-5, self.axes[0], name="0", **kw)(x)
        return dense(self.features, self.axes, use_bias=True, name="1", **kw)(x)


class MLPProjector(nn.Module):
    """`mm_projector` of type `mlp2x_gelu`: Linear (index 0), exact GELU, Linear (index 2)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, ("vis_embed", "mlp"), name="0", **kw)(x)
        return dense(self.features, ("mlp", "embed"), name="2", **kw)(activation("gelu")(x))


def mine(x_low: jax.Array, x_high: jax.Array, query: UniProjector, key: UniProjector,
         value: UniProjector) -> jax.Array:
    """One-head cross-attention of each low-res token over its high-res window.

    x_low [B, N, C] (N = P*P CLIP tokens, row-major), x_high [B, P*M, P*M, Ca] (NHWC).
    Token i = r*P + c attends over the M x M window at rows r*M.., cols c*M.. of x_high.
    Returns the mined features [B, N, C'] (without the residual; C' = the projected width).
    """
    p = math.isqrt(x_low.shape[1])
    windows = rearrange(x_high, "b (p m) (q n) c -> b (p q) (m n) c", p=p, q=p)
    q = query(x_low)
    k = key(windows)
    v = value(windows)
    scores = jnp.einsum("bnc,bnmc->bnm", q, k, preferred_element_type=jnp.float32) / math.sqrt(k.shape[-1])
    probs = jax.nn.softmax(jnp.nan_to_num(scores), axis=-1).astype(v.dtype)
    return jnp.einsum("bnm,bnmc->bnc", probs, v)


def visual_tokens(clip_feats: jax.Array, aux_map: jax.Array, grid: int, use_global: bool,
                  query: UniProjector, key: UniProjector, value: UniProjector) -> jax.Array:
    """CLIP features + mined high-res detail, in the LLM's token order.

    clip_feats [B, V, N, C] with views [tiles row-major..., global] (V = 1 when grid is 1);
    aux_map [B, H, W, Ca] of the whole image. Returns [B, V*N, C] ordered [global, TL, TR, BL, BR].
    """
    b, _, n, c = clip_feats.shape
    if grid == 1:
        x = clip_feats[:, 0]
        return x + mine(x, aux_map, query, key, value)
    g2 = grid * grid
    tiles = rearrange(clip_feats[:, :g2], "b v n c -> (b v) n c")
    tiles_aux = rearrange(aux_map, "b (g h) (k w) c -> (b g k) h w c", g=grid, k=grid)
    out = rearrange(tiles + mine(tiles, tiles_aux, query, key, value), "(b v) n c -> b (v n) c", b=b)
    if use_global:
        glob = clip_feats[:, g2]
        h, w = aux_map.shape[1] // grid, aux_map.shape[2] // grid
        # F.interpolate(scale_factor=1/grid, bilinear) in float32 == grid x grid average pooling.
        glob_aux = jax.image.resize(aux_map.astype(jnp.float32), (b, h, w, aux_map.shape[-1]), "bilinear",
                                    antialias=False).astype(aux_map.dtype)
        out = jnp.concatenate([glob + mine(glob, glob_aux, query, key, value), out], axis=1)
    return out
