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

    x_low [B, N, C] (N = P*P tokens, row-major), x_high [B, P*M, P*M, Ca] (NHWC).
    Token i = r*P + c attends over the M x M window at rows r*M.., cols c*M.. of x_high.
    Returns the mined features [B, N, C'] (without the residual; C' = the projected width).

    The windows are read in place, one band of M rows of x_high at a time: only a band's LayerNorm and
    projections exist at once, never a rearranged copy of the whole map.
    """
    b, n, _ = x_low.shape
    p = math.isqrt(n)
    m = x_high.shape[1] // p
    q = query(x_low).reshape(b, p, p, -1)
    rows = []
    for r in range(p):
        band = x_high[:, r * m:(r + 1) * m].reshape(b, m, p, m, x_high.shape[-1])  # [B, M, P windows, M, Ca]
        k, v = key(band), value(band)
        scores = jnp.einsum("bqc,bmqnc->bqmn", q[:, r], k, preferred_element_type=jnp.float32) / math.sqrt(
            k.shape[-1])
        probs = jax.nn.softmax(jnp.nan_to_num(scores).reshape(b, p, m * m), axis=-1).astype(v.dtype)
        rows.append(jnp.einsum("bqmn,bmqnc->bqc", probs.reshape(b, p, m, m), v))
    return jnp.stack(rows, axis=1).reshape(b, n, -1)


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
    p = math.isqrt(n)
    # Tile (g, k)'s window (r, c) is window (g*P + r, k*P + c) of the whole map: the tiles' tokens are
    # mined as one (grid*P)^2 grid over aux_map, so the map is never cut into tile copies.
    tiles = rearrange(clip_feats[:, :g2], "b (g k) (r c) d -> b (g r k c) d", g=grid, r=p)
    out = rearrange(tiles + mine(tiles, aux_map, query, key, value), "b (g r k c) d -> b (g k r c) d",
                    g=grid, k=grid, r=p)
    if use_global:
        glob = clip_feats[:, g2]
        h, w = aux_map.shape[1] // grid, aux_map.shape[2] // grid
        # F.interpolate(scale_factor=1/grid, bilinear) in float32 == grid x grid average pooling.
        glob_aux = jax.image.resize(aux_map.astype(jnp.float32), (b, h, w, aux_map.shape[-1]), "bilinear",
                                    antialias=False).astype(aux_map.dtype)
        out = jnp.concatenate([glob + mine(glob, glob_aux, query, key, value), out], axis=1)
    return out
