"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), float32 softmax."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from mgjax.config import LoraConfig
from mgjax.errors import MGJaxError
from mgjax.layers.common import dense
from mgjax.layers.rope import apply_rope
from mgjax.sharding import constrain, target_platform

Dtype = Any
CACHE_AXES = ("cache_batch", "cache_len", "cache_heads", "head_dim")


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


def _query_slots(index: jax.Array, queries: int) -> jax.Array:
    """int [1 or B, Tq]: the cache slots of `queries` new tokens written from `index`, a slot shared by every
    row (int scalar) or each row's own (int [B]: a serving engine's rows are at different steps)."""
    return jnp.reshape(index, (-1, 1)) + jnp.arange(queries)


def _write_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`new` [B, Tq, ...] written into `cache` [B, S, ...] at slots index .. index + Tq - 1 (`index` as in
    `_query_slots`)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(cache, new, index)


def cached_mask(valid: jax.Array, index: jax.Array, queries: int) -> jax.Array:
    """Bool [B, 1, Tq, S] for `queries` new tokens written at cache slots index .. index + Tq - 1 (`index`
    an int, or int [B] per row): a query sees the slots up to its own that are valid (valid: bool [B, S],
    False at prompt padding)."""
    slots = jnp.arange(valid.shape[-1])
    causal = slots <= _query_slots(index, queries)[..., None]  # [1 or B, Tq, S]
    return (causal & valid[:, None, :])[:, None]


def splash_segments(valid: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    """What splash attention takes instead of a `causal_mask`: int [B, T] segment ids, 0 at padding, so
    that a token sees the earlier tokens of its own segment (padding sees only padding: those rows are
    not used)."""
    return jnp.where(valid, 1 if segments is None else segments, 0).astype(jnp.int32)


def _xla(q, k, v, mask, dtype):
    """The reference: q [B, T, H, hd], k/v [B, S, KV, hd], float32 scores (scaled as the original does,
    after the product) and softmax."""
    q = rearrange(q, "b t (k g) d -> b t k g d", k=k.shape[2])
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return rearrange(jnp.einsum("bkgts,bskd->btkgd", probs, v), "b t k g d -> b t (k g) d")


_QUERY_BLOCK = 128  # `_causal`'s query block: on a 2-core AVX-512 CPU, 128 ran a 768-token row fastest (64, 256 slower)


def _causal(q, k, v, mask, dtype):
    """Causal attention without a cache, `_xla`'s math one block of `_QUERY_BLOCK` queries at a time over
    only the keys up to the block's last query (the rest are masked anyway): about half the score work and
    memory of the reference, and blocks small enough to stay in cache. q [B, T, H, hd], k/v [B, T, KV, hd],
    mask bool [B, 1, T, T] (causal: `causal_mask`, or a prompt's first T slots of a `cached_mask`).
    Equal to `_xla` up to rounding at every query that sees a key (a query that sees none, padding, gets the
    mean of fewer values)."""
    t = q.shape[1]
    block = _QUERY_BLOCK
    # heads first: [.., t, d] x [.., s, d] products over contiguous rows (50% faster than `_xla`'s layout here)
    q = rearrange(q, "b t (k g) d -> b k g t d", k=k.shape[2])
    k, v = (rearrange(a, "b s k d -> b k s d") for a in (k, v))
    scale = q.shape[-1] ** -0.5
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        scores = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, start:stop], k[:, :, :stop],
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask[:, :, None, start:stop, :stop], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, v[:, :, :stop]))
    return rearrange(jnp.concatenate(outs, axis=3), "b k g t d -> b t (k g) d")


