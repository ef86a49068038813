"""CLIP ViT vision tower (HF `CLIPVisionModel` semantics), returning one selected hidden state."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgjax.config import CLIPConfig
from mgjax.layers.attention import Attention
from mgjax.layers.common import MLP, LayerNorm
from mgjax.sharding import constrain

Dtype = Any


class CLIPEmbeddings(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, 3] -> [B, 1 + P*P, D] (CLS first, patches row-major)."""
        c = self.config
        init = nn.initializers.normal(0.02)
        cls = self.param("class_embedding", nn.with_logical_partitioning(init, ("vis_embed",)),
                         (c.hidden_size,), self.param_dtype)
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                          use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.lecun_normal(), (None, None, "conv_in", "vis_embed")),
                          name="patch_embedding")(pixels.astype(self.dtype))
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, c.hidden_size))
        pos = nn.Embed(c.grid**2 + 1, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=nn.with_logical_partitioning(init, (None, "vis_embed")),
                       name="position_embedding")(jnp.arange(c.grid**2 + 1))
        return jnp.concatenate([cls, patches], axis=1) + pos


class CLIPEncoderLayer(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(c.layer_norm_eps, "vis_embed", name="layer_norm1", **kw)(x)
        x = x + Attention(c.num_heads, c.num_heads, c.hidden_size // c.num_heads, use_bias=True,
                          out_name="out_proj", embed_axis="vis_embed", heads_axis="vis_heads",
                          kv_heads_axis="vis_heads", name="self_attn", **kw)(h, mask=None)
        h = LayerNorm(c.layer_norm_eps, "vis_embed", name="layer_norm2", **kw)(x)
        x = x + MLP(c.intermediate_size, "quick_gelu", ("vis_embed", "vis_mlp"), name="mlp", **kw)(h)
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class CLIPEncoder(nn.Module):
    config: CLIPConfig
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(self.config, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class CLIPVisionTower(nn.Module):
    """Hidden state after `num_layers_used` encoder layers, without the CLS token: [B, P*P, D].

    MGM takes hidden state -2 of 24 (the output of layer 22); layers past it are never built, and
    `post_layernorm` is never applied (docs/mgm_spec.md section 3).
    """

    config: CLIPConfig
    num_layers_used: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPEmbeddings(self.config, name="embeddings", **kw)(pixels)
        x = LayerNorm(self.config.layer_norm_eps, "vis_embed", name="pre_layrnorm", **kw)(x)
        x = CLIPEncoder(self.config, self.num_layers_used, name="encoder", **kw)(x)
        return x[:, 1:]
