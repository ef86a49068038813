"""One causal decoder for the Llama family (Vicuna, Llama-3, Yi), Gemma and Mixtral.

Per-family switches (all from `LMConfig`): Gemma's (1 + w) RMSNorm, sqrt(hidden) input scaling,
GeGLU and tied head; Mixtral's MoE feed-forward; GQA/MQA through `num_kv_heads`; RoPE theta.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgjax.config import LMConfig
from mgjax.layers.attention import Attention, KVCache, cached_mask, causal_mask, splash_segments
from mgjax.layers.common import Embed, RMSNorm, dense
from mgjax.layers.mlp import GatedMLP, MoE
from mgjax.layers.rope import rope_tables
from mgjax.sharding import constrain, target_platform

Dtype = Any

# LMConfig.remat -> what jax.checkpoint may keep from the forward pass (None: nothing).
_REMAT = {"dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, "full": None}


def init_cache(config: LMConfig, batch: int, slots: int, dtype) -> Any:
    """An empty KV cache of `slots` positions for `Decoder.__call__`: one `KVCache` per layer, or one with
    a leading [num_layers] axis for scanned layers."""
    shape = (batch, slots, config.num_kv_heads, config.head_dim)
    if config.scan_layers:
        shape = (config.num_layers, *shape)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


class DecoderLayer(nn.Module):
    config: LMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scanned: bool = False  # under nn.scan the layer returns (carry, its cache or None)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, rope: tuple[jax.Array, jax.Array],
                 cache: KVCache | None = None, index: jax.Array | None = None, valid: jax.Array | None = None):
        """x [B, T, D] -> [B, T, D]; with a `cache` (generation) -> (x, cache), see `Attention`."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.norm_eps, c.gemma_norm, name="input_layernorm", **kw)(x)
        attention_impl, moe_impl = c.impls(target_platform())
        adapt = dict(quant=c.quant, lora=c.lora)
        attn = Attention(c.num_heads, c.num_kv_heads, c.head_dim, use_bias=False, impl=attention_impl,
                         cache_block=c.cache_block, name="self_attn", **adapt, **kw)(h, mask, rope, cache, index, valid)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        h = RMSNorm(c.norm_eps, c.gemma_norm, name="post_attention_layernorm", **kw)(x)
        if c.num_experts:
            x = x + MoE(c.num_experts, c.num_experts_per_tok, c.intermediate_size, c.activation, moe_impl,
                        name="block_sparse_moe", **adapt, **kw)(h)
        else:
            x = x + GatedMLP(c.intermediate_size, c.activation, name="mlp", **adapt, **kw)(h)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        if self.scanned:
            return x, cache
        return x if cache is None else (x, cache)


class Decoder(nn.Module):
    """Token embedding, decoder layers, final norm and LM head.

    `embed` and `__call__` are separate so that MGM can splice image features between them.
    """

    config: LMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, quant=c.quant, **kw)
        layer = DecoderLayer
        if c.remat != "none":
            layer = nn.remat(DecoderLayer, policy=_REMAT[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                  in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                                  length=c.num_layers,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(c, scanned=True, name="layers", **kw)
        else:
            self.layers = [layer(c, name=f"layers_{i}", **kw) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.norm_eps, c.gemma_norm, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", quant=c.quant,
                                 lora=c.lora, **kw)

    def embed(self, ids: jax.Array) -> jax.Array:
        """int [B, T] -> [B, T, D] (unscaled: Gemma's scaling happens in `__call__`), split by rows.

        The table's embed axis is gathered first (its vocab axis stays split): looked up in the table's
        own layout, the rows come out split along D over fsdp, which XLA cannot turn into the row split of
        the activations on a mesh with data, fsdp and tensor axes without replicating them whole."""
        table = constrain(self.embed_tokens(), ("vocab", None))
        return constrain(jnp.take(table, ids, axis=0), ("act_batch", "act_len", "act_embed"))

    def __call__(self, embeds: jax.Array, positions: jax.Array, valid: jax.Array,
                 segments: jax.Array | None = None, cache: Any = None, index: jax.Array | None = None,
                 last_only: bool = False, hidden_only: bool = False):
        """embeds [B, L, D], positions int [B, L], valid bool [B, L] -> float32 logits [B, L, V].
        `segments` int [B, L] (packed rows; 0 at padding): attention stays within a segment.

        Generation: with a `cache` (`init_cache`), the L new tokens go to cache slots index .. index + L - 1,
        `valid` is bool [B, S] over all the cache's slots, and the call returns (logits, cache).
        `last_only`: logits of the last position only ([B, 1, V]), not a [B, L, V] head over a prompt.
        `hidden_only`: the final-normed hidden states [B, L, D] instead of logits (`head` makes them logits:
        the training loss runs it over chunks of positions)."""
        c = self.config
        x = embeds.astype(self.dtype)
        if c.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        if cache is not None:
            mask = cached_mask(valid, index, x.shape[1])
        elif c.impls(target_platform())[0] == "splash":
            mask = splash_segments(valid, segments)
        else:
            mask = causal_mask(valid, segments)
        rope = rope_tables(positions, c.head_dim, c.rope_theta)
        if c.scan_layers:
            x, cache = self.layers(x, mask, rope, cache, index, None if cache is None else valid)
        elif cache is None:
            for layer in self.layers:
                x = layer(x, mask, rope)
        else:
            new = []
            for layer, layer_cache in zip(self.layers, cache, strict=True):
                x, layer_cache = layer(x, mask, rope, layer_cache, index, valid)
                new.append(layer_cache)
            cache = tuple(new)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if hidden_only:
            return x
        logits = self.head(x)
        return logits if cache is None else (logits, cache)

    def head(self, x: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, L, D] -> float32 logits [B, L, V] (Gemma: the tied embedding)."""
        if self.config.tie_word_embeddings:
            logits = jnp.einsum("bld,vd->blv", x, self.embed_tokens(),
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

    def forward_ids(self, ids: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
        """A text-only forward: int ids [B, T] -> float32 logits [B, T, V]."""
        return self(self.embed(ids), positions, valid)