def _blocked(q, k, v, valid, index, dtype, block):
    """Attention over a cache, reading only the blocks of `block` slots that hold tokens: q [B, Tq, H, hd]
    for slots index .. index + Tq - 1, k/v [B, S, KV, hd], valid bool [B, S]. The blocks from the first
    one any row uses (rows are left-padded to a common end) up to the one holding slot index + Tq - 1 are
    visited by a loop with a running (online) softmax, so the cache's empty room for later tokens and the
    padding every row skips are never read. Equal to `_xla` with `cached_mask` up to rounding."""
    b, tq, _, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    q = rearrange(q, "b t (k g) d -> b k g t d", k=kv)
    first = jnp.min(jnp.argmax(valid, axis=1))  # the first slot any row attends to
    queries = _query_slots(index, tq)  # [1 or B, t]
    stop = jnp.max(queries) + 1  # slots >= stop hold nothing yet
    neg = jnp.finfo(jnp.float32).min

    def visit(j, carry):
        m, total, acc = carry  # running max [b, k, g, t], softmax denominator, numerator [b, k, g, t, d]
        start = jnp.minimum(j * block, s - block)  # the last block may overlap the one before it
        kb, vb, ok = (jax.lax.dynamic_slice_in_dim(a, start, block, axis=1) for a in (k, v, valid))
        slots = start + jnp.arange(block)
        seen = (slots >= j * block) & (slots <= queries[..., None])  # [1 or B, t, block]
        scores = jnp.einsum("bkgtd,bskd->bkgts", q, kb, preferred_element_type=jnp.float32) * (hd**-0.5)
        scores = jnp.where(seen[:, None, None] & ok[:, None, None, None, :], scores, neg)
        m_new = jnp.maximum(m, scores.max(-1))
        probs = jnp.exp(scores - m_new[..., None])
        scale = jnp.exp(m - m_new)  # 0 once a real score replaces the initial `neg`
        total = total * scale + probs.sum(-1)
        acc = acc * scale[..., None] + jnp.einsum("bkgts,bskd->bkgtd", probs.astype(dtype), vb,
                                                  preferred_element_type=jnp.float32)
        return m_new, total, acc

    shape = (b, kv, q.shape[2], tq)
    init = (jnp.full(shape, neg), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, hd), jnp.float32))
    _, total, acc = jax.lax.fori_loop(first // block, (stop + block - 1) // block, visit, init)
    return rearrange((acc / total[..., None]).astype(dtype), "b k g t d -> b t (k g) d")


def _cudnn(q, k, v, mask):
    """`jax.nn.dot_product_attention`: cuDNN's fused flash attention on a GPU; XLA's on a CPU, so that
    the path runs (and is tested) anywhere jax runs; a TPU has splash instead."""
    backend = target_platform()
    if backend not in ("gpu", "cpu"):
        raise MGJaxError(f"attention_impl 'cudnn' runs on a GPU (or a CPU, through XLA), not on {backend}: "
                         "use 'splash' on a TPU")
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation="cudnn" if backend == "gpu" else "xla")


_SPLASH_BLOCK = 128  # the kernel's tile: lengths are padded to a multiple of it


def _splash(q, k, v, segments):
    """Pallas splash attention (TPU; interpreted on a CPU so that the path runs in tests): q [B, T, H, hd],
    k/v [B, T, KV, hd] (repeated to H heads), segments int [B, T] (`splash_segments`). Under a
    mesh the kernel runs per shard (`jax.shard_map`: rows by the batch axes, heads by the tensor axis)."""
    backend = target_platform()
    if backend not in ("tpu", "cpu"):
        raise MGJaxError(f"attention_impl 'splash' is a TPU kernel (interpreted on a CPU), not for {backend}: "
                         "use 'cudnn' on a GPU")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernel does not scale
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
    t = q.shape[1]
    pad = -t % _SPLASH_BLOCK
    # Padding slots get their own segment (-1): they see only each other and are cut off below.
    segments = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for a in (q, k, v))
    length = t + pad
    block = next(b for b in (512, 256, _SPLASH_BLOCK) if length % b == 0)

    def attend(q, k, v, segments):  # [b, h, T, hd] of one shard
        heads = q.shape[1]
        mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
        sizes = splash.BlockSizes(**{f: block for f in ("block_q", "block_kv", "block_kv_compute", "block_q_dkv",
                                                        "block_kv_dkv", "block_kv_dkv_compute", "block_q_dq",
                                                        "block_kv_dq")})
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=backend == "cpu")
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        rows, heads = nn.logical_to_mesh_axes(("act_batch", "act_heads"))
        spec = jax.P(rows, heads, None, None)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, jax.P(rows, None)), out_specs=spec,
                               check_vma=False)
    return attend(q, k, v, segments).transpose(0, 2, 1, 3)[:, :t]


class Attention(nn.Module):
    """q/k/v/out projections around scaled dot-product attention.

    `mask` is bool, broadcastable to [B, 1, Tq, Tk] (True = attend), or, with `impl` "splash", the int
    segment ids [B, T] of `splash_segments` (causal within a segment); `rope` is (cos, sin) or None.
    Kernels: q [D, H, hd], k/v [D, KV, hd], out [H, hd, D] (logical names from the *_axis fields).
    With a `cache`, this call's keys and values are written into it at slot `index` (shared, or int [B]:
    each row's own) and attention runs over all its slots (`mask` then [B, 1, Tq, S], see `cached_mask`),
    or, with `cache_block` > 0 and `valid` bool [B, S] given, over only the blocks of that many slots that
    hold tokens (`_blocked`); the call returns (out, cache). `impl` (`LMConfig.attention_impl`): "xla",
    "causal", "cudnn" or "splash" for calls without a cache, equal up to rounding ("causal" also serves a
    prompt written at slot 0 of a cache, `index` the int 0: generation's prefill).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool
    out_name: str = "o_proj"
    embed_axis: str = "embed"
    heads_axis: str = "heads"
    kv_heads_axis: str = "kv_heads"
    impl: str = "xla"
    cache_block: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: str = "none"  # the projections' storage (`Dense.quant`)
    lora: LoraConfig | None = None  # adapters on the projections it targets (`Dense.lora`)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, rope: tuple[jax.Array, jax.Array] | None = None,
                 cache: KVCache | None = None, index: jax.Array | None = None, valid: jax.Array | None = None):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant,
                  lora=self.lora)
        e, h, kv = self.embed_axis, self.heads_axis, self.kv_heads_axis
        q = dense((self.num_heads, self.head_dim), (e, h, "head_dim"), name="q_proj", **kw)(x)
        k = dense((self.num_kv_heads, self.head_dim), (e, kv, "head_dim"), name="k_proj", **kw)(x)
        v = dense((self.num_kv_heads, self.head_dim), (e, kv, "head_dim"), name="v_proj", **kw)(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = (_write_cache(c, x.astype(c.dtype), index) for c, x in ((cache.k, k), (cache.v, v)))
            cache = KVCache(constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))
        if cache is not None and self.impl == "causal" and isinstance(index, int) and index == 0 and q.shape[1] > 1:
            # a prompt written from slot 0 (prefill) attends to its own keys: the cache's first Tq slots
            out = _causal(q, k[:, :q.shape[1]], v[:, :q.shape[1]], mask[..., :q.shape[1]], self.dtype)
        elif cache is not None and self.cache_block and valid is not None and k.shape[1] >= self.cache_block:
            out = _blocked(q, k, v, valid, index, self.dtype, self.cache_block)
        elif cache is not None or self.impl == "xla":
            out = _xla(q, k, v, mask, self.dtype)
        elif self.impl == "causal":
            out = _causal(q, k, v, mask, self.dtype)
        elif self.impl == "cudnn":
            out = _cudnn(q, k, v, mask)
        else:
            out = _splash(q, k, v, mask)
        out = dense(x.shape[-1], (h, "head_dim", e), in_axes=2, name=self.out_name, **kw)(out)
        return out if cache is None else (out, cache)
